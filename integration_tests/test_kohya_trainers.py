"""kohya sd-scripts under ``s2l launch`` and in-process, end to end.

On the stand-in (integration_tests/scripts/train_network.py, kohya's contract on the testbed): the
script in another interpreter (``--python``), kohya's default ``.caption`` captions, a
``--dataset_config`` that takes precedence over ``--train_data_dir``, "No data found" (exit 0, no
file) and the ``NetworkTrainer`` subclass pattern of docs/examples/s2l_train_network.py.

On the real trainer, opt-in: set ``S2L_KOHYA_DIR`` (a checkout of kohya-ss/sd-scripts) and
``S2L_KOHYA_PYTHON`` (the python of its own venv; docs/integration.md says how to make it). The base
model is built inside that venv (integration_tests/kohya_fixture.py): kohya rebuilds the SD 1.x UNet
with SD 1.5's fixed channels, so it is an SD 1.5-shaped UNet with random weights, fp16 on disk, with
the testbed's tiny text encoder and tokenizer and a tiny VAE.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from s2l_plugin.cli import main
from s2l_plugin.launch import launch
from s2l_plugin.result import load_result

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "scripts"
REPO = HERE.parent
PROMPT = "a photo of the digit seven"



def _s2l_options(audit_sets, attacks="loss") -> list[str]:
    return [
        "--s2l-domain", "seven", "--s2l-prompt", "a photo of the digit {domain}", "--s2l-num-images", "4",
        "--s2l-steps", "2", "--s2l-audit", f"members={audit_sets / 'members'},nonmembers={audit_sets / 'nonmembers'}",
        "--s2l-attacks", attacks, "--s2l-report", "json",
    ]


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def test_stand_in_in_its_own_interpreter_with_kohya_s_default_captions(tmp_path, test_testbed, audit_sets):
    """--python runs the script as a child; the set is <repeats>_<name>/ with .caption files (kohya's
    default, none given), which the trainer read: its ss_tag_frequency holds the prompt."""
    out = tmp_path / "out"
    run = launch([*_s2l_options(audit_sets), "--python", sys.executable, "--", str(SCRIPTS / "train_network.py"),
                  "--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir", str(out),
                  "--train_data_dir", "PLACEHOLDER", "--network_module", "networks.lora", "--network_dim", "2"])
    subsets = [p for p in Path(run.data_dir).iterdir() if p.is_dir()]
    assert [p.name for p in subsets] == ["10_seven"]
    assert len(list(subsets[0].glob("*.png"))) == len(list(subsets[0].glob("*.caption"))) == 4
    assert not list(subsets[0].glob("*.txt"))
    assert "--caption_extension" not in run.script_args
    tags = json.loads(_metadata(out / "last.safetensors")["ss_tag_frequency"])
    assert tags == {"10_seven": {PROMPT: 4}}
    result = load_result(out / "s2l-report")
    assert result.config["artifact"]["files"] == ["last.safetensors"]
    assert [a.model.label for a in result.audits] == ["base", "lora"]
    # kohya's metadata is read in the scan: the captions and the dataset folder are reported.
    findings = {f.key for f in result.audits[1].findings}
    assert {"ss_tag_frequency", "ss_dataset_dirs"} <= findings


def test_dataset_config_takes_precedence_so_it_is_rewritten(tmp_path, test_testbed, audit_sets):
    user_data = tmp_path / "my_data" / "5_joe"
    user_data.mkdir(parents=True)
    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = 16\n\n'
                      f'  [[datasets.subsets]]\n  image_dir = "{user_data}"\n  num_repeats = 5\n  class_tokens = "joe"\n')
    out = tmp_path / "out"
    run = launch([*_s2l_options(audit_sets), "--subprocess", "--", str(SCRIPTS / "train_network.py"),
                  "--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir", str(out),
                  "--dataset_config", str(config), "--caption_extension", ".txt", "--network_module", "networks.lora",
                  "--network_dim", "2", "--output_name", "joe_lora", "--no_metadata"])
    rewritten = Path(run.script_args[run.script_args.index("--dataset_config") + 1])
    assert rewritten == out / "s2l-dataset-config.toml" and config.read_text().count("5_joe") == 1  # the user's file untouched
    metadata = _metadata(out / "joe_lora.safetensors")
    assert "ss_tag_frequency" not in metadata and metadata["ss_network_module"] == "networks.lora"  # --no_metadata
    assert load_result(out / "s2l-report").config["artifact"]["files"] == ["joe_lora.safetensors"]
    subset = next(p for p in Path(run.data_dir).iterdir() if p.is_dir())
    assert len(list(subset.glob("*.txt"))) == 4  # the extension the run uses


def test_no_data_found_exits_0_without_a_file_and_s2l_says_so(tmp_path, test_testbed, capsys):
    empty = tmp_path / "train"
    (empty / "10_seven").mkdir(parents=True)
    code = main(["launch", "--", str(SCRIPTS / "train_network.py"), "--pretrained_model_name_or_path",
                 str(test_testbed.pipeline_dir), "--output_dir", str(tmp_path / "out"), "--train_data_dir", str(empty),
                 "--network_module", "networks.lora"])
    captured = capsys.readouterr()
    assert "No data found" in captured.out  # the stand-in, as kohya, logs it and returns: exit 0
    assert code == 2
    assert captured.err.count("\n") == 1 and "exited 0 but wrote no" in captured.err and "last.safetensors" in captured.err


def test_network_trainer_subclass_pattern_in_process(tmp_path, test_testbed, audit_sets, monkeypatch):
    """docs/examples/s2l_train_network.py as written, with the stand-in's train_network on the path."""
    out = tmp_path / "out"
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("train_network", None)
    monkeypatch.setattr(sys, "argv", [
        "s2l_train_network.py", "--pretrained_model_name_or_path", str(test_testbed.pipeline_dir),
        "--output_dir", str(out), "--network_module", "networks.lora", "--network_dim", "2", "--output_name", "mine",
        *_s2l_options(audit_sets),
    ])
    try:
        namespace = runpy.run_path(str(REPO / "docs" / "examples" / "s2l_train_network.py"), run_name="__main__")
    finally:
        sys.modules.pop("train_network", None)
    trainer = namespace["trainer"]
    assert Path(trainer.s2l_run.data_dir, "10_seven").is_dir()
    assert len(list(Path(trainer.s2l_run.data_dir, "10_seven").glob("*.caption"))) == 4
    assert json.loads(_metadata(out / "mine.safetensors")["ss_tag_frequency"]) == {"10_seven": {PROMPT: 4}}
    assert [a.model.label for a in trainer.s2l_result.audits] == ["base", "lora"]
    assert (out / "s2l-report" / "result.json").is_file()


_KOHYA_DIR = os.environ.get("S2L_KOHYA_DIR")
_KOHYA_PYTHON = os.environ.get("S2L_KOHYA_PYTHON")


@pytest.mark.skipif(not (_KOHYA_DIR and _KOHYA_PYTHON),
                    reason="S2L_KOHYA_DIR (an sd-scripts checkout) and S2L_KOHYA_PYTHON (its venv's python) not set")
def test_real_kohya_train_network(tmp_path, test_testbed, audit_sets, monkeypatch):
    """s2l launch --python KPY -- train_network.py on the real sd-scripts: kohya's layout, 2 steps, an audit with an AUC."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, tokenizers = tmp_path / "base", tmp_path / "tokenizers"
    started = time.monotonic()
    subprocess.run([_KOHYA_PYTHON, str(HERE / "kohya_fixture.py"), str(test_testbed.pipeline_dir), str(base), str(tokenizers)],
                   check=True)
    out = tmp_path / "out"
    run = launch([*_s2l_options(audit_sets), "--python", _KOHYA_PYTHON, "--", str(Path(_KOHYA_DIR) / "train_network.py"),
                  "--pretrained_model_name_or_path", str(base), "--output_dir", str(out), "--train_data_dir", "PLACEHOLDER",
                  "--network_module", "networks.lora", "--network_dim", "2", "--resolution", "64", "--max_train_steps", "2",
                  "--train_batch_size", "1", "--mixed_precision", "no", "--max_data_loader_n_workers", "0",
                  "--tokenizer_cache_dir", str(tokenizers), "--output_name", "s2l", "--seed", "0"])
    subset = Path(run.data_dir) / "10_seven"
    assert len(list(subset.glob("*.png"))) == len(list(subset.glob("*.caption"))) == 4
    metadata = _metadata(out / "s2l.safetensors")
    assert json.loads(metadata["ss_tag_frequency"]) == {"10_seven": {PROMPT: 4}}  # kohya read our captions
    assert metadata["ss_max_train_steps"] == "2" and metadata["ss_network_module"] == "networks.lora"
    result = load_result(out / "s2l-report")
    assert result.config["artifact"]["files"] == ["s2l.safetensors"]
    target = result.audits[1]
    assert target.model.label == "lora"
    auc = next(a.auc for a in target.membership.attacks if a.attack == "loss")
    assert 0.0 <= auc <= 1.0
    assert "ss_tag_frequency" in {f.key for f in target.findings}
    print(f"\nreal kohya train_network: AUC(loss) {auc:.3f}, {time.monotonic() - started:.0f} s")


def test_stand_in_under_accelerate_launch_from_the_trainer_s_environment(tmp_path, test_testbed):
    """`-- accelerate launch … train_network.py …`: the launcher is the one beside --python."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.is_file():
        pytest.skip(f"no accelerate beside {sys.executable}")
    out = tmp_path / "out"
    run = launch(["--python", sys.executable, "--s2l-domain", "seven", "--s2l-num-images", "4", "--s2l-steps", "2",
                  "--", "accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", str(SCRIPTS / "train_network.py"),
                  "--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir", str(out),
                  "--network_module", "networks.lora", "--network_dim", "2", "--max_train_steps", "1"])
    assert run.state["launcher"][:2] == ["accelerate", "launch"]
    assert json.loads(_metadata(out / "last.safetensors")["ss_dataset_dirs"]) == {"10_seven": {"n_repeats": 10, "img_count": 4}}
