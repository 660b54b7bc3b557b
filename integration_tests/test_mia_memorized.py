"""Every attack's sign where memorization is known: the duplicated members of a long-trained testbed variant.

The variant (benchmarks/mia_memorized.py: the `test` preset on 2 digits, 2 of 8 members per digit
duplicated 8 times, trained 4,000 steps) memorizes its duplicated members outright (loss-attack
AUC 1.0). Building it costs ~6 CPU-minutes once; it is cached in ``.s2l-cache/`` with the
benchmark, which also records how the AUCs move with training length (300 / 1,500 / 4,000 steps).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def memorized_audit(load_benchmark):
    bench = load_benchmark("mia_memorized")
    return bench.audit(bench.memorized_testbed(bench.TEST_STEPS, 0))


# SecMI stays inverted on this 1 M-parameter UNet however long it trains: duplicated-member AUC
# 0.000 / 0.000 / 0.073 at 300 / 1,500 / 4,000 steps (seed 0), 0.208 at 4,000 steps (seed 1). Its
# t-error is ∝ ‖ε_θ(z̃_{t+k}, t+k) − ε_θ(z̃_t, t)‖², and around its memorized points this model's
# ε-field changes *more* from one step to the next than around held-out images
# (benchmarks/results/mia.md). The formula ranks an exact memorizer's training points first
# (tests/test_mia.py), so this is the model, not a sign slip; reported, never sign-flipped.
KNOWN_INVERTED = {"secmi"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="measured limitation: SecMI is inverted on the 1 M-parameter testbed UNet (duplicated-member AUC 0.073 here; right-signed only with a larger UNet, benchmarks/results/mia.md)")) if n in KNOWN_INVERTED else n
        for n in ("loss", "secmi", "pia", "pian")
    ],
)
def test_attack_detects_the_memorized_testbeds_duplicated_members(memorized_audit, name: str) -> None:
    dup = memorized_audit.attack(name).subsets["duplicated"]
    assert dup["auc"] >= 0.9, f"{name}: duplicated-member AUC {dup['auc']:.3f} (95% CI {dup['auc_ci']})"
