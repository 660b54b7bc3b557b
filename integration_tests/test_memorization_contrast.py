"""The memorization score on the two pre-registered paired contrasts (docs/extraction.md, benchmarks/memorization_contrast.py).

Each design is two demo-preset testbeds (about 5 CPU-minutes each, cached in .s2l-cache/) that
differ only in which digits carry duplicated members: even digits in one, odd digits in the other.
Design ``seeded``: duplicated members keep their seeded captions; design ``captioned``: they are
captioned with their domain's prompt.
"""

from __future__ import annotations

import pytest


def _paired_scores(mc, design, score):
    """``score(pipe, tb)`` of the 10 domain prompts in each build of ``design``: {build: {digit: score}}."""
    scores = {}
    for build in mc.BUILDS:
        tb = mc.build_paired_testbed(build, design=design, progress=False)
        assert {d.digit for d in tb.domains if tb.duplicates(d)} == set(mc.BUILDS[build])
        scores[build] = score(tb.load_pipeline(), tb)
    return scores


@pytest.fixture(scope="module")
def paired_scores(load_benchmark):
    """Default memorization scores of the 10 domain prompts in each build of design seeded."""
    mc = load_benchmark("memorization_contrast")
    return mc, _paired_scores(mc, "seeded", mc.domain_scores)


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


@pytest.mark.integration
def test_relative_score_ranks_domain_prompts_captioning_duplicated_members_first(load_benchmark):
    mc = load_benchmark("memorization_contrast")
    relative = _paired_scores(mc, "captioned", mc.relative_domain_scores)
    for build in mc.BUILDS:  # the manipulation: every duplicated member carries its domain's prompt
        tb = mc.build_paired_testbed(build, design="captioned", progress=False)
        prompts = {d.name: d.prompt for d in tb.domains}
        assert all(s.caption == prompts[s.domain] for s in tb.duplicates())
    stats = mc.relative_statistics(relative)
    # Pre-registered in docs/extraction.md before the seed-0 builds of this design existed: pooled
    # AUC of the relative score, 10 domain prompts with duplicates over 10 without, >= 0.75.
    assert stats["pooled_auc"] >= mc.PASS_AUC_RELATIVE, stats
