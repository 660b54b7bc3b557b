"""The privacy gate (s2l_plugin.gate): parsing, evaluation on a saved result, verdict.json and its schema,
publish's exit code 3, the console's first line, and bad expressions failing at once on every entry point."""

from __future__ import annotations

import argparse
import io
import json
import time

import pytest
from report_data import build_run_result
from s2l_plugin.hooks import hookimpl

from s2l_plugin import gate
from s2l_plugin.cli import main
from s2l_plugin.errors import ConfigError
from s2l_plugin.result import load_result

GOOD = {
    "auc>0.6": ("auc", "*", "all", "value", ">", 0.6),
    "loss.auc>0.6": ("auc", "loss", "all", "value", ">", 0.6),
    "loss.auc.lower>0.55": ("auc", "loss", "all", "lower", ">", 0.55),
    " loss . auc . upper <= 0.9 ": ("auc", "loss", "all", "upper", "<=", 0.9),
    "duplicated.auc>0.8": ("auc", "*", "duplicated", "value", ">", 0.8),
    "pia.non-duplicated.tpr_at_1fpr>=0.1": ("tpr_at_1fpr", "pia", "non-duplicated", "value", ">=", 0.1),
    "*.mygroup.asr>0.7": ("asr", "*", "mygroup", "value", ">", 0.7),
    "delta_auc.lower>0": ("delta_auc", "*", "all", "lower", ">", 0.0),
    "extracted>0": ("extracted", None, None, "value", ">", 0.0),
    "extraction_rate>=0.05": ("extraction_rate", None, None, "value", ">=", 0.05),
    "memorization>2.5": ("memorization", None, None, "value", ">", 2.5),
    "scan.severity>=high": ("scan.severity", None, None, "value", ">=", "high"),
    "scan.findings>0": ("scan.findings", None, None, "value", ">", 0.0),
    "dataset_p<0.01": ("dataset_p", None, None, "value", "<", 0.01),
}
BAD = {
    "": "is empty",
    "auc": "is not SELECTOR OP VALUE",
    "auc=0.6": "is not SELECTOR OP VALUE",
    "auc>x": "which is not a number",
    "auc>nan": "finite number",
    "auc>>0.6": "not a number",
    "aucc>0.6": "names no known metric",
    "extracted.lower>0": "has no interval",
    "loss.extracted>0": "has no attack or subset",
    "a.b.c.auc>0.5": "is not [ATTACK.][SUBSET.]METRIC",
    "loss.*.auc>0.5": "uses * for a subset",
    "scan.severity>=huge": "not one of none, info, low, medium, high",
    "scan.size>1": "names no scan metric",
    "auc>0.6,,extracted>0": "an empty condition",
    "auc>0.6,": "an empty condition",
}


@pytest.mark.parametrize("expr", sorted(GOOD))
def test_parse_reads_each_documented_form(expr):
    (cond,) = gate.parse(expr)
    assert (cond.metric, cond.attack, cond.subset, cond.bound, cond.op, cond.threshold) == GOOD[expr]
    assert cond.text == "".join(expr.split())


def test_parse_splits_conditions_at_commas():
    conds = gate.parse("loss.auc.lower>0.55, extracted>0,scan.severity>=high")
    assert [c.text for c in conds] == ["loss.auc.lower>0.55", "extracted>0", "scan.severity>=high"]


@pytest.mark.parametrize("expr", sorted(BAD))
def test_a_bad_expression_is_a_one_line_config_error_naming_it(expr):
    with pytest.raises(ConfigError) as info:
        gate.parse(expr, source="--s2l-fail-on")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--s2l-fail-on {expr!r}")
    assert BAD[expr] in message and "expected" in message


# -- evaluation on a saved result ----------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved two-model result (base, lora; loss and secmi; a duplicated subset; extraction; a high finding)."""
    out = tmp_path_factory.mktemp("result")
    return load_result(build_run_result(out))


def _verdict(expr, result):
    return gate.evaluate(expr, result)


def test_conditions_apply_to_the_fine_tuned_model_never_the_base(saved):
    lora, base = saved.audit("lora"), saved.audit("base")
    loss = lora.membership.attack("loss")
    v = _verdict(f"loss.auc>{loss.auc - 1e-9}", saved)
    (c,) = v.conditions
    assert v.verdict == "fail" and v.failed == [c.condition] and v.exit_code == gate.GATE_EXIT_CODE
    assert (c.status, c.model, c.attack, c.value, c.interval) == ("fail", "lora", "loss", loss.auc, loss.auc_ci)
    assert [m.model for m in c.measurements] == ["lora"]  # not the base
    # The base's own values are never measured: a bound between the two models' values reads the lora's only.
    base_ex, lora_ex = base.extraction.extracted_total, lora.extraction.extracted_total
    assert base_ex < lora_ex
    assert _verdict(f"extracted<{lora_ex}", saved).verdict == "pass"  # the base's count would trip it
    assert _verdict(f"extracted<={lora_ex}", saved).verdict == "fail"


def test_any_attack_is_the_worst_attack_and_the_bound_reads_the_interval(saved):
    attacks = saved.audit("lora").membership.attacks
    worst = max(attacks, key=lambda a: a.auc)
    (c,) = _verdict("auc>0.0", saved).conditions
    assert {m.attack for m in c.measurements} == {a.attack for a in attacks}
    assert (c.attack, c.value) == (worst.attack, worst.auc)
    loss = saved.audit("lora").membership.attack("loss")
    low, high = loss.auc_ci
    assert _verdict(f"loss.auc.lower>{low}", saved).verdict == "pass"
    assert _verdict(f"loss.auc.lower>={low}", saved).verdict == "fail"
    assert _verdict(f"loss.auc.upper<{high}", saved).verdict == "pass"
    assert _verdict(f"loss.auc.upper<={high}", saved).verdict == "fail"


def test_subsets_comparisons_memorization_and_scan(saved):
    lora = saved.audit("lora")
    dup = lora.membership.attack("loss").subsets["duplicated"]
    (c,) = _verdict(f"loss.duplicated.auc>={dup['auc']}", saved).conditions
    assert (c.status, c.subset, c.value, c.interval) == ("fail", "duplicated", dup["auc"], dup["auc_ci"])
    comp = next(x for x in saved.comparisons if x.attack == "loss" and x.subset == "all")
    (c,) = _verdict(f"loss.delta_auc.lower>={comp.delta_auc_ci[0]}", saved).conditions
    assert (c.status, c.model, c.value) == ("fail", "lora", comp.delta_auc)
    top = max(s.score for s in lora.memorization.scores)
    assert _verdict(f"memorization>{top}", saved).verdict == "pass"
    assert _verdict(f"memorization>={top}", saved).verdict == "fail"
    assert _verdict("scan.severity>=high", saved).failed == ["scan.severity>=high"]
    assert _verdict("scan.severity>high", saved).verdict == "pass"
    (c,) = _verdict("scan.findings>1", saved).conditions
    assert (c.status, c.value) == ("fail", 2.0)


def test_an_unmeasured_metric_is_reported_and_does_not_trip(saved):
    v = _verdict("dataset_p<0.01,pia.auc>0.5,scan.severity>=high", saved)
    assert v.verdict == "fail" and v.failed == ["scan.severity>=high"]
    assert v.not_measured == ["dataset_p<0.01", "pia.auc>0.5"]
    assert "s2l audit --query" in v.conditions[0].note
    held = _verdict("dataset_p<0.01", saved)
    assert held.verdict == "pass" and held.exit_code == 0 and held.conditions[0].measurements == []


def test_dataset_p_gates_the_dataset_level_test_of_a_query_audit(saved):
    import copy

    from s2l_plugin.result import QueryResult

    result = copy.deepcopy(saved)
    result.query = QueryResult(attack="reference", statistic="", alpha=0.05, min_p_value=1 / 25, images=[], null_ids=[],
                               null_scores=[], dataset={"p_value": 6.2e-8})
    (c,) = _verdict("dataset_p<0.001", result).conditions
    assert (c.status, c.model, c.attack, c.value) == ("fail", "query", "reference", 6.2e-8)
    assert _verdict("dataset_p<1e-9", result).verdict == "pass"


# -- verdict.json, its schema, publish ------------------------------------------------------------


def test_shipped_verdict_schema_matches_the_dataclasses_and_validates_a_verdict(saved, tmp_path):
    import jsonschema

    schema = json.loads(gate.SCHEMA_FILE.read_text())
    assert schema == gate.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    path = gate.write_verdict(_verdict("loss.auc.lower>0.5,extracted>0,scan.severity>=high,dataset_p<0.01", saved), tmp_path)
    data = json.loads(path.read_text())
    jsonschema.validate(data, schema)
    data["verdict"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


class _Recorder:
    def __init__(self):
        self.reports = []

    @hookimpl(tryfirst=True)
    def s2l_write_report(self, result, out_dir):
        self.reports.append(gate.load_verdict(out_dir))


def _pm(recorder):
    from s2l_plugin.hooks.manager import make_plugin_manager

    return make_plugin_manager(load_entry_points=False, extra_plugins=[recorder])


def test_publish_writes_the_verdict_before_the_reports_and_raises_exit_3_after_them(saved, tmp_path):
    from s2l_plugin.flow import publish

    rec = _Recorder()
    saved.config["report"] = []  # no writer: the recorder sees what the writers would
    with pytest.raises(gate.GateFailed) as info:
        publish(saved, tmp_path, _pm(rec), fail_on="scan.severity>=high,auc>0.99")
    exc = info.value
    assert exc.exit_code == 3 and "scan.severity>=high" in str(exc) and "auc>0.99" not in str(exc)
    assert exc.result_path == tmp_path / "result.json" and exc.result_path.is_file()
    assert rec.reports[0]["verdict"] == "fail"  # on disk when the reports were written
    data = json.loads((tmp_path / "verdict.json").read_text())
    assert data["failed"] == ["scan.severity>=high"] and data["exit_code"] == 3
    # The same folder published again without a gate: the stale verdict goes; with a holding gate it says pass.
    publish(saved, tmp_path, _pm(_Recorder()))
    assert not (tmp_path / "verdict.json").exists()
    publish(saved, tmp_path, _pm(_Recorder()), fail_on="auc>0.99")
    assert json.loads((tmp_path / "verdict.json").read_text())["verdict"] == "pass"


def test_console_summary_first_line_names_the_failed_conditions(saved, tmp_path):
    from rich.console import Console

    from s2l_plugin.report.console_report import print_summary
    from s2l_plugin.result import save_result

    save_result(saved, tmp_path)
    gate.write_verdict(_verdict("scan.severity>=high,loss.auc.lower>0.0,auc>0.99", saved), tmp_path)
    for full in (False, True):
        buf = io.StringIO()
        print_summary(tmp_path, console=Console(file=buf, width=300), full=full)
        first = buf.getvalue().splitlines()[0]
        assert first.startswith("Privacy gate FAILED (exit 3): scan.severity>=high (lora: high); loss.auc.lower>0.0 (lora loss: ")
        assert "auc>0.99" not in first
    gate.write_verdict(_verdict("auc>0.99,dataset_p<0.01", saved), tmp_path)
    buf = io.StringIO()
    print_summary(tmp_path, console=Console(file=buf, width=300))
    assert buf.getvalue().splitlines()[0] == "Privacy gate passed: auc>0.99,dataset_p<0.01 (not measured: dataset_p<0.01)"


# -- a bad expression fails at once, before any work, exit 2 -------------------------------------


def _fast_exit_2(argv, capsys):
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 1.0, (code, elapsed)
    assert len(err.strip().splitlines()) == 1 and "'bogus>1'" in err
    return err


def test_s2l_audit_fails_on_a_bad_expression_before_reading_the_target(tmp_path, capsys):
    err = _fast_exit_2(["audit", "--lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "out"),
                        "--fail-on", "bogus>1"], capsys)
    assert err.startswith("s2l: error: --fail-on 'bogus>1'") and not (tmp_path / "out").exists()


def test_s2l_audit_fail_on_needs_out(tmp_path, capsys):
    assert main(["audit", "--lora", str(tmp_path / "x.safetensors"), "--fail-on", "auc>0.6"]) == 2
    assert "expected --out DIR" in capsys.readouterr().err


def test_s2l_run_fails_on_a_bad_expression_before_any_stage(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'out = "{tmp_path / "run"}"\n')
    err = _fast_exit_2(["run", str(config), "--fail-on", "bogus>1"], capsys)
    assert err.startswith("s2l: error: --fail-on 'bogus>1'") and not (tmp_path / "run").exists()
    config.write_text(f'out = "{tmp_path / "run"}"\n[gate]\nfail_on = "bogus>1"\n')
    assert "gate.fail_on 'bogus>1'" in _fast_exit_2(["run", str(config)], capsys)


def test_run_config_gate_section(tmp_path):
    from s2l_plugin.runconfig import load_run_config

    config = tmp_path / "run.toml"
    config.write_text('[gate]\nfail_on = "loss.auc.lower>0.55"\n')
    assert load_run_config(config).gate.fail_on == "loss.auc.lower>0.55"
    assert load_run_config(config, ['gate.fail_on="extracted>0"']).gate.fail_on == "extracted>0"
    assert load_run_config(tmp_path / "run.toml", ["gate.fail_on=''"]).gate.fail_on == ""


def test_s2l_launch_fails_on_a_bad_expression_before_generating(tmp_path, capsys):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "integration_tests" / "scripts" / "train_dreambooth_lora.py"
    out = tmp_path / "out"
    err = _fast_exit_2(["launch", "--s2l-domain", "seven", "--s2l-fail-on", "bogus>1", "--", str(script),
                        "--pretrained_model_name_or_path", str(tmp_path / "base"), "--output_dir", str(out),
                        "--instance_data_dir", "x", "--instance_prompt", "sks"], capsys)
    assert "--s2l-fail-on 'bogus>1'" in err and not out.exists()


def test_three_call_api_checks_fail_on_before_looking_for_the_artifact(tmp_path):
    import s2l_plugin

    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir")
    s2l_plugin.add_arguments(parser)
    args = parser.parse_args(["--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"^fail_on 'auc>'"):
        s2l_plugin.after_training(args, fail_on="auc>")
    with pytest.raises(ConfigError, match=r"^--s2l-fail-on 'x'"):
        s2l_plugin.before_training(parser.parse_args(["--output_dir", str(tmp_path), "--s2l-fail-on", "x"]))


def test_every_fine_tuned_model_is_gated_and_the_worst_is_reported(saved):
    import copy

    result = copy.deepcopy(saved)
    base = copy.deepcopy(result.audit("base"))
    base.model.label = "base/eight"  # a several-domain run's second base: never gated either
    other = copy.deepcopy(result.audit("lora"))
    other.model.label = "dreambooth"
    other.extraction.extracted_total = 99
    result.audits += [base, other]
    (c,) = gate.evaluate("extracted>50", result).conditions
    assert [(m.model, m.value, m.tripped) for m in c.measurements] == [
        ("dreambooth", 99.0, True), ("lora", float(saved.audit("lora").extraction.extracted_total), False)]
    assert (c.status, c.model) == ("fail", "dreambooth")
    assert gate.is_base("base") and gate.is_base("base/eight") and not gate.is_base("lora")
