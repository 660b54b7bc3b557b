"""`s2l audit`'s headline states the checkpoint's membership evidence, its base's AUC and what the fine-tune adds,
in every format; "amplification" stays the headline of `s2l run`, `s2l demo` and `s2l audit --shake`."""

from __future__ import annotations

import copy
import io
import json
import re

import pytest
from report_data import build_run_result

DOMAIN = "seven"


def _console(data, full=False):
    from rich.console import Console

    from s2l_plugin.report.console_report import render_console

    buf = io.StringIO()
    render_console(data, Console(file=buf, width=200, color_system=None), full=full)
    return buf.getvalue()


def _headlines(data, tmp_path):
    """The headline of each format: console (summary and full listing), Markdown, HTML."""
    from s2l_plugin.report.html_report import render_html
    from s2l_plugin.report.markdown_report import render_markdown

    md = render_markdown(data)
    html = render_html(data, tmp_path)
    return {
        "console": _console(data).strip().splitlines()[0],
        "console-full": _console(data, full=True).strip().splitlines()[0],
        "markdown": next(line for line in md.splitlines() if line.startswith("**Verdict:**")).removeprefix("**Verdict:** "),
        "html": re.search(r'<p class="headline">(.*?)</p>', html, re.S).group(1),
    }


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    path = build_run_result(tmp_path_factory.mktemp("run"))
    return json.loads(path.read_text())


def test_an_audit_headline_states_membership_evidence_not_amplification(stored, tmp_path):
    data = copy.deepcopy({**stored, "kind": "audit", "config": {"shake": None}})
    lora = data["audits"][1]["membership"]["attacks"]
    best = max(lora, key=lambda t: t["auc_ci"][0])
    base = next(t for t in data["audits"][0]["membership"]["attacks"] if t["attack"] == best["attack"])
    comp = next(c for c in data["comparisons"] if c["attack"] == best["attack"] and c["subset"] == "all")
    for fmt_name, headline in _headlines(data, tmp_path).items():
        assert "amplif" not in headline.lower(), fmt_name
        assert "membership evidence" in headline.lower(), fmt_name
        assert f"AUC {best['auc']:.3f} [{best['auc_ci'][0]:.3f}, {best['auc_ci'][1]:.3f}] ({best['attack']})" in headline
        assert f"its base: {base['auc']:.3f}" in headline
        assert f"the fine-tune adds {comp['delta_auc']:+.3f} [{comp['delta_auc_ci'][0]:+.3f}, {comp['delta_auc_ci'][1]:+.3f}]" in headline


def test_an_audit_without_an_interval_above_chance_says_no_evidence(stored):
    from s2l_plugin.report.view import build_view

    data = copy.deepcopy({**stored, "kind": "audit", "config": {}})
    for t in data["audits"][1]["membership"]["attacks"]:
        t["auc_ci"] = [0.41, 0.63]
    v = build_view(data).verdict
    assert v.headline.startswith("No membership evidence beyond chance") and v.level == "no-signal"


def test_run_and_shake_headlines_stay_amplification(stored, tmp_path):
    for data in (stored, {**stored, "kind": "audit", "config": {"shake": "lora"}}):
        for fmt_name, headline in _headlines(data, tmp_path).items():
            assert headline.startswith("S2L amplif"), (data["kind"], fmt_name)


def test_s2l_audit_cli_headline_in_every_format(test_testbed, tmp_path, capsys):
    from s2l_plugin.cli import main

    tb = test_testbed
    out = tmp_path / "audit"
    code = main(["audit", "--base", str(tb.pipeline_dir), "--model", str(tb.pipeline_dir),
                 "--members", str(tb.path / "members" / DOMAIN), "--nonmembers", str(tb.path / "nonmembers" / DOMAIN),
                 "--attacks", "pia", "--no-memorization", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    headline = re.search(r'<p class="headline">(.*?)</p>', html, re.S).group(1)
    md_headline = next(line for line in md.splitlines() if line.startswith("**Verdict:**"))
    console_headline = next(line for line in printed.splitlines() if "membership evidence" in line.lower())
    for text in (headline, md_headline, console_headline):
        assert "membership evidence" in text.lower() and "amplif" not in text.lower()
        assert "(pia)" in text and "its base:" in text
