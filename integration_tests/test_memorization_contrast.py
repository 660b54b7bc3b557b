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
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("seeded", marks=pytest.mark.xfail(
            strict=True,
            reason="measured negative (pre-registered paired contrast, raw score): pooled relative AUC 0.55 "
            "(pass >= 0.75), paired wins 6 of 10 (pass >= 8); see docs/extraction.md")),
        pytest.param("captioned", marks=pytest.mark.xfail(
            strict=True,
            reason="measured negative (pre-registered captioned contrast, relative score at n = 4): pooled AUC 0.72 "
            "(pass >= 0.75); the same builds give 0.87 at n = 32 (exploratory); see docs/extraction.md")),
        "captioned-n32",
    ],
)
def test_preregistered_memorization_contrast_meets_its_pass_criterion(name, load_benchmark):
    """Each experiment's criterion, fixed in docs/extraction.md before its builds were scored, is its
    statistics' ``passes``: seeded = pooled relative AUC (10 vs 10) >= 0.75 and >= 8 of 10 paired wins
    (raw score); captioned / captioned-n32 = pooled AUC of the relative score >= 0.75."""
    mc = load_benchmark("memorization_contrast")
    stats = _check_and_score(mc, name)
    assert stats["passes"], stats
