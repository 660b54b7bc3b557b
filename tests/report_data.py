"""A realistic stored S2L result for the report tests, with every metric computed from its scores.

Scores are seeded draws (members shifted up, as a leaking model's loss-attack scores are, the
duplicated members most; the fine-tuned model's scores are the base's plus a member-only shift
and noise, so before/after is paired). Every metric, interval and comparison comes from
s2l_plugin.audit.metrics / s2l_plugin.audit.compare, as the audit computes them. Extraction
"generations" are the testbed corpus's digits (scikit-learn's load_digits, 16x16 RGB) plus
noise, matched by s2l_plugin.audit.distances and drawn by s2l_plugin.audit.grids. Nothing in a report test may hard-code a number this builds:
the tests read them back from result.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from s2l_plugin.audit.compare import compare_attack
from s2l_plugin.result import (
    AttackResult,
    AuditResult,
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


DUPLICATED = list(range(8))  # members the testbed duplicates: memorized before any fine-tuning
SUBSET_KEYS = ("auc", "auc_ci", "tpr_at_1fpr", "tpr_at_1fpr_ci", "tpr_at_01fpr", "asr", "advantage")


def _attack(name: str, member: np.ndarray, nonmember: np.ndarray, seed: int, groups: dict[str, list[int]] | None = None) -> AttackResult:
    """An AttackResult with every metric from s2l_plugin.audit.metrics, as the MIA engine stores it;
    ``groups`` (default: the duplicated members) are its named member subsets."""
    from s2l_plugin.audit.metrics import membership_metrics

    subsets = {}
    for subset, indices in (groups or {"duplicated": DUPLICATED}).items():
        sub = membership_metrics(member[indices], nonmember, n_boot=N_BOOT, seed=seed)
        subsets[subset] = {"member_indices": indices, **{k: sub[k] for k in SUBSET_KEYS}}
    return AttackResult(
        attack=name,
        member_ids=[f"digit-7/member-{i:03d}" for i in range(N_MEMBERS)],
        nonmember_ids=[f"digit-7/heldout-{i:03d}" for i in range(N_NONMEMBERS)],
        member_scores=member.tolist(),
        nonmember_scores=nonmember.tolist(),
        params={"timesteps": [50, 100, 200, 300], "noise_draws": 4},
        unet_calls_per_image=16,
        subsets=subsets,
        **membership_metrics(member, nonmember, n_boot=N_BOOT, seed=seed),
    )


def _digits() -> np.ndarray:
    """The corpus images: load_digits upscaled to 16x16 RGB in [-1, 1], shape (N, 16, 16, 3)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    sevens = d.images[d.target == 7][:20] / 16.0
    up = np.kron(sevens, np.ones((2, 2)))  # 8x8 -> 16x16
    return np.repeat(up[..., None], 3, axis=-1) * 2 - 1


def _extraction(label: str, noise: float, rng: np.random.Generator, out_dir: Path) -> ExtractionResult:
    """Noisy copies of corpus digits as generations, matched by s2l_plugin.audit.distances, gridded by audit.grids."""
    import torch

    from s2l_plugin.audit.distances import pairwise_distances
    from s2l_plugin.audit.grids import save_grid

    refs = _digits()
    n_gen, delta, tile = 16, 0.15, 4
    picks = rng.integers(0, len(refs), n_gen)
    scale = noise * rng.uniform(0.5, 1.5, (n_gen, 1, 1, 1))  # some generations near-copies, some not
    gens = np.clip(refs[picks] + rng.normal(0, 1, refs[picks].shape) * scale, -1, 1)
    gens_t = torch.from_numpy(gens).permute(0, 3, 1, 2).float()
    refs_t = torch.from_numpy(refs).permute(0, 3, 1, 2).float()
    l2 = pairwise_distances(gens_t, refs_t, metric="l2")
    tiled = pairwise_distances(gens_t, refs_t, metric="tiled", tile=tile)
    ref_ids = [f"digit-7/member-{j:03d}" for j in range(len(refs))]
    matches = []
    for g in range(n_gen):
        j = int(l2[g].argmin())
        matches.append(
            ExtractionMatch(
                prompt="digit seven", generation_index=g, seed=1000 + g, reference_id=ref_ids[j],
                distance_l2=float(l2[g, j]), distance_tiled=float(tiled[g, j]), extracted=bool(l2[g, j] < delta),
                clique_size=1 + g % 3,
            )
        )
    grid_rel = f"grids/{label}.png"
    closest = sorted(matches, key=lambda m: m.distance_l2)[:8]
    save_grid(closest, {"digit seven": gens_t}, dict(zip(ref_ids, refs_t, strict=True)), out_dir / grid_rel)
    extracted_refs = {m.reference_id for m in matches if m.extracted}
    return ExtractionResult(
        prompts=["digit seven"], n_per_prompt=n_gen, n_generations=n_gen, delta=delta, tile=tile, clique_k=3, base_seed=1000,
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
        m0[DUPLICATED] += 1.5
        n0 = rng.normal(0, 1, N_NONMEMBERS)
        m1 = m0 + moved + rng.normal(0, 0.3, N_MEMBERS)
        n1 = n0 + rng.normal(0, 0.3, N_NONMEMBERS)
        before, after = _attack(attack, m0, n0, seed), _attack(attack, m1, n1, seed)
        audits["base"].membership.attacks.append(before)
        audits["lora"].membership.attacks.append(after)
        comparisons.append(compare_attack(before, after, method="lora", seed=seed))
        if attack == "loss":
            comparisons.append(
                compare_attack(before, after, method="lora", subset="duplicated", member_indices=DUPLICATED, seed=seed)
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
