"""Per-image and dataset-level membership verdicts without member labels (``s2l audit --query``).

The user has candidate images (``--query``) and a *null*: images known not to be in the
checkpoint's training set (``--nonmembers``). Every image, query and null alike, is scored once
with one attack (higher = member) on the same per-image noise scheme, so a query image that was
not trained on is exchangeable with the null images and its rank among them is uniform.

- Per image: the empirical p-value ``p = (1 + #{null scores >= query score}) / (1 + n_null)``,
  one-sided (a member scores high). Under "not a member" and exchangeability,
  ``P(p <= a) <= a`` for every ``a``: it is calibrated by construction; what the attack decides
  is the *power*. The smallest p-value the null can give is ``1 / (1 + n_null)``.
- For the set: one-sided Mann-Whitney U of the query scores against the null scores (the
  rank-sum form of a permutation test, in the spirit of CDI, arXiv 2411.12858): small p when the
  queries as a group score above the null. Exact when small and untied, normal approximation
  with tie correction otherwise (scipy).

Default statistic: ``reference`` (L_base − L_target, the loss calibrated by the base) when the
base is at hand, else ``loss``. Measured on the ``test`` testbed with a LoRA trained on 40
held-out images (docs/audit.md, "Were my images used?"): it had the highest power at p < 0.05.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from s2l_plugin.errors import ConfigError

#: the level a per-image verdict and the dataset test are read at
ALPHA = 0.05
#: the default per-image statistic with a base model / without one
DEFAULT_QUERY_ATTACK = "reference"
FALLBACK_QUERY_ATTACK = "loss"
#: noise role of query images (members 0, non-members / null 1 as in the MIA engine)
QUERY_ROLE = 2
#: what the dataset test does and does not establish (reports print it beside the p-value)
DATASET_STATEMENT = (
    "A small p-value says these images, as a set, score higher under this checkpoint than the null images "
    "do, as training images would; it does not say which images were used, and it is only as sound as "
    "the null: null images from another distribution than the queries can produce it without any training."
)


def empirical_p_values(query_scores: Sequence[float], null_scores: Sequence[float]) -> np.ndarray:
    """One-sided p-value of each query score against the null: ``(1 + #{null >= q}) / (1 + n_null)``."""
    q = np.asarray(query_scores, dtype=np.float64).reshape(-1)
    n = np.asarray(null_scores, dtype=np.float64).reshape(-1)
    if n.size == 0:
        raise ConfigError("per-image p-values need a null; expected at least one non-member score")
    return (1.0 + (n[None, :] >= q[:, None]).sum(axis=1)) / (1.0 + n.size)


def dataset_test(query_scores: Sequence[float], null_scores: Sequence[float], *, alpha: float = ALPHA) -> dict[str, Any]:
    """One-sided Mann-Whitney U test of "the query set scores higher than the null" (one p-value for the set).

    Returns ``test``, ``n_query``, ``n_null``, ``u`` (query-vs-null U), ``auc`` (U / (n_query·n_null):
    the chance a query image outscores a null image), ``p_value``, ``alpha``, ``significant`` and
    ``statement`` (what it does and does not establish).
    """
    from scipy.stats import mannwhitneyu

    q = np.asarray(query_scores, dtype=np.float64).reshape(-1)
    n = np.asarray(null_scores, dtype=np.float64).reshape(-1)
    if q.size == 0 or n.size == 0:
        raise ConfigError("the dataset test needs query and null scores; expected at least one of each")
    res = mannwhitneyu(q, n, alternative="greater", method="auto")
    p = float(res.pvalue)
    return {
        "test": "one-sided Mann-Whitney U (query > null)",
        "n_query": int(q.size),
        "n_null": int(n.size),
        "u": float(res.statistic),
        "auc": float(res.statistic) / float(q.size * n.size),
        "p_value": p,
        "alpha": float(alpha),
        "significant": bool(p < alpha),
        "statement": DATASET_STATEMENT,
    }


def query_attack(attack: str | None, *, has_reference: bool) -> str:
    """The per-image statistic: ``attack`` when given, else ``reference`` with a base, else ``loss``."""
    if attack is None:
        return DEFAULT_QUERY_ATTACK if has_reference else FALLBACK_QUERY_ATTACK
    return attack


def query_result(
    attack: str,
    query_ids: Sequence[str],
    query_scores: Sequence[float],
    null_ids: Sequence[str],
    null_scores: Sequence[float],
    *,
    alpha: float = ALPHA,
    shift: dict[str, Any] | None = None,
) -> Any:
    """A :class:`~s2l_plugin.result.QueryResult` from scores already computed (per-image p-values and the dataset test)."""
    from s2l_plugin.result import QueryImage, QueryResult

    p = empirical_p_values(query_scores, null_scores)
    images = [QueryImage(id=str(i), score=float(s), p_value=float(v)) for i, s, v in zip(query_ids, query_scores, p, strict=True)]
    return QueryResult(
        attack=attack,
        statistic=f"{attack} score (higher = member); p = (1 + #null >= score) / (1 + n_null), one-sided",
        alpha=float(alpha),
        min_p_value=1.0 / (1.0 + len(null_scores)),
        images=images,
        null_ids=[str(i) for i in null_ids],
        null_scores=[float(s) for s in null_scores],
        dataset=dataset_test(query_scores, null_scores, alpha=alpha),
        shift=shift,
    )


def score_query_and_null(
    target: Any, query: Any, null: Any, attack: str, *, reference: Any = None, seed: int = 0, pm: Any = None,
    progress: bool = True,
) -> tuple[list[str], np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Score the query and null images on ``target`` with one attack: ``(query_ids, query_scores, null_ids, null_scores, features)``.

    Null image ``i`` gets the noise a non-member ``i`` gets in the MIA engine; query image ``i``
    its own (role :data:`QUERY_ROLE`). ``features`` are the pooled latents (query rows first) for
    the shift diagnostic.
    """
    from s2l_plugin.audit.mia.data import resolve_images
    from s2l_plugin.audit.mia.engine import NONMEMBER, DiffusionModel, resolve_attacks, score_shard

    query_recs = _query_records(query)
    null_recs = resolve_images(null, what="null (non-member) images")
    attacks = resolve_attacks([attack], has_reference=reference is not None, pm=pm)
    items = [((QUERY_ROLE, i), r) for i, r in enumerate(query_recs)] + [((NONMEMBER, i), r) for i, r in enumerate(null_recs)]
    part = score_shard(target, items, attacks, reference=reference, seed=seed, shard=(0, 1),
                       resolution=DiffusionModel(target).resolution, progress=progress)
    keys = np.asarray(part.keys, dtype=np.int64).reshape(-1, 2)
    scores = part.scores[attacks[0].name]
    qmask = keys[:, 0] == QUERY_ROLE
    q_order = np.argsort(keys[qmask, 1], kind="stable")
    n_order = np.argsort(keys[~qmask, 1], kind="stable")
    feats = part.features
    features = np.concatenate([feats[qmask][q_order], feats[~qmask][n_order]]) if feats.size else feats
    return ([str(r.path) for r in query_recs], scores[qmask][q_order], [str(r.path) for r in null_recs],
            scores[~qmask][n_order], features)


def _query_records(spec: Any) -> list[Any]:
    """The query images: one image file (its caption from a sidecar .txt or its folder's metadata.jsonl),
    a folder (one image is enough), or a list as the MIA engine takes it."""
    from pathlib import Path

    from s2l_plugin.audit.mia.data import resolve_images
    from s2l_plugin.data import list_image_folder

    if not isinstance(spec, (str, Path)):
        items = list(spec)
        # one image is a valid query; the MIA engine's reader wants two, so read it twice and keep one
        recs = resolve_images(items * 2 if len(items) == 1 else items, what="query images")
        return recs[:1] if len(items) == 1 else recs
    path = Path(spec)
    if path.is_file():
        recs = [r for r in list_image_folder(path.parent) if Path(r.path).name == path.name]
    elif path.is_dir():
        recs = list_image_folder(path)
    else:
        raise ConfigError(f"--query {str(path)!r} does not exist; expected an image file or a folder of images")
    if not recs:
        raise ConfigError(f"--query {str(path)!r} holds no readable image; expected a .png/.jpg file or a folder of them")
    return recs


def query_audit(
    target: Any, query: Any, null: Any, *, reference: Any = None, attack: str | None = None, seed: int = 0,
    alpha: float = ALPHA, pm: Any = None, progress: bool = True,
) -> Any:
    """Score ``query`` (an image or a folder) and ``null`` (a folder of non-members) on ``target`` and
    return the :class:`~s2l_plugin.result.QueryResult`: per-image p-values, the dataset test and the
    query-vs-null latent shift diagnostic (the same test the MIA engine runs on members vs non-members)."""
    from s2l_plugin.audit.mia.data import latent_shift

    name = query_attack(attack, has_reference=reference is not None)
    q_ids, q_scores, n_ids, n_scores, features = score_query_and_null(
        target, query, null, name, reference=reference, seed=seed, pm=pm, progress=progress)
    shift = None
    if len(q_ids) >= 2 and features.size:
        shift = latent_shift(features[: len(q_ids)], features[len(q_ids):], seed=seed)
    return query_result(name, q_ids, q_scores, n_ids, n_scores, alpha=alpha, shift=shift)
