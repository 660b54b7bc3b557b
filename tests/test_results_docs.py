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
