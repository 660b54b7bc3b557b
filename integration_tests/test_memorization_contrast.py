"""The memorization score on the pre-registered paired contrasts (docs/extraction.md, benchmarks/memorization_contrast.py).

Each experiment is two demo-preset testbeds (about 5 CPU-minutes each, cached in .s2l-cache/) that
differ only in which digits carry duplicated members: even digits in one, odd digits in the other.
Design ``seeded``: duplicated members keep their seeded captions; design ``captioned``: they are
captioned with their domain's prompt. Each test asserts its experiment's pre-registered pass
criterion; the ones that failed when measured are strict xfails carrying the numbers.
"""

from __future__ import annotations

import pytest


def _check_and_score(mc, name):
    exp = mc.EXPERIMENTS[name]
    for build in mc.BUILDS:
        tb = mc.build_paired_testbed(build, design=exp["design"], seed=exp["seed"], progress=False)
        assert {d.digit for d in tb.domains if tb.duplicates(d)} == set(mc.BUILDS[build])
        if exp["design"] == "captioned":  # the manipulation: every duplicated member carries its domain's prompt
            prompts = {d.name: d.prompt for d in tb.domains}
            assert all(s.caption == prompts[s.domain] for s in tb.duplicates())
    return mc.experiment_statistics(name, mc.experiment_scores(name))


@pytest.mark.integration
@pytest.mark.xfail(
    strict=True,
    reason="measured negative (pre-registered paired contrast, raw score): pooled relative AUC 0.55 (pass >= 0.75), "
    "paired wins 6 of 10 (pass >= 8); see docs/extraction.md",
)
def test_prompts_score_higher_in_the_build_where_their_domain_has_duplicated_members(load_benchmark):
    mc = load_benchmark("memorization_contrast")
    stats = _check_and_score(mc, "seeded")
    # Thresholds pre-registered in docs/extraction.md before the builds existed: pooled relative AUC
    # (10 vs 10) >= 0.75 and a higher relative score with duplicates for >= 8 of the 10 digits.
    assert stats["pooled_auc_relative"] >= mc.PASS_AUC, stats
    assert stats["paired_wins"] >= mc.PASS_PAIRED_WINS, stats


@pytest.mark.integration
@pytest.mark.xfail(
    strict=True,
    reason="measured negative (pre-registered captioned contrast, relative score at n = 4): pooled AUC 0.72 "
    "(pass >= 0.75); the same builds give 0.87 at n = 32 (exploratory); see docs/extraction.md",
)
def test_relative_score_ranks_domain_prompts_captioning_duplicated_members_first(load_benchmark):
    mc = load_benchmark("memorization_contrast")
    stats = _check_and_score(mc, "captioned")
    # Pre-registered before the seed-0 builds of this design: pooled AUC of the relative score,
    # 10 domain prompts with duplicates over 10 without, >= 0.75.
    assert stats["pooled_auc"] >= mc.PASS_AUC_RELATIVE, stats


@pytest.mark.integration
def test_relative_score_at_32_generations_ranks_domain_prompts_captioning_duplicated_members_first(load_benchmark):
    mc = load_benchmark("memorization_contrast")
    stats = _check_and_score(mc, "captioned-n32")
    # Pre-registered before the seed-2 builds were scored: the relative score averaged over 32
    # generations, pooled AUC (10 domain prompts with duplicates over 10 without) >= 0.75.
    assert stats["pooled_auc"] >= mc.PASS_AUC_RELATIVE, stats
