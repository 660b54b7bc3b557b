"""A realistic stored S2L result for the report tests, with every metric computed from its scores.

Scores are seeded draws (members shifted up, as a leaking model's loss-attack scores are; the
fine-tuned model's scores are the base's plus a member-only shift and noise, so before/after is
paired). Metrics come from scikit-learn; intervals from a seeded paired bootstrap. Extraction
"generations" are the testbed corpus's digits (scikit-learn's load_digits, 16x16 RGB) plus
noise, matched by normalized ℓ2. Nothing in a report test may hard-code a number this builds:
the tests read them back from result.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from s2l_plugin.report.result import (
    AttackResult,
    AuditResult,
    Comparison,
    ExtractionMatch,
    ExtractionResult,
    MembershipResult,
    MemorizationResult,
    MemorizationScore,
    MetadataFinding,
    ModelIdentity,
    RunResult,
    save_result,
)

N_MEMBERS = 40
N_NONMEMBERS = 40
N_BOOT = 200


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """TPR at the last ROC point with FPR <= target."""
    return float(tpr[fpr <= target].max()) if np.any(fpr <= target) else 0.0


def _metrics(member: np.ndarray, nonmember: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
    s = np.r_[member, nonmember]
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auc": float(roc_auc_score(y, s)),
        "tpr_at_1fpr": _tpr_at(fpr, tpr, 0.01),
        "tpr_at_01fpr": _tpr_at(fpr, tpr, 0.001),
        "asr": float(np.max(1 - (fpr + (1 - tpr)) / 2)),
        "advantage": float(np.max(np.abs(tpr - fpr))),
        "roc_fpr": fpr.tolist(),
        "roc_tpr": tpr.tolist(),
    }


def _auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """Exact AUC (Mann-Whitney): P(member score > non-member score), ties count half."""
    diff = member[:, None] - nonmember[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _tpr_at_fast(member: np.ndarray, nonmember: np.ndarray, target: float) -> float:
    """TPR at the strictest threshold allowing at most floor(target * n) false positives."""
    k = int(np.floor(target * len(nonmember)))
    threshold = np.sort(nonmember)[::-1][k]
    return float((member > threshold).mean())


def _bootstrap(rng: np.random.Generator, pairs: list[tuple[np.ndarray, np.ndarray]], stat) -> list[float]:
    """95% percentile interval of ``stat`` over joint resamples of members and non-members (paired across models)."""
    values = []
    for _ in range(N_BOOT):
        mi = rng.integers(0, N_MEMBERS, N_MEMBERS)
        ni = rng.integers(0, N_NONMEMBERS, N_NONMEMBERS)
        values.append(stat(*[(m[mi], n[ni]) for m, n in pairs]))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _attack(name: str, member: np.ndarray, nonmember: np.ndarray, rng: np.random.Generator) -> AttackResult:
    m = _metrics(member, nonmember)
    return AttackResult(
        attack=name,
        member_ids=[f"digit-7/member-{i:03d}" for i in range(N_MEMBERS)],
        nonmember_ids=[f"digit-7/heldout-{i:03d}" for i in range(N_NONMEMBERS)],
        member_scores=member.tolist(),
        nonmember_scores=nonmember.tolist(),
        auc=m["auc"],
        auc_ci=_bootstrap(rng, [(member, nonmember)], lambda p: _auc(*p)),
        tpr_at_1fpr=m["tpr_at_1fpr"],
        tpr_at_1fpr_ci=_bootstrap(rng, [(member, nonmember)], lambda p: _tpr_at_fast(*p, 0.01)),
        tpr_at_01fpr=m["tpr_at_01fpr"],
        asr=m["asr"],
        advantage=m["advantage"],
        roc_fpr=m["roc_fpr"],
        roc_tpr=m["roc_tpr"],
        params={"timesteps": [50, 100, 200, 300], "noise_draws": 4},
        unet_calls_per_image=16,
    )


def _digits() -> np.ndarray:
    """The corpus images: load_digits upscaled to 16x16 RGB in [-1, 1], shape (N, 16, 16, 3)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    sevens = d.images[d.target == 7][:20] / 16.0
    up = np.kron(sevens, np.ones((2, 2)))  # 8x8 -> 16x16
    return np.repeat(up[..., None], 3, axis=-1) * 2 - 1


def _extraction(label: str, noise: float, rng: np.random.Generator, out_dir: Path) -> ExtractionResult:
    from s2l_plugin.report.plots import match_grid_png

    refs = _digits()
    n_gen = 16
    picks = rng.integers(0, len(refs), n_gen)
    scale = noise * rng.uniform(0.5, 1.5, (n_gen, 1, 1, 1))  # some generations near-copies, some not
    gens = np.clip(refs[picks] + rng.normal(0, 1, refs[picks].shape) * scale, -1, 1)
    delta = 0.15
    matches = []
    for g, gen in enumerate(gens):
        d = np.sqrt(((refs - gen) ** 2).reshape(len(refs), -1).mean(axis=1))
        j = int(d.argmin())
        matches.append(
            ExtractionMatch(
                prompt="digit seven", generation_index=g, seed=1000 + g, reference_id=f"digit-7/member-{j:03d}",
                distance_l2=float(d[j]), distance_tiled=float(d[j] * 0.9), extracted=bool(d[j] < delta), clique_size=1 + g % 3,
            )
        )
    order = sorted(range(n_gen), key=lambda g: matches[g].distance_l2)[:8]
    grid_rel = f"grids/{label}.png"
    match_grid_png(
        [(gens[g], refs[int(matches[g].reference_id.rsplit('-', 1)[1])], matches[g].distance_l2, f"gen {g}") for g in order],
        out_dir / grid_rel,
    )
    extracted_refs = {m.reference_id for m in matches if m.extracted}
    return ExtractionResult(
        prompts=["digit seven"], n_per_prompt=n_gen, n_generations=n_gen, delta=delta, tile=4, clique_k=3, base_seed=1000,
        candidates=[m for m in matches if m.clique_size >= 3], matches=matches,
        extracted_unique={"digit seven": len(extracted_refs)}, extracted_total=len(extracted_refs),
        extraction_rate=sum(m.extracted for m in matches) / n_gen, n_references=len(refs), grid_png=grid_rel,
    )


def build_run_result(out_dir: str | Path, *, seed: int = 0, shift: float = 0.6) -> Path:
    """Save a two-model (base, lora) S2L result with loss and secmi attacks into ``out_dir``; returns result.json.

    ``shift``: how far the fine-tuned model's member scores move up (the S2L effect simulated).
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    audits = {"base": AuditResult(ModelIdentity("base", "testbed/test", None, "ab" * 32)),
              "lora": AuditResult(ModelIdentity("lora", "runs/lora/pytorch_lora_weights.safetensors", "lora", "cd" * 32))}
    for label in audits:
        audits[label].membership = MembershipResult(attacks=[], n_members=N_MEMBERS, n_nonmembers=N_NONMEMBERS, seed=seed)
    comparisons = []
    # secmi barely moves: a comparison whose interval should include 0, beside one that should not.
    for attack, signal, moved in (("loss", 0.35, shift), ("secmi", 0.1, shift * 0.1)):
        m0 = rng.normal(signal, 1, N_MEMBERS)
        n0 = rng.normal(0, 1, N_NONMEMBERS)
        m1 = m0 + moved + rng.normal(0, 0.3, N_MEMBERS)
        n1 = n0 + rng.normal(0, 0.3, N_NONMEMBERS)
        before, after = _attack(attack, m0, n0, rng), _attack(attack, m1, n1, rng)
        audits["base"].membership.attacks.append(before)
        audits["lora"].membership.attacks.append(after)
        comparisons.append(
            Comparison(
                method="lora", attack=attack, auc_before=before.auc, auc_after=after.auc, delta_auc=after.auc - before.auc,
                delta_auc_ci=_bootstrap(rng, [(m0, n0), (m1, n1)], lambda b, a: _auc(*a) - _auc(*b)),
                tpr_at_1fpr_before=before.tpr_at_1fpr, tpr_at_1fpr_after=after.tpr_at_1fpr,
            )
        )
    for label, noise in (("base", 0.35), ("lora", 0.17)):
        audits[label].extraction = _extraction(label, noise, rng, out_dir)
        audits[label].memorization = MemorizationResult(
            scores=[MemorizationScore(p, float(rng.gamma(2.0, 0.5))) for p in ("digit seven", "digit 7 on white")], steps=1, n_generations=4
        )
    for c in comparisons:
        c.extracted_before = audits["base"].extraction.extracted_total
        c.extracted_after = audits["lora"].extraction.extracted_total
        c.n_generations = audits["lora"].extraction.n_generations
    audits["lora"].findings = [
        MetadataFinding("ss_dataset_dirs", "high", "training folder names reveal the data set", '{"50_digit seven": {"n_repeats": 50}}'),
        MetadataFinding("ss_seed", "info", "training seed recorded", "1234"),
    ]
    result = RunResult(
        kind="run",
        audits=list(audits.values()),
        comparisons=comparisons,
        config={"domain": "digit seven", "methods": ["lora"], "lora": {"rank": 4, "lr": 1e-5, "steps": 300}},
        versions={"s2l-plugin": "0.1.0", "torch": "2.13.0", "diffusers": "0.42.1"},
        seeds={"audit": seed, "generation": 1000},
        warnings=["fixture: scores are seeded draws, not a trained model's"],
        created="2026-11-28T08:00:00+00:00",
    )
    return save_result(result, out_dir)
