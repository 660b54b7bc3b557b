"""Membership-inference metrics from per-sample scores (numpy only; never imports torch).

Every function takes member and non-member scores where **higher = more likely a member**
(the convention of every attack in :mod:`s2l_plugin.audit.mia`). Attacks never threshold;
all thresholding happens here.

- :func:`roc_curve` -- the ROC as scikit-learn's ``roc_curve`` computes it (ties handled
  the same way, ``drop_intermediate`` optional);
- :func:`roc_auc` -- the area under it (Mann-Whitney U with ties counted one half);
- :func:`tpr_at_fpr` -- the TPR of the **last ROC point whose FPR is at or below** the target
  (the ML Privacy Meter / ART / Hu & Pang rule, not SecMI's "nearest point" rule);
- :func:`best_balanced_accuracy` (ASR) and :func:`attacker_advantage` (max |TPR - FPR|);
- :func:`bootstrap_ci` -- stratified percentile bootstrap 95% intervals;
- :func:`paired_delta_auc` -- paired bootstrap for the AUC change between two score sets on
  the *same* images (the S2L amplification number);
- :func:`min_resolvable_fpr` / :func:`fpr_resolvable` / :func:`nonmembers_needed` -- the finest
  FPR the null (the non-members) can resolve: with n non-members the smallest non-zero FPR is
  1/n, so a TPR at an FPR below 1/n is not a measurement (reports show it as "n/r");
- :func:`membership_metrics` -- all of the above at once, as stored in an AttackResult.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from s2l_plugin.errors import InputError

#: FPR targets read off every ROC (1% and 0.1%).
FPR_TARGETS = (0.01, 0.001)
#: Bootstrap replicates used unless a caller says otherwise.
DEFAULT_N_BOOT = 1000


def _as_scores(scores: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.size and not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise InputError(f"{what}: {bad} score(s) are NaN or infinite; expected finite scores")
    return arr


def _check_pair(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    m = _as_scores(member_scores, "member scores")
    n = _as_scores(nonmember_scores, "non-member scores")
    if m.size < 1 or n.size < 1:
        raise InputError(
            f"ROC needs at least one member and one non-member score; got {m.size} member(s) and {n.size} non-member(s)"
        )
    return m, n


def roc_curve(
    member_scores: Sequence[float], nonmember_scores: Sequence[float], *, drop_intermediate: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule "member iff score >= threshold": ``(fpr, tpr, thresholds)``, FPR increasing.

    One point per distinct score (tied scores move TPR and FPR together, as in scikit-learn),
    preceded by the point (0, 0) at threshold +inf. With ``drop_intermediate`` the collinear
    points scikit-learn drops are dropped too; the result then equals
    ``sklearn.metrics.roc_curve(labels, scores)`` with its default arguments.
    """
    m, n = _check_pair(member_scores, nonmember_scores)
    scores = np.concatenate([m, n])
    labels = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    # The last index of every run of equal scores: one ROC point per distinct threshold.
    distinct = np.where(np.diff(scores))[0]
    ends = np.r_[distinct, scores.size - 1]
    tps = np.cumsum(labels)[ends]
    fps = 1 + ends - tps
    thresholds = scores[ends]
    if drop_intermediate and tps.size > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / n.size, tps / m.size, thresholds


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.where(np.diff(sorted_x))[0] + 1]
    ends = np.r_[starts[1:], sorted_x.size]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """Area under the ROC: P(member score > non-member score) + 0.5 P(tie). 0.5 = chance, 1 = perfect."""
    m, n = _check_pair(member_scores, nonmember_scores)
    ranks = _average_ranks(np.concatenate([m, n]))
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """TPR of the last ROC point (in increasing-FPR order) with FPR <= ``target``.

    On a full ROC (:func:`roc_curve` without ``drop_intermediate``) this is the best TPR any
    threshold reaches while keeping FPR at or below the target. The point (0, 0) always
    qualifies, so the answer is 0.0 when no threshold reaches the target.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    # A tiny tolerance so that e.g. 1/100 counts as "at" 0.01 despite float rounding.
    ok = np.where(fpr <= target + 1e-12)[0]
    return float(tpr[ok[-1]]) if ok.size else 0.0


def min_resolvable_fpr(n_nonmembers: int) -> float:
    """The smallest non-zero FPR ``n_nonmembers`` non-members can resolve: ``1 / n``."""
    if n_nonmembers < 1:
        raise InputError(f"the FPR resolution needs at least one non-member, got {n_nonmembers}")
    return 1.0 / n_nonmembers


def fpr_resolvable(target: float, n_nonmembers: int) -> bool:
    """Whether a TPR at FPR ``target`` is a measurement with ``n_nonmembers`` non-members:
    ``target >= 1/n`` (so 1% needs at least 100 non-members, 0.1% at least 1000)."""
    return n_nonmembers >= 1 and target + 1e-12 >= 1.0 / n_nonmembers


#: The FPR each reported TPR field is read at.
TPR_FPR = {"tpr_at_1fpr": 0.01, "tpr_at_01fpr": 0.001}


def tpr_resolvable(fpr: float, n_nonmembers: int | None, stored: bool | None = None) -> bool:
    """Whether a reported TPR at ``fpr`` is a measurement: the result's stored flag
    (``tpr_at_*_resolvable``) when it has one, else :func:`fpr_resolvable` with ``n_nonmembers``;
    True when neither is known (older results without non-member scores)."""
    if stored is not None:
        return bool(stored)
    return not n_nonmembers or fpr_resolvable(fpr, n_nonmembers)


def nonmembers_needed(target: float) -> int:
    """The fewest non-members that resolve FPR ``target`` (100 for 1%, 1000 for 0.1%)."""
    return int(np.ceil(1.0 / target - 1e-9))


def best_balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """ASR: the best balanced accuracy (TPR + TNR) / 2 over all thresholds (0.5 = chance)."""
    return float(np.max((np.asarray(tpr) + 1.0 - np.asarray(fpr)) / 2.0))


def attacker_advantage(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """max |TPR - FPR| over thresholds (tf-privacy's attacker advantage; 0 = chance)."""
    return float(np.max(np.abs(np.asarray(tpr) - np.asarray(fpr))))


def _bootstrap_indices(rng: np.random.Generator, n_boot: int, size: int) -> np.ndarray:
    return rng.integers(0, size, size=(n_boot, size))


def bootstrap_ci(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    statistic: Callable[[np.ndarray, np.ndarray], float],
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> list[float]:
    """Percentile bootstrap interval ``[low, high]`` of ``statistic(members, non_members)``.

    Members and non-members are resampled separately (stratified), each with replacement to
    its own size, ``n_boot`` times from ``numpy.random.default_rng(seed)``.
    """
    m, n = _check_pair(member_scores, nonmember_scores)
    if n_boot < 1:
        raise InputError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    im = _bootstrap_indices(rng, n_boot, m.size)
    inn = _bootstrap_indices(rng, n_boot, n.size)
    values = np.array([statistic(m[a], n[b]) for a, b in zip(im, inn, strict=True)])
    alpha = (1.0 - level) / 2.0
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))]


def _tpr_at_1fpr_stat(m: np.ndarray, n: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(m, n)
    return tpr_at_fpr(fpr, tpr, 0.01)


@dataclass(frozen=True)
class DeltaAUC:
    """AUC after minus AUC before on the same images, with its paired-bootstrap 95% interval."""

    auc_before: float
    auc_after: float
    delta: float
    ci: list[float]


def paired_delta_auc(
    member_before: Sequence[float],
    nonmember_before: Sequence[float],
    member_after: Sequence[float],
    nonmember_after: Sequence[float],
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> DeltaAUC:
    """ΔAUC = AUC(after) - AUC(before) with a **paired** bootstrap interval.

    ``member_before[i]`` and ``member_after[i]`` must score the same image (likewise for
    non-members): each replicate draws one set of member and non-member indices and uses it for
    both models, so the image-to-image variation common to both cancels. Positive Δ = the
    attack got stronger (for S2L: amplification).
    """
    mb, nb = _check_pair(member_before, nonmember_before)
    ma, na = _check_pair(member_after, nonmember_after)
    if mb.size != ma.size or nb.size != na.size:
        raise InputError(
            "paired ΔAUC needs the same images before and after; got "
            f"{mb.size}/{nb.size} members/non-members before and {ma.size}/{na.size} after"
        )
    rng = np.random.default_rng(seed)
    im = _bootstrap_indices(rng, n_boot, mb.size)
    inn = _bootstrap_indices(rng, n_boot, nb.size)
    deltas = np.array(
        [roc_auc(ma[a], na[b]) - roc_auc(mb[a], nb[b]) for a, b in zip(im, inn, strict=True)]
    )
    alpha = (1.0 - level) / 2.0
    before, after = roc_auc(mb, nb), roc_auc(ma, na)
    return DeltaAUC(
        auc_before=before,
        auc_after=after,
        delta=after - before,
        ci=[float(np.quantile(deltas, alpha)), float(np.quantile(deltas, 1.0 - alpha))],
    )


def membership_metrics(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> dict[str, object]:
    """Every metric an AttackResult stores, keyed by its field name.

    ``roc_fpr`` / ``roc_tpr`` are the scikit-learn-style reduced curve (for plotting); the
    TPR@FPR values are read off the full curve. Intervals are stratified bootstrap 95%.
    ``min_resolvable_fpr`` is 1/n (n non-members); ``tpr_at_1fpr_resolvable`` and
    ``tpr_at_01fpr_resolvable`` say whether 1% and 0.1% FPR are at or above it (when not, the
    TPR beside it is kept for compatibility but is not a measurement).
    """
    m, n = _check_pair(member_scores, nonmember_scores)
    fpr, tpr, _ = roc_curve(m, n)
    rfpr, rtpr, _ = roc_curve(m, n, drop_intermediate=True)
    return {
        "auc": roc_auc(m, n),
        "auc_ci": bootstrap_ci(m, n, roc_auc, n_boot=n_boot, seed=seed),
        "tpr_at_1fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_1fpr_ci": bootstrap_ci(m, n, _tpr_at_1fpr_stat, n_boot=n_boot, seed=seed),
        "tpr_at_01fpr": tpr_at_fpr(fpr, tpr, 0.001),
        "asr": best_balanced_accuracy(fpr, tpr),
        "advantage": attacker_advantage(fpr, tpr),
        "roc_fpr": [float(v) for v in rfpr],
        "roc_tpr": [float(v) for v in rtpr],
        "min_resolvable_fpr": min_resolvable_fpr(n.size),
        "tpr_at_1fpr_resolvable": fpr_resolvable(0.01, n.size),
        "tpr_at_01fpr_resolvable": fpr_resolvable(0.001, n.size),
    }
