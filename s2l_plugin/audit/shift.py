"""The distribution-shift diagnostic: can the member and non-member sets be told apart without the model under audit?

An MIA's AUC measures how well two folders separate. When members and non-members come from
different distributions (source, contrast, stroke width, resolution), an attack separates them
without any membership leakage. The diagnostic answers "how much of this AUC could be shift?"
before any verdict is read, with three numbers, all computed on the images alone or on the base:

- **the test** (:func:`s2l_plugin.audit.mia.data.latent_shift`, run by the MIA engine on every
  audited model's sets): a permutation test of the distance between the two sets' mean pooled VAE
  latents (standardized; 500 seeded relabellings). The sets are called *distinguishable* when its
  p-value is below :data:`~s2l_plugin.audit.mia.data.SHIFT_P_VALUE` (0.01), fixed before any
  outcome was looked at; with IID sets this fires about once in a hundred audits.
- **the shift classifier's AUC** (:func:`classifier_auc`): a linear classifier on the same latents,
  scored out of fold, separates members from non-members with this AUC. It is on the scale of an
  attack's AUC: an attack AUC at or below it can be explained by the shift alone. It is a lower
  bound on what the shift can explain (a stronger classifier may separate more).
- **the base model's AUC per attack** (:func:`shift_summary`): the base never saw the fine-tune's
  members, so its AUC on the same sets is the shift-plus-pretraining baseline a fine-tune's AUC
  must be read against.

:func:`shift_summary` assembles these once per result (``RunResult.shift``); every report states
it at the top when the sets are distinguishable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Folds of the shift classifier's cross-validation (fewer when a set is smaller).
CLASSIFIER_FOLDS = 5
#: Ridge penalty of the shift classifier, per standardized feature (λ = RIDGE · d).
RIDGE = 1.0


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC: P(pos > neg) + ½ P(pos = neg)."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def classifier_auc(member_features: np.ndarray, nonmember_features: np.ndarray, *, seed: int = 0) -> float | None:
    """Out-of-fold AUC of a ridge linear classifier telling members from non-members by their features.

    Features are standardized per dimension over both sets (label-free); the classifier is
    least squares on ±1 labels with an intercept and penalty ``RIDGE · d``, fitted on
    :data:`CLASSIFIER_FOLDS` stratified folds (seeded) and scored on the held-out fold, so every
    image is scored by a classifier that never saw it. 0.5 = no linear separation. None when a
    set has fewer than 2 images or there are no features.
    """
    m = np.asarray(member_features, dtype=np.float64)
    n = np.asarray(nonmember_features, dtype=np.float64)
    if m.ndim != 2 or n.ndim != 2 or m.shape[1] != n.shape[1] or m.shape[1] == 0 or min(len(m), len(n)) < 2:
        return None
    x = np.concatenate([m, n])
    std = x.std(axis=0)
    std[std == 0] = 1.0
    x = (x - x.mean(axis=0)) / std
    y = np.concatenate([np.ones(len(m)), -np.ones(len(n))])
    k = min(CLASSIFIER_FOLDS, len(m), len(n))
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for cls in (1.0, -1.0):
        idx = np.flatnonzero(y == cls)
        fold[rng.permutation(idx)] = np.arange(idx.size) % k
    scores = np.empty(len(y))
    lam = RIDGE * x.shape[1]
    for f in range(k):
        tr, te = fold != f, fold == f
        xt = x[tr]
        mu = xt.mean(axis=0)
        yc = y[tr] - y[tr].mean()
        xc = xt - mu
        # dual form: w = Xᵀ (X Xᵀ + λI)⁻¹ y, cheap when images < features
        alpha = np.linalg.solve(xc @ xc.T + lam * np.eye(len(xc)), yc)
        w = xc.T @ alpha
        scores[te] = (x[te] - mu) @ w
    return _auc(scores[y > 0], scores[y < 0])


def _reference_audit(audits: Sequence[Any]) -> Any:
    """The audit whose sets the diagnostic reads: the one labelled ``base``, else the first with membership."""
    with_mia = [a for a in audits if getattr(a, "membership", None) is not None]
    return next((a for a in with_mia if a.model.label == "base"), with_mia[0] if with_mia else None)


def shift_summary(audits: Sequence[Any]) -> dict[str, Any] | None:
    """The result's shift diagnostic (``RunResult.shift``): the latent test and shift classifier of the
    base's sets, the level, whether the sets are distinguishable, and the base's AUC per attack.

    None when no audit ran membership inference or its sets were not checked (``shift_check=False``).
    """
    from s2l_plugin.audit.mia.data import SHIFT_P_VALUE

    ref = _reference_audit(audits)
    if ref is None or not ref.membership.shift or ref.membership.shift.get("p_value") is None:
        return None
    test = ref.membership.shift
    is_base = ref.model.label == "base"
    return {
        "method": "permutation test of the mean pooled-VAE-latent distance; shift classifier: out-of-fold ridge linear classifier on the same latents",
        "level": SHIFT_P_VALUE,
        "p_value": test["p_value"],
        "n_perm": test.get("n_perm"),
        "mean_distance": test.get("mean_distance"),
        "null_mean_distance": test.get("null_mean_distance"),
        "classifier_auc": test.get("classifier_auc"),
        "distinguishable": bool(test["p_value"] < SHIFT_P_VALUE),
        "n_members": ref.membership.n_members,
        "n_nonmembers": ref.membership.n_nonmembers,
        # the base's AUC: the shift-plus-pretraining baseline (absent when no audit is the base)
        "base_auc": {a.attack: a.auc for a in ref.membership.attacks} if is_base else {},
        "base_auc_ci": {a.attack: list(a.auc_ci) for a in ref.membership.attacks} if is_base else {},
    }
