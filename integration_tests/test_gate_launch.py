"""The privacy gate end to end: ``s2l launch --s2l-fail-on`` around a trainer stand-in, and ``s2l audit --fail-on``.

The model is the memorizing testbed variant (benchmarks/mia_memorized.py: the `test` preset on
digits 0 and 1, 2 of 8 members per digit duplicated 8 times, 4,000 training steps; built once
and cached under .s2l-cache/, shared with integration_tests/test_mia_memorized.py — about 4
minutes on one core the first time). The trainer stand-in (scripts/train_dreambooth_lora.py)
fine-tunes a rank-2 LoRA for 3 steps on 8 synthetic images, so the fine-tuned model keeps the
base's memorization. Everything is seeded, so the loss attack's AUC on the domain "zero" is the
same on every run; the bounds are chosen far from it on either side (:data:`TRIPS`, :data:`HOLDS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import pytest
from s2l_plugin.hooks import hookimpl
from s2l_plugin.hooks.manager import make_plugin_manager, reset_plugin_manager

from s2l_plugin.cli import main
from s2l_plugin.gate import GATE_EXIT_CODE, SCHEMA_FILE, VERDICT_FILE
from s2l_plugin.result import load_result

pytestmark = pytest.mark.integration
SCRIPTS = Path(__file__).resolve().parent / "scripts"
DOMAIN = "zero"
#: The memorizing model's loss attack separates its members from held-out images perfectly (AUC 1.0
#: at seed 0), and a 3-step LoRA keeps that, so a bound on the interval's lower end trips ...
TRIPS = "loss.auc.lower>0.6,dataset_p<0.01"
#: ... while the LoRA adds no leakage of its own (ΔAUC 0: the base already leaks all there is) and its
#: diffusers file carries no metadata, so this holds.
HOLDS = "delta_auc.lower>0.05,scan.severity>=high"


def _sha256_tree(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


class _ArtifactBytes:
    """Records the trained artifact's bytes when training ends, before the audit and the gate run."""

    def __init__(self):
        self.before: dict[str, str] = {}
        self.path: Path | None = None

    @hookimpl(tryfirst=True)
    def s2l_after_training(self, run, artifact):
        self.path = Path(artifact.path)
        self.before = _sha256_tree(self.path)


@pytest.fixture(scope="module")
def memorized(load_benchmark):
    bench = load_benchmark("mia_memorized")
    return bench.memorized_testbed(bench.TEST_STEPS, 0)


def _launch(tb, out: Path, fail_on: str) -> tuple[int, str, _ArtifactBytes]:
    spy = _ArtifactBytes()
    reset_plugin_manager(make_plugin_manager(load_entry_points=False, extra_plugins=[spy]))
    argv = [
        "launch", "--s2l-domain", DOMAIN, "--s2l-prompt", "a photo of the digit {domain}",
        "--s2l-num-images", "8", "--s2l-steps", "3",
        "--s2l-audit", f"members={tb.path / 'members' / DOMAIN},nonmembers={tb.path / 'nonmembers' / DOMAIN}",
        "--s2l-attacks", "loss", "--s2l-report", "console", "--s2l-fail-on", fail_on,
        "--", str(SCRIPTS / "train_dreambooth_lora.py"), "--pretrained_model_name_or_path", str(tb.pipeline_dir),
        "--output_dir", str(out), "--instance_data_dir", "unused", "--instance_prompt", "sks", "--rank", "2",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return code, stdout.getvalue(), spy


@pytest.fixture(scope="module")
def tripped(memorized, tmp_path_factory):
    out = tmp_path_factory.mktemp("tripped") / "out"
    code, stdout, spy = _launch(memorized, out, TRIPS)
    return out, code, stdout, spy


def _validate(path: Path) -> dict:
    import jsonschema

    data = json.loads(path.read_text())
    jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))
    return data


def test_launch_gate_trips_exit_3_verdict_fail_artifact_intact(tripped):
    out, code, stdout, spy = tripped
    assert code == GATE_EXIT_CODE == 3
    report = out / "s2l-report"
    verdict = _validate(report / VERDICT_FILE)
    assert verdict["verdict"] == "fail" and verdict["failed"] == ["loss.auc.lower>0.6"]
    assert verdict["not_measured"] == ["dataset_p<0.01"] and verdict["exit_code"] == 3
    cond = verdict["conditions"][0]
    result = load_result(report)  # the result is saved whole beside the verdict
    loss = result.audit("lora_dreambooth").membership.attack("loss")
    assert (cond["model"], cond["attack"], cond["value"], cond["interval"]) == ("lora_dreambooth", "loss", loss.auc, loss.auc_ci)
    assert cond["status"] == "fail" and loss.auc_ci[0] > 0.6
    # The console summary's first line names the failed condition and its measured value.
    first = stdout.splitlines()[0]
    assert first.startswith("Privacy gate FAILED (exit 3): loss.auc.lower>0.6 (lora_dreambooth loss: ")
    # The trained artifact is where training left it, byte for byte.
    assert str(out / "pytorch_lora_weights.safetensors") in spy.before
    after = _sha256_tree(spy.path)
    assert {f: after.get(f) for f in spy.before} == spy.before


def test_launch_gate_holds_exit_0_verdict_pass(memorized, tmp_path):
    code, stdout, _ = _launch(memorized, tmp_path / "out", HOLDS)
    assert code == 0
    verdict = _validate(tmp_path / "out" / "s2l-report" / VERDICT_FILE)
    assert verdict["verdict"] == "pass" and verdict["failed"] == [] and verdict["exit_code"] == 0
    assert [c["status"] for c in verdict["conditions"]] == ["pass", "pass"]
    assert stdout.splitlines()[0] == f"Privacy gate passed: {HOLDS}"


def test_audit_fail_on_trips_and_holds_on_the_launched_lora(memorized, tripped, tmp_path, capsys):
    out, *_ = tripped
    tb = memorized
    common = ["audit", "--base", str(tb.pipeline_dir), "--lora", str(out / "pytorch_lora_weights.safetensors"),
              "--members", str(tb.path / "members" / DOMAIN), "--nonmembers", str(tb.path / "nonmembers" / DOMAIN),
              "--attacks", "loss", "--no-memorization"]
    lora = out / "pytorch_lora_weights.safetensors"
    before = hashlib.sha256(lora.read_bytes()).hexdigest()
    assert main([*common, "--out", str(tmp_path / "trip"), "--fail-on", "loss.auc.lower>0.6"]) == 3
    err = capsys.readouterr().err
    assert "privacy gate failed on loss.auc.lower>0.6" in err
    assert _validate(tmp_path / "trip" / VERDICT_FILE)["verdict"] == "fail"
    assert main([*common, "--out", str(tmp_path / "hold"), "--fail-on", "loss.delta_auc.lower>0.05,extracted>0"]) == 0
    held = _validate(tmp_path / "hold" / VERDICT_FILE)
    assert held["verdict"] == "pass" and held["not_measured"] == ["extracted>0"]  # extraction was off
    assert hashlib.sha256(lora.read_bytes()).hexdigest() == before


def test_run_fail_on_applies_to_every_method_and_a_resumed_run_regates(memorized, tmp_path, capsys):
    """``s2l run --fail-on`` over two methods: each method's audit is measured, the base's never;
    a rerun with another expression skips every stage and writes a new verdict."""
    config = tmp_path / "run.toml"
    config.write_text(f"""
out = "{tmp_path / 'run'}"
base = "{memorized.path}"
domains = ["{DOMAIN}"]
methods = ["lora", "textual_inversion"]
report = ["console"]
[generate]
num_images = 4
num_inference_steps = 2
batch_size = 4
[train]
max_train_steps = 2
train_batch_size = 2
[audit]
attacks = ["loss"]
extraction = 0
memorization = false
""")
    assert main(["run", str(config), "--fail-on", "loss.auc.lower>0.6"]) == GATE_EXIT_CODE
    verdict = _validate(tmp_path / "run" / VERDICT_FILE)
    (cond,) = verdict["conditions"]
    assert verdict["verdict"] == "fail" and sorted(m["model"] for m in cond["measurements"]) == ["lora", "textual_inversion"]
    assert capsys.readouterr().out.splitlines()[0].startswith("Privacy gate FAILED (exit 3): loss.auc.lower>0.6 (")
    assert main(["run", str(config), "--fail-on", "delta_auc.lower>0.05"]) == 0
    verdict = _validate(tmp_path / "run" / VERDICT_FILE)
    assert verdict["verdict"] == "pass" and len(verdict["conditions"][0]["measurements"]) == 2
