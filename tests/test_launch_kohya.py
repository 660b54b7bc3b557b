"""kohya sd-scripts under ``s2l launch``, the fast part: recognition by structure, the one-line error for
an unknown script, ``--python`` / launchers, and kohya's contract (caption extension, artifact name,
``--dataset_config``, no artifact after exit 0). Nothing here generates, trains or audits.

The recognised files below are minimal files with the import structure and class shape of
sd-scripts' own top-level scripts (read at 48d368fa), not their code.
"""

from __future__ import annotations

import os
import stat
import sys
import tomllib
from pathlib import Path

import pytest

from s2l_plugin import kohya
from s2l_plugin.cli import main
from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.launch import SCRIPT_KINDS, child_command, prepare, recognise_script, split_command

# The import structure of sd-scripts' top-level trainers (their options live in library/; the trainers
# import each other's utilities, e.g. Flux's and SD3's import sd3_train_utils and flux_utils).
TRAIN_NETWORK = """\
import argparse
import torch
from accelerate import Accelerator
from library import deepspeed_utils, model_util, sai_model_spec, strategy_base, strategy_sd
import library.train_util as train_util
import library.config_util as config_util


class NetworkTrainer:
    def train(self, args):
        ...


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    train_util.add_dataset_arguments(parser, True, True, True)
    parser.add_argument("--network_module", type=str, default=None)
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    trainer = NetworkTrainer()
    trainer.train(args)
"""
SDXL_TRAIN_NETWORK = """\
import argparse
import torch
from library import sdxl_model_util, sdxl_train_util, strategy_base, strategy_sd, strategy_sdxl, train_util
import train_network


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    pass


def setup_parser() -> argparse.ArgumentParser:
    parser = train_network.setup_parser()
    sdxl_train_util.add_sdxl_training_arguments(parser)
    return parser


if __name__ == "__main__":
    trainer = SdxlNetworkTrainer()
"""
FLUX_TRAIN_NETWORK = """\
import argparse
from library import flux_models, flux_train_utils, flux_utils, sd3_train_utils, strategy_base, strategy_flux, train_util
import train_network


class FluxNetworkTrainer(train_network.NetworkTrainer):
    pass
"""
FINE_TUNE = """\
import argparse
import toml
from library import deepspeed_utils, strategy_base
import library.train_util as train_util
import library.config_util as config_util


def train(args):
    ...
"""
SDXL_TRAIN = """\
import argparse
from library import deepspeed_utils, sdxl_model_util, strategy_base, strategy_sd, strategy_sdxl, sai_model_spec
import library.train_util as train_util
import library.sdxl_train_util as sdxl_train_util


def train(args):
    ...
"""
SD3_TRAIN_NETWORK = """\
from library import flux_models, flux_train_utils, flux_utils, sd3_train_utils, sd3_utils, strategy_base, strategy_sd3, train_util
import train_network


class Sd3NetworkTrainer(train_network.NetworkTrainer):
    pass
"""
IN_HOUSE_SUBCLASS = """\
from sdxl_train_network import SdxlNetworkTrainer


class OurTrainer(SdxlNetworkTrainer):
    pass
"""
UNKNOWN = "import argparse\np = argparse.ArgumentParser()\np.add_argument('--my_data')\n"


@pytest.mark.parametrize("name, source, kind", [
    ("train_network.py", TRAIN_NETWORK, "train_network"),
    ("sdxl_train_network.py", SDXL_TRAIN_NETWORK, "sdxl_train_network"),
    ("flux_train_network.py", FLUX_TRAIN_NETWORK, "flux_train_network"),
    ("fine_tune.py", FINE_TUNE, "fine_tune"),
    ("sdxl_train.py", SDXL_TRAIN, "sdxl_train"),
    # by what they are, not by their name
    ("my_trainer.py", TRAIN_NETWORK, "train_network"),
    ("renamed_sdxl.py", SDXL_TRAIN_NETWORK, "sdxl_train_network"),
    ("renamed_flux.py", FLUX_TRAIN_NETWORK, "flux_train_network"),
    ("our_trainer.py", IN_HOUSE_SUBCLASS, "sdxl_train_network"),
    ("our_sd1_trainer.py", "import train_network\n\nclass T(train_network.NetworkTrainer):\n    pass\n", "train_network"),
    # kohya, but of a family S2L does not train: not recognised
    ("sd3_train_network.py", SD3_TRAIN_NETWORK, None),
    # imports kohya's library, but is none of the fine-tuning scripts (train_db.py, …): by its name only
    ("train_db.py", FINE_TUNE, None),
    ("train_mine.py", UNKNOWN, None),
    ("broken.py", "def (:\n", None),
])
def test_kohya_trainers_are_recognised_by_their_structure(name, source, kind, tmp_path):
    script = tmp_path / name
    script.write_text(source)
    assert recognise_script(script) == kind


def test_the_real_train_network_is_no_longer_recognised_by_a_flag_it_does_not_name(tmp_path):
    """The real train_network.py names --network_module but not --train_data_dir (library/train_util.py does)."""
    assert '"--train_data_dir"' not in TRAIN_NETWORK and "--network_module" in TRAIN_NETWORK
    script = tmp_path / "anything.py"
    script.write_text(TRAIN_NETWORK)
    assert recognise_script(script) == "train_network"


def _args(out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(out / "base"), "--output_dir", str(out), *extra]


def test_an_unknown_script_is_a_one_line_error_naming_what_is_recognised(tmp_path, capsys):
    script = tmp_path / "train_mine.py"
    script.write_text(UNKNOWN)
    code = main(["launch", "--s2l-domain", "seven", "--", str(script), *_args(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("s2l: error: cannot tell which trainer")
    assert str(script) in err
    for name in ("train_dreambooth_lora.py", "train_network.py", "sdxl_train_network.py", "flux_train_network.py",
                 "fine_tune.py", "sdxl_train.py", "--s2l-script-kind KIND", "--adapter"):
        assert name in err
    assert not (tmp_path / "out").exists()


def test_s2l_script_kind_says_what_an_unrecognised_script_is(tmp_path):
    script = tmp_path / "train_mine.py"
    script.write_text(UNKNOWN)
    out = tmp_path / "out"
    run = prepare(["--s2l-script-kind", "train_network", "--", str(script), *_args(out, "--output_name", "mine")])
    assert run.adapter == "lora" and run.options["script_kind"] == "train_network"
    assert run.options["generate"]["layout"] == "kohya"
    assert run.state["expected_artifact"] == "mine.safetensors"
    with pytest.raises(SystemExit):  # argparse: a kind S2L does not know
        prepare(["--s2l-script-kind", "nope", "--", str(script), *_args(out)])
    assert set(SCRIPT_KINDS) >= {"train_network", "sdxl_train_network", "flux_train_network", "fine_tune", "sdxl_train"}


@pytest.fixture
def kohya_script(tmp_path):
    script = tmp_path / "sd-scripts" / "train_network.py"
    script.parent.mkdir()
    script.write_text(TRAIN_NETWORK)
    return script


def test_kohya_contract_is_read_from_the_run_s_arguments(kohya_script, tmp_path):
    out = tmp_path / "out"
    run = prepare(["--", str(kohya_script), *_args(out)])
    # kohya's defaults: captions in .caption, the artifact last.safetensors
    assert run.state["kohya_caption_extension"] == ".caption"
    assert run.options["generate"]["caption_extension"] == ".caption"
    assert run.state["expected_artifact"] == "last.safetensors"
    run = prepare(["--", str(kohya_script), *_args(out, "--caption_extension=.txt", "--output_name", "joe")])
    assert run.options["generate"]["caption_extension"] == ".txt"
    assert run.state["expected_artifact"] == "joe.safetensors"


@pytest.mark.parametrize("extra, error, match", [
    (["--dataset_config", "missing.toml"], InputError, r"--dataset_config 'missing.toml' does not exist; expected kohya's"),
    (["--save_model_as", "ckpt"], ConfigError, r"--save_model_as 'ckpt' is not auditable; expected safetensors"),
])
def test_kohya_mistakes_fail_before_anything_is_generated(extra, error, match, kohya_script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        prepare(["--s2l-audit", f"members={tmp_path},nonmembers={tmp_path}", "--", str(kohya_script), *_args(out, *extra)])
    assert not out.exists()


@pytest.mark.parametrize("name, source, why", [
    ("flux_train_network.py", FLUX_TRAIN_NETWORK, "single-file Flux transformer"),
    ("fine_tune.py", FINE_TUNE, "--in_json"),
])
def test_recognised_kohya_scripts_s2l_cannot_feed_say_why_in_one_line(name, source, why, tmp_path, capsys):
    script = tmp_path / name
    script.write_text(source)
    code = main(["launch", "--s2l-domain", "seven", "--", str(script), *_args(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and why in err and "--s2l-domain and --s2l-audit cannot be used" in err


def test_a_bad_dataset_config_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[general\n")
    with pytest.raises(InputError, match=r"is not readable TOML .*; expected kohya's dataset config$"):
        kohya.read_dataset_config(bad)
    bad.write_text("[general]\nshuffle_caption = true\n")
    with pytest.raises(InputError, match=r"has no \[\[datasets\]\] table"):
        kohya.read_dataset_config(bad)


def test_dataset_config_is_rewritten_to_train_on_the_synthetic_set_only(tmp_path):
    config = tmp_path / "dataset.toml"
    config.write_text(
        '[general]\nshuffle_caption = true\ncaption_extension = ".txt"\nkeep_tokens = 1\n\n'
        '[[datasets]]\nresolution = 512\nbatch_size = 2\n\n'
        '  [[datasets.subsets]]\n  image_dir = "C:\\\\train\\\\joe"\n  num_repeats = 4\n  class_tokens = "joe man"\n  flip_aug = true\n\n'
        '  [[datasets.subsets]]\n  is_reg = true\n  image_dir = "/reg"\n\n'
        '[[datasets]]\nresolution = 768\n\n  [[datasets.subsets]]\n  image_dir = "/other"\n'
    )
    rewritten = kohya.rewrite_dataset_config(kohya.read_dataset_config(config), tmp_path / "set" / "10_seven", 10, ".caption")
    text = kohya.dumps_toml(rewritten)
    assert tomllib.loads(text) == rewritten  # what kohya reads back is what was meant
    assert rewritten == {
        "general": {"shuffle_caption": True, "caption_extension": ".txt", "keep_tokens": 1},
        "datasets": [{"resolution": 512, "batch_size": 2, "subsets": [
            {"flip_aug": True, "image_dir": str(tmp_path / "set" / "10_seven"), "num_repeats": 10, "caption_extension": ".caption"},
        ]}],
    }


def test_toml_writer_round_trips_values_kohya_configs_hold():
    data = {"general": {"a": 'quote " and \\ back', "b": [1, 2.5, "x"], "c": {"inline": True}, "d": 1e-4},
            "datasets": [{"subsets": [{"image_dir": "ü/日本"}, {"image_dir": "b"}]}, {"resolution": [512, 768]}]}
    assert tomllib.loads(kohya.dumps_toml(data)) == data


def test_command_after_dashes_may_start_with_a_launcher(tmp_path):
    assert split_command(["train.py", "--a", "1"]) == ([], Path("train.py"), ["--a", "1"])
    assert split_command(["accelerate", "launch", "--num_cpu_threads_per_process", "1", "t.py", "--x"]) == (
        ["accelerate", "launch", "--num_cpu_threads_per_process", "1"], Path("t.py"), ["--x"])
    with pytest.raises(ConfigError, match=r"no training script in 'accelerate launch --x'…; expected SCRIPT.py"):
        split_command(["accelerate", "launch", "--x"])


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_python_runs_the_script_in_the_trainer_s_interpreter_and_finds_its_launcher(kohya_script, tmp_path):
    kpy = _executable(tmp_path / "kohya-venv" / "bin" / "python")
    accelerate = _executable(tmp_path / "kohya-venv" / "bin" / "accelerate")
    out = tmp_path / "out"
    run = prepare(["--python", str(kpy), "--", str(kohya_script), *_args(out)])
    assert child_command(run) == [str(kpy), str(kohya_script), *_args(out)]
    run = prepare(["--python", str(kpy), "--", "accelerate", "launch", "--num_processes", "1", str(kohya_script), *_args(out)])
    assert child_command(run) == [str(accelerate), "launch", "--num_processes", "1", str(kohya_script), *_args(out)]
    run = prepare(["--", "accelerate", "launch", str(kohya_script), *_args(out)])
    assert child_command(run) == ["accelerate", "launch", str(kohya_script), *_args(out)]  # from PATH
    run = prepare(["--subprocess", "--", str(kohya_script), *_args(out)])
    assert child_command(run) == [sys.executable, str(kohya_script), *_args(out)]
    assert child_command(prepare(["--", str(kohya_script), *_args(out)])) is None  # in this process


def test_python_that_is_not_an_executable_is_a_one_line_error(kohya_script, tmp_path, capsys):
    code = main(["launch", "--python", str(tmp_path / "nope" / "python"), "--", str(kohya_script), *_args(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--python" in err and "expected the trainer environment's python" in err


def test_exit_0_without_kohya_s_artifact_is_a_clear_error(kohya_script, tmp_path):
    from s2l_plugin.integration import detect_artifact

    out = tmp_path / "out"
    run = prepare(["--", str(kohya_script), *_args(out, "--output_name", "joe")])
    out.mkdir()
    with pytest.raises(InputError, match=r"exited 0 but wrote no '.*joe.safetensors'; kohya's trainers exit 0 without "
                                         r"training when they find no images \('No data found'\)"):
        detect_artifact(run)


def test_the_final_kohya_file_is_the_artifact_not_an_epoch_checkpoint(kohya_script, tmp_path):
    import torch
    from safetensors.torch import save_file

    from s2l_plugin.integration import detect_artifact

    out = tmp_path / "out"
    out.mkdir()
    weights = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}
    for name in ("joe-000001.safetensors", "joe.safetensors"):  # '-' sorts before '.'
        save_file(weights, str(out / name))
    run = prepare(["--", str(kohya_script), *_args(out, "--output_name", "joe")])
    artifact = detect_artifact(run)
    assert artifact.files == ["joe.safetensors"] and artifact.metadata["weight_name"] == "joe.safetensors"
    (out / "joe.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match=r"joe.safetensors' is not a LoRA lora can read"):
        detect_artifact(run)


@pytest.mark.parametrize("ext", ["txt", "../x", ".png", ""])
def test_generation_refuses_a_caption_extension_that_is_not_a_suffix(ext):
    from s2l_plugin.generate import GenerationConfig

    with pytest.raises(ConfigError, match=r"caption_extension=.* is not valid; expected a file suffix"):
        GenerationConfig(domain="seven", layout="kohya", caption_extension=ext)


def test_a_txt_caption_set_keeps_the_identity_it_had_before_the_option():
    from s2l_plugin.generate import GenerationConfig

    assert "caption_extension" not in GenerationConfig(domain="seven", layout="kohya").identity()
    assert GenerationConfig(domain="seven", layout="kohya", caption_extension=".caption").identity()["caption_extension"] == ".caption"


def test_mixin_runs_before_and_after_around_the_trainer_s_own_train(tmp_path, monkeypatch):
    """The in-process pattern's order, without generating: before_training, the trainer's train(args), after_training."""
    import argparse

    import s2l_plugin.integration as integration

    seen = []
    monkeypatch.setattr(integration, "before_training", lambda args, **kw: seen.append(("before", kw)) or "RUN")
    monkeypatch.setattr(integration, "after_training", lambda args, run: seen.append(("after", run)) or "RESULT")

    class Trainer:
        def train(self, args):
            seen.append(("train", args.x))
            return "trained"

    class S2LTrainer(kohya.S2LNetworkTrainerMixin, Trainer):
        pass

    trainer = S2LTrainer()
    assert trainer.train(argparse.Namespace(x=1)) == "trained"
    assert seen == [("before", {"adapter": "lora", "script_kind": "train_network"}), ("train", 1), ("after", "RUN")]
    assert trainer.s2l_run == "RUN" and trainer.s2l_result == "RESULT"


def test_kohya_module_imports_no_torch():
    import subprocess

    code = "import sys, s2l_plugin.kohya, s2l_plugin.launch; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip() == "False"


def test_a_kohya_config_file_gives_what_the_command_line_does_not(kohya_script, tmp_path):
    """kohya parses the command line over --config_file's values (tables flattened): S2L reads the run the same way."""
    out = tmp_path / "out"
    dataset = tmp_path / "dataset.toml"
    dataset.write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "/data/10_joe"\n')
    (tmp_path / "run.toml").write_text(
        f'[model]\npretrained_model_name_or_path = "{tmp_path / "base"}"\n\n'
        f'[saving]\noutput_dir = "{out}"\noutput_name = "from_config"\n\n'
        f'[dataset]\ncaption_extension = ".txt"\ndataset_config = "{dataset}"\n'
    )
    run = prepare(["--", str(kohya_script), "--config_file", str(tmp_path / "run")])  # kohya adds .toml
    assert run.output_dir == out and run.base_model == str(tmp_path / "base")
    assert run.state["expected_artifact"] == "from_config.safetensors"
    assert run.state["kohya_caption_extension"] == ".txt" and run.state["kohya_dataset_config"] == str(dataset)
    run = prepare(["--", str(kohya_script), "--config_file", str(tmp_path / "run.toml"), "--output_name", "cli"])
    assert run.state["expected_artifact"] == "cli.safetensors"  # the command line wins
    with pytest.raises(InputError, match=r"--config_file '.*nope' does not exist \('.*nope.toml'\); expected kohya's"):
        prepare(["--", str(kohya_script), "--config_file", str(tmp_path / "nope")])
