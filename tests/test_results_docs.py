"""docs/results.md quotes its numbers from committed JSON: the issue #21 sections are regenerated and compared."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = (REPO / "docs" / "results.md").read_text(encoding="utf-8")


def test_decide_tables_in_the_docs_equal_the_json(load_benchmark) -> None:
    exp = load_benchmark("s2l_experiments")
    recs = json.loads((RESULTS / "s2l_decide.json").read_text(encoding="utf-8"))
    text = exp.decide_markdown(recs)
    missing = [line for line in text.splitlines() if line.strip() and line not in DOCS]
    assert not missing, f"{len(missing)} lines of decide_markdown() are not in docs/results.md, e.g. {missing[0]!r}"
    assert (RESULTS / "s2l_decide.md").read_text(encoding="utf-8").endswith(text)


def test_latent_table_in_the_docs_equals_the_json(load_benchmark) -> None:
    lat = load_benchmark("latent_choice")
    payload = json.loads((RESULTS / "latent_choice.json").read_text(encoding="utf-8"))
    assert payload["decision"] == lat.decision(payload["rows"])
    text = lat.report(payload)
    missing = [line for line in text.splitlines()[2:] if line.strip() and line not in DOCS]
    assert not missing, f"{len(missing)} lines of latent_choice.report() are not in docs/results.md, e.g. {missing[0]!r}"


def test_decide_prose_numbers_equal_the_json(load_benchmark) -> None:
    exp = load_benchmark("s2l_experiments")
    recs = json.loads((RESULTS / "s2l_decide.json").read_text(encoding="utf-8"))
    summ = exp.decide_summary(recs)
    for method in exp.DECIDE_METHODS:
        m = summ["methods"][method]
        assert f"**{method}: {m['verdict']}**" in DOCS
        for arm in ("S", "C"):
            text = exp._ci(m[arm]["loss"]["pooled"]).replace("-", "−")
            assert text in DOCS, (method, arm, text)
        assert exp._ci(m["S-C"]["pooled"]).replace("-", "−") in DOCS
        ri = m["rule_inputs"]
        assert f"to {ri['members_hit_after']} ({method})" in DOCS and f"from {ri['members_hit_before']} to" in DOCS
    base = [r["hits"]["base"] for r in recs if r["cell"]["arm"] == "S"]
    assert (f"hit {sum(h['non-duplicated'] for h in base)} non-duplicated and {sum(h['duplicated'] for h in base)} duplicated members"
            in DOCS)
    cpu = [r["cpu_s"] for r in recs if r["cell"]["arm"] in ("S", "C")]
    assert f"{min(cpu):.0f}–{max(cpu):.0f} CPU s per cell" in DOCS
    n = [r["n_nonmembers"] for r in recs]
    assert f"{min(n)}–{max(n)} in all" in DOCS
    assert f"{100 / max(n):.2f}–{100 / min(n):.2f}%" in DOCS
