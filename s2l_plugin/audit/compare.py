"""Before/after comparisons: the S2L amplification numbers, from two audits on the same data.

Both audits must score the same member / non-member images with the same noise (the audit
engine derives every draw from the seed and the image index), so ΔAUC gets a *paired*
bootstrap interval. Extraction counts come with the number of generations behind them.
"""

from __future__ import annotations

from s2l_plugin.audit.metrics import fpr_resolvable, min_resolvable_fpr, paired_delta_auc
from s2l_plugin.errors import InputError
from s2l_plugin.result import AttackResult, AuditResult, Comparison


def _subset(scores: list[float], indices: list[int] | None) -> list[float]:
    return scores if indices is None else [scores[i] for i in indices]


def compare_attack(
    before: AttackResult,
    after: AttackResult,
    *,
    method: str,
    subset: str = "all",
    member_indices: list[int] | None = None,
    seed: int = 0,
) -> Comparison:
    """ΔAUC (after − before) of one attack with a paired bootstrap 95% interval.

    ``member_indices`` restricts the members (e.g. to the non-duplicated ones); the
    non-members are always all of them. Raises InputError when the two audits did not score
    the same images.
    """
    if before.member_ids != after.member_ids or before.nonmember_ids != after.nonmember_ids:
        raise InputError(f"attack {before.attack!r}: before and after audits scored different images; cannot pair them")
    delta = paired_delta_auc(
        _subset(before.member_scores, member_indices),
        before.nonmember_scores,
        _subset(after.member_scores, member_indices),
        after.nonmember_scores,
        seed=seed,
    )
    if subset == "all":
        tpr_before, tpr_after = before.tpr_at_1fpr, after.tpr_at_1fpr
    else:
        tpr_before = before.subsets.get(subset, {}).get("tpr_at_1fpr", float("nan"))
        tpr_after = after.subsets.get(subset, {}).get("tpr_at_1fpr", float("nan"))
    return Comparison(
        method=method,
        attack=before.attack,
        auc_before=delta.auc_before,
        auc_after=delta.auc_after,
        delta_auc=delta.delta,
        delta_auc_ci=list(delta.ci),
        tpr_at_1fpr_before=float(tpr_before),
        tpr_at_1fpr_after=float(tpr_after),
        subset=subset,
        min_resolvable_fpr=min_resolvable_fpr(len(before.nonmember_scores)),
        tpr_at_1fpr_resolvable=fpr_resolvable(0.01, len(before.nonmember_scores)),
    )


def compare_audits(
    before: AuditResult,
    after: AuditResult,
    *,
    method: str,
    member_groups: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> list[Comparison]:
    """One Comparison per attack both audits ran (and per member group), with extraction counts.

    Attacks that need a reference model (scored only on the fine-tuned model) have no
    "before" and are skipped here; their AUC stands on its own in the audit.
    """
    comparisons: list[Comparison] = []
    if before.membership is None or after.membership is None:
        return comparisons
    before_attacks = {a.attack: a for a in before.membership.attacks}
    groups: dict[str, list[int] | None] = {"all": None, **(member_groups or {})}
    for a_after in after.membership.attacks:
        a_before = before_attacks.get(a_after.attack)
        if a_before is None:
            continue
        for subset, indices in groups.items():
            comparisons.append(
                compare_attack(a_before, a_after, method=method, subset=subset, member_indices=indices, seed=seed)
            )
    if before.extraction is not None and after.extraction is not None:
        for c in comparisons:
            c.extracted_before = before.extraction.extracted_total
            c.extracted_after = after.extraction.extracted_total
            c.n_generations = after.extraction.n_generations
    return comparisons
