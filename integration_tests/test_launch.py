"""`s2l launch` around each supported trainer: generate → run the script unchanged → audit → report.

The scripts under integration_tests/scripts/ follow each trainer's published command-line
contract (argument names, data layout read, files written, parse_args/main shape) on the testbed.
Set S2L_DIFFUSERS_EXAMPLES to a diffusers checkout's examples/ folder to also run the real
train_dreambooth_lora.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
from s2l_plugin.hooks import hookimpl
from s2l_plugin.hooks.manager import make_plugin_manager, reset_plugin_manager

from s2l_plugin.cli import main
from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.launch import launch, recognise_script
from s2l_plugin.result import load_result

pytestmark = pytest.mark.integration
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# script, its usual arguments (besides model and output), the method S2L picks for it
TRAINERS = {
    "train_dreambooth": (["--instance_data_dir", "PLACEHOLDER", "--instance_prompt", "sks digit"], "dreambooth"),
    "train_dreambooth_lora": (["--instance_data_dir", "PLACEHOLDER", "--instance_prompt", "sks digit", "--rank", "2"], "lora_dreambooth"),
    "textual_inversion": (["--train_data_dir", "PLACEHOLDER", "--placeholder_token", "<s2l>", "--initializer_token", "s</w>"], "textual_inversion"),
    "train_text_to_image_lora": (["--train_data_dir", "PLACEHOLDER", "--rank", "2"], "lora"),
    "train_network": (["--train_data_dir", "PLACEHOLDER", "--network_module", "networks.lora", "--network_dim", "2",
                       "--output_name", "my_lora"], "lora"),
}


def _s2l_options(testbed) -> list[str]:
    members = testbed.path / "members" / "seven"
    nonmembers = testbed.path / "nonmembers" / "seven"
    return [
        "--s2l-domain", "seven", "--s2l-prompt", "a photo of the digit {domain}",
        "--s2l-num-images", "8", "--s2l-steps", "3",
        "--s2l-audit", f"members={members},nonmembers={nonmembers}",
        "--s2l-attacks", "loss,reference", "--s2l-extraction", "2", "--s2l-report", "json",
    ]


@pytest.mark.parametrize("script", sorted(TRAINERS))
def test_launch_generates_trains_and_audits(script, tmp_path, test_testbed):
    usual, method = TRAINERS[script]
    out = tmp_path / "out"
    argv = [
        *_s2l_options(test_testbed),
        *(["--subprocess"] if script == "train_network" else []),
        "--", str(SCRIPTS / f"{script}.py"),
        "--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir", str(out), *usual,
    ]
    assert recognise_script(SCRIPTS / f"{script}.py") == script
    run = launch(argv)
    assert run.adapter == method
    # The synthetic set was generated and the script's data argument pointed at it; nothing else moved.
    data_flag = "--instance_data_dir" if "--instance_data_dir" in usual else "--train_data_dir"
    assert run.script_args[run.script_args.index(data_flag) + 1] == str(run.data_dir)
    assert "PLACEHOLDER" not in run.script_args
    for flag in ("--rank", "--placeholder_token", "--output_name", "--network_dim"):
        if flag in usual:
            assert run.script_args[run.script_args.index(flag) + 1] == usual[usual.index(flag) + 1]
    assert len(list(Path(run.data_dir).rglob("*.png"))) == 8
    # The report: MIA metrics for the trained artifact vs the base, extraction counts.
    result = load_result(out / "s2l-report")
    assert [a.model.label for a in result.audits] == ["base", method]
    base, target = result.audits
    assert {a.attack for a in base.membership.attacks} == {"loss"}
    assert {a.attack for a in target.membership.attacks} == {"loss", "reference"}
    assert target.membership.n_members == len(test_testbed.members("seven"))
    assert base.extraction.n_generations == target.extraction.n_generations == 2
    assert target.extraction.prompts == ["a photo of the digit seven"]  # the template, filled with the domain
    assert [c.attack for c in result.comparisons if c.subset == "all"] == ["loss"]


@pytest.mark.parametrize("formats", [None, "json"])
def test_s2l_launch_prints_the_summary_once_naming_the_report_folder(formats, tmp_path, test_testbed, capsys):
    """With the default formats the console report writer prints the summary; with none that prints,
    the command does, from the saved result. Either way once, and naming the real folder."""
    options = _s2l_options(test_testbed)
    if formats is None:
        i = options.index("--s2l-report")
        del options[i : i + 2]
    else:
        options[options.index("--s2l-report") + 1] = formats
    out = tmp_path / "out"
    usual, _ = TRAINERS["train_dreambooth"]
    argv = ["launch", *options, "--", str(SCRIPTS / "train_dreambooth.py"),
            "--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir", str(out), *usual]
    assert main(argv) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("ΔAUC after − before [95% CI]") == 1
    assert f"s2l report {out / 's2l-report'} --format console --full" in text
    assert "RUN_DIR" not in text


class _Spy:
    def __init__(self):
        self.seen = []

    @hookimpl
    def s2l_before_training(self, run):
        self.seen.append(("before", run.domain, run.adapter, run.output_dir))

    @hookimpl
    def s2l_after_training(self, run, artifact):
        self.seen.append(("after", artifact.method, Path(artifact.path)))


def test_hook_s2l_before_training_sees_the_run_then_after_training_the_artifact(tmp_path, test_testbed):
    spy = _Spy()
    out = tmp_path / "out"
    argv = [*_s2l_options(test_testbed), "--", str(SCRIPTS / "train_dreambooth_lora.py"),
            "--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir", str(out),
            "--instance_data_dir", "x", "--instance_prompt", "sks"]
    launch(argv, pm=make_plugin_manager(load_entry_points=False, extra_plugins=[spy]))
    assert spy.seen == [("before", "seven", "lora_dreambooth", out), ("after", "lora_dreambooth", out)]


def test_three_line_api_in_a_training_script(tmp_path, test_testbed):
    """The in-house pattern: add_arguments, before_training, train (unchanged), after_training."""
    import s2l_plugin

    sys.path.insert(0, str(SCRIPTS))
    try:
        import train_dreambooth_lora as script
    finally:
        sys.path.remove(str(SCRIPTS))
    parser = argparse.ArgumentParser()
    script_parser_args = ["--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir",
                          str(tmp_path / "out"), "--instance_data_dir", "unused", "--instance_prompt", "sks"]
    for action in script.parse_args(script_parser_args)._get_kwargs():
        parser.add_argument(f"--{action[0]}", default=action[1])
    s2l_plugin.add_arguments(parser)  # line 1
    args = parser.parse_args(script_parser_args + _s2l_options(test_testbed))
    s2l_plugin.before_training(args, adapter="lora")  # line 2
    assert Path(args.instance_data_dir).is_dir() and args.instance_data_dir != "unused"
    script.main(script.parse_args([f"--{k}={v}" for k, v in vars(args).items()
                                   if not k.startswith(("s2l_", "_")) and v not in (None, False, True)]))
    result = s2l_plugin.after_training(args)  # line 3
    assert [a.model.label for a in result.audits] == ["base", "lora"]
    assert (tmp_path / "out" / "s2l-report" / "result.json").is_file()


def test_unknown_script_without_adapter_fails_before_generating(tmp_path, test_testbed):
    script = tmp_path / "train_mine.py"
    script.write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--my_data')\n")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="cannot tell which trainer"):
        launch([*_s2l_options(test_testbed), "--", str(script), "--pretrained_model_name_or_path",
                str(test_testbed.pipeline_dir), "--output_dir", str(out)])
    assert not out.exists()


def test_domain_with_script_that_has_no_known_data_argument(tmp_path, test_testbed):
    script = tmp_path / "train_mine.py"
    script.write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--my_data')\n")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--s2l-domain needs a data argument the 'lora' adapter knows"):
        launch([*_s2l_options(test_testbed), "--adapter", "lora", "--", str(script),
                "--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir", str(out)])
    assert not out.exists()


def test_no_artifact_after_training_is_a_clear_error(tmp_path, test_testbed, capsys):
    script = tmp_path / "train_dreambooth.py"
    script.write_text(
        "import argparse\np = argparse.ArgumentParser()\n"
        "for a in ('--pretrained_model_name_or_path', '--instance_data_dir', '--instance_prompt', '--output_dir'):\n"
        "    p.add_argument(a)\np.parse_args()\n"  # trains nothing, writes nothing
    )
    code = main(["launch", "--s2l-audit", f"members={test_testbed.path / 'members' / 'seven'},nonmembers="
                 f"{test_testbed.path / 'nonmembers' / 'seven'}", "--", str(script), "--pretrained_model_name_or_path",
                 str(test_testbed.pipeline_dir), "--output_dir", str(tmp_path / "out"), "--instance_data_dir", "x",
                 "--instance_prompt", "y"])
    assert code == 2
    assert "no trained artifact found in" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("S2L_DIFFUSERS_EXAMPLES"), reason="S2L_DIFFUSERS_EXAMPLES (a diffusers examples/ copy) not set")
def test_real_diffusers_train_dreambooth_lora(tmp_path, test_testbed):
    script = Path(os.environ["S2L_DIFFUSERS_EXAMPLES"]) / "dreambooth" / "train_dreambooth_lora.py"
    out = tmp_path / "out"
    reset_plugin_manager()
    launch([*_s2l_options(test_testbed), "--subprocess", "--", str(script), "--pretrained_model_name_or_path",
            str(test_testbed.pipeline_dir), "--output_dir", str(out), "--instance_data_dir", "x", "--instance_prompt",
            "sks", "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "2", "--rank", "2",
            "--report_to", "tensorboard"])
    result = json.loads((out / "s2l-report" / "result.json").read_text())
    assert result["audits"][1]["model"]["label"] == "lora_dreambooth"


def test_input_error_for_missing_script(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        launch(["--", str(tmp_path / "nope.py"), "--output_dir", str(tmp_path)])


ENTRY_POINT_PLUGIN = """
from s2l_plugin import hookimpl

EVENTS = []

@hookimpl
def s2l_before_training(run):
    EVENTS.append(("before", run.domain, run.adapter, list(run.script_args)))

@hookimpl
def s2l_after_training(run, artifact):
    EVENTS.append(("after", artifact.method, str(artifact.path)))
"""


def test_entry_point_plugin_sees_before_and_after_events_with_the_run_arguments(tmp_path, test_testbed, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "s2l_spy_plugin.py").write_text(ENTRY_POINT_PLUGIN)
    info = site / "s2l_spy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: s2l-spy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[s2l_plugin]\nspy = s2l_spy_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("S2L_PLUGINS", "spy")
    reset_plugin_manager()
    out = tmp_path / "out"
    script_args = ["--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir", str(out),
                   "--instance_data_dir", "x", "--instance_prompt", "sks"]
    launch([*_s2l_options(test_testbed), "--", str(SCRIPTS / "train_dreambooth.py"), *script_args])
    import s2l_spy_plugin

    before, after = s2l_spy_plugin.EVENTS
    assert before[:3] == ("before", "seven", "dreambooth")
    assert before[3][:4] == script_args[:4]  # the script's own arguments, as given
    assert after == ("after", "dreambooth", str(out))
    sys.modules.pop("s2l_spy_plugin", None)
