"""The pre-registered memorization contrasts (docs/extraction.md), checked without rebuilding their testbeds.

Each experiment needs two demo-preset testbeds (about 5 CPU-minutes each); benchmarks/
memorization_contrast.py builds them and writes the committed JSON. Here: every committed
statistic follows from the committed per-prompt scores by the benchmark's own code, and each
experiment's verdict accounts for how far its statistic moves between machines; the scoring and
statistics code runs end to end on the small `test` testbed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _committed(mc, name: str, isa: str | None = None) -> dict:
    suffix = ("" if name == "seeded" else f"_{name}") + (f"_{isa}" if isa else "")
    return json.loads((RESULTS / f"memorization_contrast{suffix}.json").read_text())


def _scores(report: dict) -> dict[str, dict[int, float]]:
    return {b: {int(d): v for d, v in per.items()} for b, per in report["primary"]["scores"].items()}


@pytest.mark.parametrize("name", ["seeded", "captioned", "captioned-n32"])
def test_committed_statistics_follow_from_the_committed_scores(name, load_benchmark):
    """Scores are stored to 4 decimals; the statistics rank them, and no two of one experiment's
    scores are within 1e-4 of each other, so the rounded scores give the same ranks and statistics."""
    mc = load_benchmark("memorization_contrast")
    report = _committed(mc, name)
    values = sorted(v for per in report["primary"]["scores"].values() for v in per.values())
    assert min(b - a for a, b in zip(values, values[1:], strict=False)) > 1e-4
    stats = mc.experiment_statistics(name, _scores(report))
    for key, value in stats.items():
        if key == "paired_relative_difference":
            # Differences of relative scores (score / build mean), each from 4-decimal scores near 1:
            # off by at most about 2 x 0.5e-4 relative rounding plus the stored 4-decimal rounding.
            assert report["primary"][key] == pytest.approx(value, abs=3e-4), key
        else:
            assert report["primary"][key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert report["experiment"]["name"] == name and report["experiment"]["registered"] == mc.EXPERIMENTS[name]["registered"]


def machine_spread(mc) -> float:
    """How far the captioned experiment's pooled AUC moved between this machine's kernels (AVX-512) and
    the same recipe built and scored with AVX2 kernels (benchmarks/results/*_avx2.json)."""
    name = "captioned"
    here, there = _committed(mc, name), _committed(mc, name, "avx2")
    assert here["builds"]["even"]["pipeline_hash"] != there["builds"]["even"]["pipeline_hash"]  # other kernels, other weights
    return abs(mc.primary_value(name, here["primary"]) - mc.primary_value(name, there["primary"]))


#: Each experiment's verdict once the machine-to-machine spread is taken into account (docs/extraction.md).
VERDICTS = {"seeded": "fail", "captioned": "inconclusive", "captioned-n32": "pass"}


@pytest.mark.parametrize("name", list(VERDICTS))
def test_each_verdict_stands_outside_the_machine_spread_or_is_inconclusive(name, load_benchmark):
    mc = load_benchmark("memorization_contrast")
    value = mc.primary_value(name, _committed(mc, name)["primary"])
    assert mc.verdict(value, mc.threshold(name), machine_spread(mc)) == VERDICTS[name]


def test_verdict_rule(load_benchmark):
    mc = load_benchmark("memorization_contrast")
    assert mc.verdict(0.80, 0.75, 0.03) == "pass"
    assert mc.verdict(0.70, 0.75, 0.03) == "fail"
    assert mc.verdict(0.74, 0.75, 0.03) == "inconclusive"
    assert mc.verdict(0.77, 0.75, 0.03) == "inconclusive"


def test_the_experiments_scoring_and_statistics_run_on_a_small_testbed(test_testbed, load_benchmark):
    """The benchmark's code path on the `test` testbed standing in for both builds (tiny n, one step)."""
    mc = load_benchmark("memorization_contrast")
    pipe = test_testbed.load_pipeline()
    digits = {d.digit for d in test_testbed.domains}
    raw = mc.domain_scores(pipe, test_testbed, n=1, steps=1, num_inference_steps=2)
    rel = mc.relative_domain_scores(pipe, test_testbed, n=1, steps=1, num_inference_steps=2)
    for scores in (raw, rel):
        assert set(scores) == digits and all(v == v and v >= 0 for v in scores.values())
    for name in mc.EXPERIMENTS:
        per = raw if mc.EXPERIMENTS[name]["score"] == "raw" else rel
        stats = mc.experiment_statistics(name, {"even": per, "odd": per})
        assert 0.0 <= mc.primary_value(name, stats) <= 1.0 and isinstance(stats["passes"], bool)
