"""`s2l run`: a whole experiment on the test testbed, resumable stage by stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from s2l_plugin.hooks import hookimpl
from s2l_plugin.hooks.manager import make_plugin_manager

from s2l_plugin.errors import ConfigError
from s2l_plugin.result import load_result
from s2l_plugin.run import run_experiment
from s2l_plugin.runconfig import load_run_config

pytestmark = pytest.mark.integration



def _config(tmp_path: Path, testbed, extra: str = "") -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        f"""
out = "{tmp_path / 'out'}"
base = "{testbed.path}"
seed = 0
domains = ["seven"]
methods = ["lora", "dreambooth"]
[generate]
num_images = 8
num_inference_steps = 4
batch_size = 8
[train]
max_train_steps = 2
train_batch_size = 4
[audit]
attacks = ["loss", "reference"]
extraction = 2
extraction_steps = 2
{extra}
"""
    )
    return path


class _Interrupt(Exception):
    pass


class _FailSecondTraining:
    """Simulates a run killed while the second method trains."""

    def __init__(self):
        self.calls = 0

    @hookimpl
    def s2l_before_training(self, run):
        self.calls += 1
        if self.calls == 2:
            raise _Interrupt()


class _Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def s2l_before_training(self, run):
        self.events.append(("before", run.adapter))

    @hookimpl
    def s2l_after_training(self, run, artifact):
        self.events.append(("after", artifact.method))


def test_interrupted_run_resumes_without_redoing_finished_stages(tmp_path, test_testbed):
    config = load_run_config(_config(tmp_path, test_testbed))
    with pytest.raises(_Interrupt):
        run_experiment(config, pm=make_plugin_manager(load_entry_points=False, extra_plugins=[_FailSecondTraining()]))
    stages = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert set(stages) == {"seven/generate", "seven/audit-base", "seven/train/lora", "seven/audit/lora"}
    lora_mtime = (tmp_path / "out" / "seven" / "lora" / "artifact").stat().st_mtime_ns

    recorder = _Recorder()
    path = run_experiment(config, pm=make_plugin_manager(load_entry_points=False, extra_plugins=[recorder]))
    # Only the unfinished method ran: the hooks fired for dreambooth alone, lora was not retrained.
    assert recorder.events == [("before", "dreambooth"), ("after", "dreambooth")]
    assert (tmp_path / "out" / "seven" / "lora" / "artifact").stat().st_mtime_ns == lora_mtime
    result = load_result(path)
    assert [a.model.label for a in result.audits] == ["base", "lora", "dreambooth"]
    assert {c.method for c in result.comparisons} == {"lora", "dreambooth"}
    assert (tmp_path / "out" / "report.html").is_file()

    # A changed training setting for one method redoes that method only.
    config2 = load_run_config(_config(tmp_path, test_testbed), ["train.methods.lora.max_train_steps=3"])
    recorder2 = _Recorder()
    run_experiment(config2, pm=make_plugin_manager(load_entry_points=False, extra_plugins=[recorder2]))
    assert recorder2.events == [("before", "lora"), ("after", "lora")]


def test_hook_s2l_before_training_and_after_training_fire_per_method(tmp_path, test_testbed):
    config = load_run_config(_config(tmp_path, test_testbed), ['methods=["lora"]'])
    recorder = _Recorder()
    run_experiment(config, pm=make_plugin_manager(load_entry_points=False, extra_plugins=[recorder]))
    assert recorder.events == [("before", "lora"), ("after", "lora")]


def test_unknown_method_fails_before_any_work(tmp_path, test_testbed):
    config = load_run_config(_config(tmp_path, test_testbed), ['methods=["lora", "nope"]'])
    with pytest.raises(ConfigError, match="unknown adapter 'nope'"):
        run_experiment(config, pm=make_plugin_manager(load_entry_points=False))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, message", [("train.methods.lora.rank=0", "rank"), ("train.methods.lora.nope=1", "nope")])
def test_a_bad_method_option_fails_before_generation(tmp_path, test_testbed, option, message):
    """A per-method option is checked for every method before the first stage (generation) starts."""
    config = load_run_config(_config(tmp_path, test_testbed), ['methods=["dreambooth", "lora"]', option])
    with pytest.raises(ConfigError, match=message):
        run_experiment(config, pm=make_plugin_manager(load_entry_points=False))
    assert not (tmp_path / "out").exists()
