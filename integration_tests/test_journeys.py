"""The user journeys end to end, on the shipped demo config with its sizes reduced and the
`test` testbed as its base (the same architecture as the shipped one, fewer images).

``s2l demo`` runs every registered fine-tuning method; then every artifact it published is read
back exactly as published through every path that reads it: ``s2l audit`` with the flag its
content calls for, ``s2l scan`` on the folder and on each checkpoint file in it, and
``after_training`` (the three-call API) on the folder. The methods come from the adapter
registry, so a new method gets these tests without editing this file.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

#: The demo config's sizes, cut so every method trains and is audited in seconds; attacks,
#: methods and the stages they run are the shipped config's.
TINY = [
    "generate.num_images=8", "generate.num_inference_steps=4", "generate.batch_size=8",
    "train.max_train_steps=2", "train.train_batch_size=4",
    "audit.extraction=2", "audit.extraction_steps=2",
]
DOMAIN = "seven"


def _registered_methods() -> list[str]:
    from s2l_plugin.hooks.manager import collect, make_plugin_manager

    return sorted(collect("adapters", make_plugin_manager(load_entry_points=False)))


METHODS = _registered_methods()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, test_testbed):
    """One ``s2l demo`` with every registered method; ``(out folder, exit code)``."""
    from s2l_plugin.cli import main

    out = tmp_path_factory.mktemp("journey") / "demo"
    sets = [x for s in TINY for x in ("--set", s)]
    code = main(["demo", "--out", str(out), *sets, "--set", f"methods={json.dumps(METHODS)}",
                 "--set", f"base={json.dumps(str(test_testbed.path))}"])
    return out, code


def _artifact(out: Path, method: str) -> Path:
    """The artifact folder the run published for ``method``, as its result records it."""
    result = json.loads((out / "result.json").read_text())
    (path,) = {a["model"]["path"] for a in result["audits"] if a["model"]["method"] == method}
    return Path(path)


def test_demo_runs_every_registered_method_to_the_report(demo_run):
    from s2l_plugin.runconfig import SHIPPED_CONFIGS, load_run_config

    out, code = demo_run
    assert code == 0
    assert sorted(load_run_config(SHIPPED_CONFIGS / "demo.toml").methods) == METHODS, "the demo must run every method"
    result = json.loads((out / "result.json").read_text())
    audited = {a["model"]["label"]: a for a in result["audits"]}
    for method in METHODS:
        attacks = audited[method]["membership"]["attacks"]
        assert {a["attack"] for a in attacks} >= {"loss", "pia", "secmi"}, method
        assert all(0.0 <= a["auc"] <= 1.0 for a in attacks), method
    assert (out / "report.html").stat().st_size > 0


def _flag_for(path: Path, allow_pickle: bool) -> str:
    from s2l_plugin.audit.api import FLAG_KINDS
    from s2l_plugin.formats.detect import detect

    kind = detect(path, allow_pickle=allow_pickle).kind
    return next(flag for flag, kinds in FLAG_KINDS.items() if kind in kinds)


def _audit_args(tb) -> list[str]:
    return ["--base", str(tb.pipeline_dir), "--members", str(tb.path / "members" / DOMAIN),
            "--nonmembers", str(tb.path / "nonmembers" / DOMAIN), "--attacks", "loss", "--no-memorization"]


@pytest.mark.parametrize("method", METHODS)
def test_s2l_audit_reads_each_published_artifact_folder(demo_run, method, tmp_path, capsys, test_testbed):
    from s2l_plugin.cli import main

    folder = _artifact(demo_run[0], method)
    flag = _flag_for(folder, allow_pickle=False)
    code = main(["audit", f"--{flag}", str(folder), *_audit_args(test_testbed), "--out", str(tmp_path / "audit")])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "audit" / "result.json").read_text())
    target = result["audits"][1]["membership"]["attacks"]
    assert [a["attack"] for a in target] == ["loss"] and 0.0 <= target[0]["auc"] <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_s2l_scan_reads_each_published_folder_and_checkpoint_file(demo_run, method, capsys):
    from s2l_plugin.cli import main
    from s2l_plugin.formats.detect import CHECKPOINT_SUFFIXES, container_of

    folder = _artifact(demo_run[0], method)
    assert main(["scan", str(folder), "--json"]) == 0, capsys.readouterr().err
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES]
    for file in files:
        capsys.readouterr()
        if container_of(file) == "pickle":  # refused without the opt-in, by a one-line error
            assert main(["scan", str(file)]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "--allow-pickle" in err, err
            assert main(["scan", str(file), "--allow-pickle", "--json"]) == 0, capsys.readouterr().err
        else:
            assert main(["scan", str(file), "--json"]) == 0, capsys.readouterr().err
        json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method", METHODS)
def test_s2l_audit_reads_each_published_checkpoint_file(demo_run, method, tmp_path, capsys, test_testbed):
    """Each top-level checkpoint file by itself (a pickled copy with --allow-pickle, as its users would)."""
    from s2l_plugin.cli import main
    from s2l_plugin.formats.detect import CHECKPOINT_SUFFIXES, container_of

    folder = _artifact(demo_run[0], method)
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES]
    if not files:
        pytest.skip(f"{method} publishes a pipeline folder, audited as a whole above")
    for i, file in enumerate(files):
        pickle = container_of(file) == "pickle"
        flag = _flag_for(file, allow_pickle=pickle)
        code = main(["audit", f"--{flag}", str(file), *_audit_args(test_testbed),
                     *(["--allow-pickle"] if pickle else []), "--out", str(tmp_path / f"audit{i}")])
        assert code == 0, (file.name, capsys.readouterr().err)


@pytest.mark.parametrize("method", METHODS)
def test_after_training_audits_each_published_artifact(demo_run, method, tmp_path, test_testbed):
    """The three-call API's last call on an output folder holding exactly what the method published."""
    from s2l_plugin.integration import add_arguments, after_training, run_from_args
    out = tmp_path / "out"
    shutil.copytree(_artifact(demo_run[0], method), out)
    tb = test_testbed
    parser = add_arguments(argparse.ArgumentParser())
    parser.add_argument("--pretrained_model_name_or_path")
    parser.add_argument("--output_dir")
    members, nonmembers = tb.path / "members" / DOMAIN, tb.path / "nonmembers" / DOMAIN
    args = parser.parse_args(["--pretrained_model_name_or_path", str(tb.pipeline_dir), "--output_dir", str(out),
                              "--s2l-audit", f"members={members},nonmembers={nonmembers}",
                              "--s2l-attacks", "loss", "--s2l-report", "json"])
    result = after_training(args, run=run_from_args(args, adapter=method))
    assert result.audits[1].model.method == method
    assert 0.0 <= result.audits[1].membership.attacks[0].auc <= 1.0
