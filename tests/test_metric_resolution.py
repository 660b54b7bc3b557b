"""Metrics honesty: a TPR at an FPR the non-members cannot resolve (below 1/n) is never shown as a number.

With n non-members the smallest non-zero FPR is 1/n, so TPR@1%FPR needs at least 100 non-members and
TPR@0.1%FPR at least 1000. result.json keeps the numbers (compatibility) and adds ``min_resolvable_fpr``
and a resolvability flag per reported FPR; the console, Markdown and HTML reports print such a TPR as
the placeholder "n/r (needs ≥ N non-members)" with a footnote stating 1/n; the privacy gate reports a
condition on it as not-measured, never pass/fail.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from s2l_plugin import gate
from s2l_plugin.audit import metrics
from s2l_plugin.audit.compare import compare_attack
from s2l_plugin.errors import InputError
from s2l_plugin.report import numbers as fmt
from s2l_plugin.report.view import build_view
from s2l_plugin.result import (
    AttackResult,
    AuditResult,
    MembershipResult,
    ModelIdentity,
    RunResult,
    load_result,
    load_result_data,
    save_result,
    to_dict,
)

NR_1 = "n/r (needs ≥ 100 non-members)"
NR_01 = "n/r (needs ≥ 1000 non-members)"


def _attack(name: str, m: np.ndarray, n: np.ndarray) -> AttackResult:
    return AttackResult(
        attack=name,
        member_ids=[f"m{i}" for i in range(m.size)],
        nonmember_ids=[f"n{i}" for i in range(n.size)],
        member_scores=m.tolist(),
        nonmember_scores=n.tolist(),
        **metrics.membership_metrics(m, n, n_boot=20, seed=0),
    )


def _result(n_nonmembers: int, *, n_members: int = 50, kind: str = "run", comparisons: bool = True) -> RunResult:
    """A base and a lora audit (loss attack) on ``n_nonmembers`` non-members, with their comparison."""
    rng = np.random.default_rng(n_nonmembers)
    m0, n0 = rng.normal(0.3, 1, n_members), rng.normal(0, 1, n_nonmembers)
    before, after = _attack("loss", m0, n0), _attack("loss", m0 + 1.0, n0 + rng.normal(0, 0.1, n_nonmembers))
    audits = []
    for label, att in (("base", before), ("lora", after)):
        audit = AuditResult(ModelIdentity(label))
        audit.membership = MembershipResult(attacks=[att], n_members=n_members, n_nonmembers=n_nonmembers, seed=0)
        audits.append(audit)
    comps = [compare_attack(before, after, method="lora")] if comparisons else []
    return RunResult(kind=kind, audits=audits, comparisons=comps)


# -- metrics and result.json -----------------------------------------------------------------------------


def test_min_resolvable_fpr_is_one_over_the_non_members():
    assert metrics.min_resolvable_fpr(50) == 0.02 and metrics.min_resolvable_fpr(1000) == 0.001
    assert metrics.fpr_resolvable(0.01, 100) and not metrics.fpr_resolvable(0.01, 99)
    assert metrics.fpr_resolvable(0.001, 1000) and not metrics.fpr_resolvable(0.001, 999)
    assert not metrics.fpr_resolvable(0.01, 50) and metrics.fpr_resolvable(0.02, 50)
    assert (metrics.nonmembers_needed(0.01), metrics.nonmembers_needed(0.001)) == (100, 1000)
    with pytest.raises(InputError):
        metrics.min_resolvable_fpr(0)


@pytest.mark.parametrize(("n", "ok1", "ok01"), [(50, False, False), (99, False, False), (100, True, False), (200, True, False), (1000, True, True)])
def test_membership_metrics_adds_the_resolution_and_keeps_every_number(n, ok1, ok01):
    rng = np.random.default_rng(n)
    m, x = rng.normal(1, 1, 60), rng.normal(0, 1, n)
    got = metrics.membership_metrics(m, x, n_boot=20, seed=0)
    assert got["min_resolvable_fpr"] == pytest.approx(1 / n)
    assert (got["tpr_at_1fpr_resolvable"], got["tpr_at_01fpr_resolvable"]) == (ok1, ok01)
    fpr, tpr, _ = metrics.roc_curve(m, x)
    # The numbers themselves are unchanged: still read off the full ROC.
    assert got["tpr_at_1fpr"] == metrics.tpr_at_fpr(fpr, tpr, 0.01)
    assert got["tpr_at_01fpr"] == metrics.tpr_at_fpr(fpr, tpr, 0.001)
    assert got["auc"] == metrics.roc_auc(m, x)


def test_result_json_has_the_resolution_per_attack_and_comparison(tmp_path):
    result = _result(50)
    data = json.loads(save_result(result, tmp_path).read_text())
    for audit in data["audits"]:
        (att,) = audit["membership"]["attacks"]
        assert att["min_resolvable_fpr"] == 0.02
        assert att["tpr_at_1fpr_resolvable"] is False and att["tpr_at_01fpr_resolvable"] is False
        assert isinstance(att["tpr_at_1fpr"], float)  # the number stays, for compatibility
    (comp,) = data["comparisons"]
    assert comp["min_resolvable_fpr"] == 0.02 and comp["tpr_at_1fpr_resolvable"] is False
    assert isinstance(comp["tpr_at_1fpr_before"], float) and isinstance(comp["tpr_at_1fpr_after"], float)
    jsonschema = pytest.importorskip("jsonschema")
    from s2l_plugin.result import SCHEMA_FILE

    jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))


# -- the three report formats ---------------------------------------------------------------------------


def _write(result: RunResult, tmp_path, capsys) -> dict[str, str]:
    from s2l_plugin.report.writers import write_reports

    write_reports(result, tmp_path, ["html", "markdown", "console"])
    return {
        "html": (tmp_path / "report.html").read_text(),
        "markdown": (tmp_path / "report.md").read_text(),
        "console": capsys.readouterr().out,
    }


def _html_cells(html: str) -> list[tuple[str, str, str]]:
    """(class, data-json, text) of every table cell."""
    return re.findall(r'<td class="([^"]*)"(?: data-json="([^"]*)")?>([^<]*)</td>', html)


def _console(result: RunResult, *, full: bool) -> str:
    from rich.console import Console

    from s2l_plugin.report.console_report import print_summary

    buf = io.StringIO()
    print_summary(result, console=Console(file=buf, width=250, color_system=None), full=full)
    return buf.getvalue()


def test_demo_size_null_shows_no_tpr_at_1pct_fpr_in_any_format(tmp_path, capsys):
    """The demo's size: 50 non-members resolve no FPR below 1/50 = 2%, so no TPR@1%FPR is a measurement."""
    result = _result(50)
    out = _write(result, tmp_path, capsys)
    cells = _html_cells(out["html"])
    tpr_paths = re.compile(r"/(tpr_at_1fpr|tpr_at_1fpr_ci|tpr_at_01fpr|tpr_at_1fpr_before|tpr_at_1fpr_after)$")
    tpr_cells = [c for c in cells if tpr_paths.search(c[1])]
    # membership: 2 audits x (TPR@1%, its CI, TPR@0.1%); amplification: before and after
    assert len(tpr_cells) == 2 * 3 + 2
    for cls, path, text in tpr_cells:
        assert cls == "nr", f"{path} shown as {text!r}"
        assert text == (NR_01 if path.endswith("tpr_at_01fpr") else NR_1)
    assert 'class="note footnote resolution"' in out["html"] and "1/50 = 0.02 (2%)" in out["html"]
    # Markdown: the placeholder in the tables and the footnote under them
    md_rows = [line for line in out["markdown"].splitlines() if line.startswith("| lora | loss |")]
    assert md_rows and all(NR_1 in row for row in md_rows)
    assert out["markdown"].count("1/50 = 0.02 (2%)") == 2  # under the amplification and the membership tables
    # Console: the one-screen summary of a run shows ΔAUC only (no TPR); the full listing has every table.
    assert "TPR" not in out["console"]
    full = _console(result, full=True)
    assert NR_1 in full and NR_01 in full and "1/50 = 0.02 (2%)" in full
    # No TPR is printed as a number anywhere in the membership rows of the full console listing.
    after = result.audit("lora").membership.attacks[0]
    row = next(line for line in full.splitlines() if "│ lora" in line and "│ all" in line)
    assert fmt.num(after.auc) in row and NR_1 in row


def test_audit_summary_of_a_demo_size_audit_says_tpr_is_not_resolvable(tmp_path):
    """`s2l audit`'s one-screen summary (no comparisons) shows TPR@1%FPR as n/r with the 1/n footnote."""
    result = _result(50, kind="audit", comparisons=False)
    text = _console(result, full=False)
    assert NR_1 in text and "1/50 = 0.02 (2%)" in text
    assert "TPR@1%FPR" in text


def test_resolvable_tprs_are_numbers_and_only_the_finer_fpr_is_a_placeholder(tmp_path, capsys):
    """200 non-members resolve 1% FPR (≥ 1/200) but not 0.1%: TPR@1%FPR is a number, TPR@0.1%FPR is n/r."""
    result = _result(200)
    out = _write(result, tmp_path, capsys)
    data = load_result_data(tmp_path)
    cells = {path: (cls, text) for cls, path, text in _html_cells(out["html"]) if path}
    for ai, audit in enumerate(data["audits"]):
        p = f"/audits/{ai}/membership/attacks/0/"
        att = audit["membership"]["attacks"][0]
        assert cells[p + "tpr_at_1fpr"] == ("num", fmt.num(att["tpr_at_1fpr"]))
        assert cells[p + "tpr_at_1fpr_ci"] == ("num", fmt.interval(att["tpr_at_1fpr_ci"]))
        assert cells[p + "tpr_at_01fpr"] == ("nr", NR_01)
    comp = data["comparisons"][0]
    assert cells["/comparisons/0/tpr_at_1fpr_before"] == ("num", fmt.num(comp["tpr_at_1fpr_before"]))
    assert cells["/comparisons/0/tpr_at_1fpr_after"] == ("num", fmt.num(comp["tpr_at_1fpr_after"]))
    assert "1/200 = 0.005 (0.5%)" in out["html"] and NR_1 not in out["html"]
    assert NR_01 in out["markdown"] and fmt.num(comp["tpr_at_1fpr_after"]) in out["markdown"]
    # Only the membership table has a placeholder, so only it has the footnote.
    assert out["markdown"].count("1/200 = 0.005 (0.5%)") == 1
    full = _console(result, full=True)
    assert NR_01 in full and "1/200 = 0.005 (0.5%)" in full


def test_a_large_enough_null_shows_every_tpr_and_no_footnote(tmp_path, capsys):
    result = _result(1000, n_members=30)
    out = _write(result, tmp_path, capsys)
    for text in (*out.values(), _console(result, full=True)):
        assert "n/r (needs" not in text and "smallest non-zero FPR" not in text
    view = build_view(to_dict(result))
    assert all(not t.footnote for t in view.tables)


def test_an_older_result_without_the_fields_is_judged_by_its_non_member_count(tmp_path):
    """Results written before the resolution fields: reports use len(nonmember_scores), never a number at 1/n > FPR."""
    save_result(_result(50), tmp_path)
    path = tmp_path / "result.json"
    data = json.loads(path.read_text())
    for audit in data["audits"]:
        for att in audit["membership"]["attacks"]:
            for key in ("min_resolvable_fpr", "tpr_at_1fpr_resolvable", "tpr_at_01fpr_resolvable"):
                del att[key]
    for comp in data["comparisons"]:
        del comp["min_resolvable_fpr"], comp["tpr_at_1fpr_resolvable"]
    path.write_text(json.dumps(data))
    loaded = load_result(tmp_path)
    assert loaded.audits[0].membership.attacks[0].min_resolvable_fpr is None
    view = build_view(load_result_data(tmp_path))
    texts = {c.path: c.text for t in view.tables for row in t.rows for c in row if c.path}
    assert texts["/audits/1/membership/attacks/0/tpr_at_1fpr"] == NR_1
    assert texts["/comparisons/0/tpr_at_1fpr_after"] == NR_1
    assert "1/50 = 0.02" in view.table("membership").footnote


def test_s2l_report_compare_shows_unresolvable_tprs_as_placeholders_without_a_difference(tmp_path):
    from rich.console import Console

    from s2l_plugin.report.compare import compare_runs

    save_result(_result(50), tmp_path / "a")
    save_result(_result(200), tmp_path / "b")
    buf = io.StringIO()
    md = compare_runs(tmp_path / "a", tmp_path / "b", tmp_path, console=Console(file=buf, width=250, color_system=None))
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| MIA lora / loss: TPR@1%FPR |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    b_value = load_result(tmp_path / "b").audit("lora").membership.attacks[0].tpr_at_1fpr
    assert cells[1:] == [NR_1, fmt.num(b_value), fmt.MISSING]
    row01 = next(line for line in text.splitlines() if line.startswith("| MIA lora / loss: TPR@0.1%FPR |"))
    assert [c.strip() for c in row01.strip("|").split("|")][1:] == [NR_01, NR_01, fmt.MISSING]
    assert "smallest non-zero FPR" in text and NR_1 in buf.getvalue()


# -- the privacy gate ------------------------------------------------------------------------------------


def test_gate_on_an_unresolvable_tpr_is_not_measured_never_pass_or_fail():
    result = _result(50)
    # Numerically every TPR is >= 0: were it read as a number, this condition would trip.
    v = gate.evaluate("tpr_at_1fpr>=0,loss.tpr_at_01fpr>=0,auc>=0", result)
    tpr1, tpr01, auc = v.conditions
    assert (tpr1.status, tpr01.status, auc.status) == ("not-measured", "not-measured", "fail")
    assert not tpr1.measurements and tpr1.value is None
    assert "needs ≥ 100 non-members" in tpr1.note and "1/50 = 0.02" in tpr1.note and "lora / loss" in tpr1.note
    assert "needs ≥ 1000 non-members" in tpr01.note
    assert v.not_measured == ["tpr_at_1fpr>=0", "loss.tpr_at_01fpr>=0"] and v.failed == ["auc>=0"]
    line = gate.headline(to_dict(v))
    assert line.startswith("Privacy gate FAILED") and "tpr_at_1fpr>=0: TPR at 1% FPR is not resolvable" in line
    # Only unresolvable conditions: the gate passes and says why they were not measured.
    v = gate.evaluate("tpr_at_1fpr>=0,duplicated.tpr_at_1fpr>=0", result)
    assert v.verdict == "pass" and v.not_measured == ["tpr_at_1fpr>=0"] + ["duplicated.tpr_at_1fpr>=0"]
    # (the duplicated subset does not exist here: its note is the plain "no such value", not the resolution)
    assert "is not resolvable" not in v.conditions[1].note
    line = gate.headline(to_dict(v))
    assert line.startswith("Privacy gate passed") and "needs ≥ 100 non-members" in line


def test_gate_measures_a_resolvable_tpr():
    result = _result(200)
    after = result.audit("lora").membership.attack("loss")
    v = gate.evaluate(f"tpr_at_1fpr>={after.tpr_at_1fpr},tpr_at_01fpr>=0", result)
    tpr1, tpr01 = v.conditions
    assert (tpr1.status, tpr1.value) == ("fail", after.tpr_at_1fpr)
    assert tpr01.status == "not-measured" and "needs ≥ 1000 non-members" in tpr01.note
    assert gate.evaluate(f"tpr_at_1fpr>{after.tpr_at_1fpr}", result).verdict == "pass"
