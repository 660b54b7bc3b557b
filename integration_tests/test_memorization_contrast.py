"""The memorization score on the pre-registered paired contrast (docs/extraction.md, benchmarks/memorization_contrast.py).

Two demo-preset testbeds (about 5 CPU-minutes each, cached in .s2l-cache/) that differ only in which
digits carry duplicated members: even digits in one, odd digits in the other.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def paired_scores(load_benchmark):
    """Default memorization scores of the 10 domain prompts in each build: {build: {digit: score}}."""
    mc = load_benchmark("memorization_contrast")
    scores = {}
    for build in mc.BUILDS:
        tb = mc.build_paired_testbed(build, progress=False)
        assert {d.digit for d in tb.domains if tb.duplicates(d)} == set(mc.BUILDS[build])
        scores[build] = mc.domain_scores(tb.load_pipeline(), tb)
    return mc, scores


@pytest.mark.integration
@pytest.mark.xfail(
    strict=True,
    reason="measured negative (pre-registered paired contrast): pooled relative AUC 0.55 (pass >= 0.75), "
    "paired wins 6 of 10 (pass >= 8); see docs/extraction.md",
)
def test_prompts_score_higher_in_the_build_where_their_domain_has_duplicated_members(paired_scores):
    mc, scores = paired_scores
    stats = mc.contrast_statistics(scores)
    # Thresholds pre-registered in docs/extraction.md before the builds existed: pooled relative AUC
    # (10 vs 10) >= 0.75 and a higher relative score with duplicates for >= 8 of the 10 digits.
    assert stats["pooled_auc_relative"] >= mc.PASS_AUC, stats
    assert stats["paired_wins"] >= mc.PASS_PAIRED_WINS, stats
