"""Specifications of the MIA metrics: scikit-learn agreement, the TPR@FPR rule, bootstrap intervals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from s2l_plugin.audit import metrics
from s2l_plugin.errors import InputError


def _labels_scores(m: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.r_[np.ones(m.size), np.zeros(n.size)], np.r_[m, n]


CASES = {
    "random": lambda rng: (rng.normal(0.3, 1, 57), rng.normal(0, 1, 83)),
    "tied": lambda rng: (rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 61).astype(float)),
    "all-tied": lambda rng: (np.zeros(5), np.zeros(7)),
    "separable": lambda rng: (rng.uniform(2, 3, 10), rng.uniform(0, 1, 12)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_roc_match_scikit_learn(case: str, seed: int) -> None:
    m, n = CASES[case](np.random.default_rng(seed))
    y, s = _labels_scores(m, n)
    assert metrics.roc_auc(m, n) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s)  # default drop_intermediate=True
    fpr, tpr, thr = metrics.roc_curve(m, n, drop_intermediate=True)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-9, rtol=0)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-9, rtol=0)
    np.testing.assert_array_equal(thr, sk_thr)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    fpr, tpr, _ = metrics.roc_curve(m, n)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-9, rtol=0)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-9, rtol=0)
    # The trapezoid area under the full curve is the same AUC.
    assert float(np.trapezoid(tpr, fpr)) == pytest.approx(metrics.roc_auc(m, n), abs=1e-9)


def test_higher_score_means_member() -> None:
    assert metrics.roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert metrics.roc_auc([1.0, 2.0], [3.0, 4.0]) == 0.0


def test_tpr_at_fpr_takes_last_point_at_or_below_target() -> None:
    # 100 non-members scored 0..99; 4 members at 150, 98.5, 97.5, 10. Hand-computed ROC, in
    # decreasing threshold: 150 -> (0, .25); 99 -> (.01, .25); 98.5 -> (.01, .5);
    # 98 -> (.02, .5); 97.5 -> (.02, .75); ... ; 10 -> (.89, 1).
    nonmembers = np.arange(100, dtype=float)
    members = np.array([150.0, 98.5, 97.5, 10.0])
    fpr, tpr, _ = metrics.roc_curve(members, nonmembers)
    assert metrics.tpr_at_fpr(fpr, tpr, 0.01) == 0.5  # the last of the two points at FPR 0.01
    assert metrics.tpr_at_fpr(fpr, tpr, 0.015) == 0.5  # not the nearer-above point (.02, .75)
    assert metrics.tpr_at_fpr(fpr, tpr, 0.001) == 0.25  # only the FPR-0 point qualifies
    assert metrics.tpr_at_fpr(fpr, tpr, 0.02) == 0.75
    result = metrics.membership_metrics(members, nonmembers, n_boot=20)
    assert result["tpr_at_1fpr"] == 0.5
    assert result["tpr_at_01fpr"] == 0.25


def test_tpr_at_fpr_is_zero_when_a_nonmember_outranks_every_member() -> None:
    fpr, tpr, _ = metrics.roc_curve([1.0, 2.0], [5.0, 0.0, 0.5])
    assert metrics.tpr_at_fpr(fpr, tpr, 0.01) == 0.0


def test_tpr_at_fpr_uses_the_full_curve_not_the_plotting_curve() -> None:
    # A member and a non-member tied at 8 and again at 7 give two equal diagonal steps; scikit-learn's
    # drop_intermediate drops the point between them, (0.002, 0.03). Hand-computed full ROC:
    # 10 -> (0, .01); 9.5 -> (.001, .01); 9 -> (.001, .02); 8 -> (.002, .03); 7 -> (.003, .04).
    members = np.array([10.0, 9.0, 8.0, 7.0] + [0.0] * 96)
    nonmembers = np.array([9.5, 8.0, 7.0] + [-1.0] * 997)
    fpr, tpr, _ = metrics.roc_curve(members, nonmembers)
    rfpr, rtpr, _ = metrics.roc_curve(members, nonmembers, drop_intermediate=True)
    assert metrics.tpr_at_fpr(fpr, tpr, 0.002) == 0.03
    assert metrics.tpr_at_fpr(rfpr, rtpr, 0.002) == 0.02  # what reading the plotting curve would give
    full = metrics.membership_metrics(members, nonmembers, n_boot=10)
    assert full["tpr_at_01fpr"] == 0.02 and full["tpr_at_1fpr"] == 1.0


def test_asr_and_advantage_hand_computed() -> None:
    # Threshold 2.5 separates 3/4 members from 3/4 non-members: balanced accuracy .75, advantage .5.
    fpr, tpr, _ = metrics.roc_curve([3.0, 4.0, 5.0, 1.0], [2.0, 0.0, -1.0, 6.0])
    assert metrics.best_balanced_accuracy(fpr, tpr) == pytest.approx(0.75)
    assert metrics.attacker_advantage(fpr, tpr) == pytest.approx(0.5)


def test_bootstrap_interval_covers_the_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(5)
    m, n = rng.normal(0.8, 1, 60), rng.normal(0, 1, 60)
    a = metrics.bootstrap_ci(m, n, metrics.roc_auc, n_boot=400, seed=3)
    b = metrics.bootstrap_ci(m, n, metrics.roc_auc, n_boot=400, seed=3)
    assert a == b
    auc = metrics.roc_auc(m, n)
    assert a[0] < auc < a[1]
    # A normal-approximation width check: for this AUC (~0.7) and 60 vs 60, the 95% interval
    # spans roughly 0.15-0.25 (Hanley-McNeil SE ~0.047).
    assert 0.12 < a[1] - a[0] < 0.3


def test_paired_delta_auc_identical_models_gives_zero_with_zero_width() -> None:
    rng = np.random.default_rng(0)
    m, n = rng.normal(0.5, 1, 40), rng.normal(0, 1, 40)
    d = metrics.paired_delta_auc(m, n, m, n, n_boot=200)
    assert d.delta == 0.0 and d.ci == [0.0, 0.0]


def test_paired_delta_auc_is_narrower_than_unpaired_when_scores_are_correlated() -> None:
    rng = np.random.default_rng(1)
    m, n = rng.normal(0.5, 1, 50), rng.normal(0, 1, 50)
    # "After" = the same per-image scores plus a small member shift and a little noise.
    ma, na = m + 0.2 + rng.normal(0, 0.1, 50), n + rng.normal(0, 0.1, 50)
    d = metrics.paired_delta_auc(m, n, ma, na, n_boot=500, seed=0)
    assert d.delta == pytest.approx(metrics.roc_auc(ma, na) - metrics.roc_auc(m, n))
    assert d.ci[0] < d.delta < d.ci[1]
    assert d.ci[0] > 0  # the shift is detected
    before = metrics.bootstrap_ci(m, n, metrics.roc_auc, n_boot=500)
    after = metrics.bootstrap_ci(ma, na, metrics.roc_auc, n_boot=500)
    assert d.ci[1] - d.ci[0] < 0.5 * ((before[1] - before[0]) + (after[1] - after[0])) / 2


def test_paired_delta_auc_refuses_unpaired_sets() -> None:
    with pytest.raises(InputError, match="same images"):
        metrics.paired_delta_auc([1, 2, 3], [0, 1], [1, 2], [0, 1])


@pytest.mark.parametrize(
    ("m", "n", "match"),
    [([], [1.0], "at least one member"), ([1.0], [], "at least one member"), ([np.nan], [1.0], "NaN")],
)
def test_bad_scores_are_clear_errors(m, n, match) -> None:
    with pytest.raises(InputError, match=match):
        metrics.roc_auc(m, n)


def test_metrics_module_imports_no_torch() -> None:
    code = "import sys, s2l_plugin.audit.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
