"""Every command that opens a base model opens it through the one loader, with its safety rules:
a pipeline folder naming a custom code library, or holding only pickled weights, is refused by
`s2l run`, `s2l generate`, `s2l finetune`, `s2l launch` and `s2l audit` with the same one-line
message and exit 2; the pickle one loads with the documented opt-in."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from s2l_plugin.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "integration_tests" / "scripts" / "train_dreambooth_lora.py"


@pytest.fixture
def unsafe_folders(tiny_pipeline, tmp_path):
    code = tmp_path / "custom-code"
    tiny_pipeline.save_pretrained(code)
    index = json.loads((code / "model_index.json").read_text())
    (code / "model_index.json").write_text(json.dumps({**index, "unet": ["my_evil_lib", "UNet"]}))
    pickled = tmp_path / "pickled"
    tiny_pipeline.save_pretrained(pickled, safe_serialization=False)
    # diffusers writes its components as .bin; transformers 5 writes the text encoder as safetensors regardless.
    assert list((pickled / "unet").glob("*.bin")) and not list((pickled / "unet").glob("*.safetensors"))
    return {"custom-code": (code, "names library 'my_evil_lib'"), "pickled": (pickled, "holds only pickled weights")}


def _commands(folder: Path, tmp: Path, tb) -> dict[str, list[str]]:
    members, nonmembers = tb.path / "members" / "seven", tb.path / "nonmembers" / "seven"
    config = tmp / "run.toml"
    config.write_text(f'out = "{tmp / "run"}"\nbase = "{folder}"\ndomains = ["seven"]\nmethods = ["lora"]\n'
                      f'[data]\nmembers = "{members}"\nnonmembers = "{nonmembers}"\n')
    return {
        "run": ["run", str(config)],
        "generate": ["generate", "--model", str(folder), "--domain", "seven", "--num-images", "1", "--out", str(tmp / "g")],
        "finetune": ["finetune", "--method", "lora", "--model", str(folder), "--data", str(members), "--out", str(tmp / "f")],
        "launch": ["launch", "--s2l-domain", "seven", "--s2l-num-images", "1", "--", str(SCRIPT),
                   "--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(tmp / "data"),
                   "--output_dir", str(tmp / "launched")],
        "audit": ["audit", "--base", str(folder), "--model", str(tb.pipeline_dir), "--no-memorization"],
    }


@pytest.mark.parametrize("kind", ["custom-code", "pickled"])
@pytest.mark.parametrize("command", ["run", "generate", "finetune", "launch", "audit"])
def test_every_command_refuses_an_unsafe_base_folder_with_one_message(command, kind, unsafe_folders, tmp_path,
                                                                      test_testbed, capsys):
    folder, reason = unsafe_folders[kind]
    argv = _commands(folder, tmp_path, test_testbed)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("s2l: error: ") and reason in err[0], err
    written = {p.name for p in tmp_path.iterdir()} - {"custom-code", "pickled", "run.toml"}
    assert not written, f"{command} wrote {written} before refusing the base"


def test_the_opt_in_reads_a_pickled_base_weights_only(unsafe_folders, tiny_pipeline, tmp_path, capsys):
    import torch

    from s2l_plugin.pipeline import load_pipeline

    folder, _ = unsafe_folders["pickled"]
    pipe = load_pipeline(folder, allow_pickle=True)
    for name, tensor in tiny_pipeline.unet.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[name], tensor)
    out = tmp_path / "g"
    assert main(["generate", "--model", str(folder), "--domain", "seven", "--num-images", "1", "--steps", "2",
                 "--out", str(out), "--allow-pickle", "--no-progress"]) == 0, capsys.readouterr().err
    assert (out / "manifest.json").is_file()


def test_launch_takes_the_opt_in_as_an_s2l_flag():
    import argparse

    from s2l_plugin.integration import add_arguments, run_from_args

    parser = add_arguments(argparse.ArgumentParser())
    parser.add_argument("--output_dir")
    args = parser.parse_args(["--output_dir", "x", "--s2l-allow-pickle"])
    assert run_from_args(args).options["allow_pickle"] is True
    assert sys.modules["s2l_plugin.integration"]  # imported by the call above
