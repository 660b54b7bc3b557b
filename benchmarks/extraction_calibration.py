"""Calibrate the extraction thresholds and measure the memorization score on the testbed (16×16).

Builds (or reuses) a *contrast testbed*: the testbed recipe with duplicated members in only some
domains, each domain seen equally often in training (duplicated domains: ``singles`` members once
plus ``duplicated`` members ``copies`` times each; other domains: the same number of distinct
members, each once). Then it measures, with settings fixed in this file before looking:

1. **Real-image distances** (what δ must separate): each held-out non-member's normalized / tiled
   ℓ2 to its nearest member of the same domain (a *same-class neighbour*), each member's distance
   to its nearest *other* member, and the VAE round-trip distance of each duplicated member (the
   closest a generated copy can come through this VAE).
2. **Generations**: ``--n`` per domain prompt; each one's nearest member, and whether it is a
   duplicated one; extraction with members as references and with non-members as references.
3. **Memorization score** (Wen et al.) for every domain prompt; AUC of duplicated-domain prompts
   vs the others (higher score = more memorized).

    python benchmarks/extraction_calibration.py --out benchmarks/results/extraction_calibration.json
    python benchmarks/extraction_calibration.py --explore-memorization [--testbed DIR]

:func:`build_contrast_testbed` is the recipe's own :func:`s2l_plugin.testbed.build_testbed` with the
``duplicated_digits`` knob (docs/testbed.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: The contrast testbed (fixed before any measurement): even digits carry duplicated members.
#: Recipe knobs of the ``test`` preset; ``duplicated_digits`` keeps every domain's corpus at
#: ``members`` entries: a duplicated domain has 24 - 2 * 10 = 4 members seen once plus 2 seen 10 times.
CONTRAST = {
    "digits": (0, 1, 2, 3, 4, 5, 6, 7),
    "duplicated_digits": (0, 2, 4, 6),
    "members": 24,  # a domain's corpus size (distinct members of a domain without duplicates)
    "duplicated": 2,
    "copies": 10,
    "nonmembers": 10,
    "steps": 1600,
}


def build_contrast_testbed(out: str | Path, *, seed: int = 0, progress: bool = True, **overrides: Any):
    """Build (or load, when ``out`` already holds it) the contrast testbed of :data:`CONTRAST` (``overrides`` replace knobs)."""
    from s2l_plugin.testbed import Testbed, build_testbed

    out = Path(out)
    if (out / "manifest.json").exists():
        return Testbed.load(out)
    return build_testbed(preset="test", out=out, seed=seed, progress=progress, **{**CONTRAST, **overrides})


#: The sampler setting the calibration measures extraction at (the 16×16 testbed's: guidance 3.0 put
#: generations as close to the data as held-out images are; docs/extraction.md). The package's
#: defaults (s2l_plugin.defaults) are Stable Diffusion's 7.5 / 50.
CALIBRATION_GUIDANCE = 3.0
CALIBRATION_STEPS = 25


def contrast_cache_dir(**overrides: Any) -> Path:
    """Where the tests and this script cache the contrast testbed: keyed by the testbed sources and :data:`CONTRAST`."""
    import s2l_plugin.testbed as tb

    digest = hashlib.sha256(json.dumps({**CONTRAST, **overrides}, sort_keys=True, default=list).encode())
    for path in sorted(Path(tb.__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    root = Path(os.environ.get("S2L_TEST_CACHE", REPO / ".s2l-cache"))
    return root / f"testbed-contrast-{digest.hexdigest()[:16]}"


def _quantiles(values: Any) -> dict[str, float]:
    import torch

    v = torch.as_tensor(values, dtype=torch.float64)
    qs = {"min": v.min(), "p05": v.quantile(0.05), "median": v.median(), "p95": v.quantile(0.95), "max": v.max()}
    return {k: round(float(x), 4) for k, x in qs.items()}


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


def main() -> None:
    import torch

    from s2l_plugin.audit.distances import nearest
    from s2l_plugin.audit.extraction import (
        DEFAULT_CLIQUE_DELTA,
        DEFAULT_DELTA,
        DEFAULT_TILE,
        extract_from_generations,
        generate_for_prompt,
    )
    from s2l_plugin.audit.memorization import memorization_scores
    from s2l_plugin.data import load_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", default=None, help="contrast testbed folder (default: the test cache)")
    ap.add_argument("--n", type=int, default=64, help="generations per domain prompt")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/extraction_calibration.json"))
    ap.add_argument("--explore-memorization", action="store_true",
                    help="only the memorization AUC for (n, steps) in (4,1), (8,1), (8,10) (exploratory, post hoc)")
    args = ap.parse_args()
    if args.explore_memorization:
        tb = build_contrast_testbed(args.testbed or contrast_cache_dir())
        pipe = tb.load_pipeline()
        dup = {d.prompt for d in tb.domains if tb.duplicates(d)}
        out = {}
        for n, steps in ((4, 1), (8, 1), (8, 10)):
            r = memorization_scores(pipe, [d.prompt for d in tb.domains], n=n, steps=steps, progress=False)
            out[f"n={n}, first {steps} step(s)"] = auc([s.score for s in r.scores if s.prompt in dup],
                                                      [s.score for s in r.scores if s.prompt not in dup])
        print(json.dumps(out, indent=1))
        return

    t0 = time.perf_counter()
    tb = build_contrast_testbed(args.testbed or contrast_cache_dir())
    pipe = tb.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    report: dict[str, Any] = {"testbed": str(tb.path), "contrast": {k: list(v) if isinstance(v, tuple) else v for k, v in CONTRAST.items()},
                              "build": tb.build_info.get("seconds"), "unet_loss": tb.build_info.get("unet")}

    # 1. Real-image distances.
    real: dict[str, list[float]] = {"nonmember_to_member_l2": [], "nonmember_to_member_tiled": [],
                                    "member_to_other_member_l2": [], "member_to_other_member_tiled": [],
                                    "duplicate_vae_roundtrip_l2": [], "duplicate_vae_roundtrip_tiled": []}
    for d in tb.domains:
        mem = load_images(tb.members(d), 16)
        non = load_images(tb.nonmembers(d), 16)
        for metric in ("l2", "tiled"):
            dist, _ = nearest(non, mem, metric=metric, tile=DEFAULT_TILE)
            real[f"nonmember_to_member_{metric}"] += dist.tolist()
            for i in range(len(mem)):
                others = torch.cat([mem[:i], mem[i + 1 :]])
                real[f"member_to_other_member_{metric}"].append(float(nearest(mem[i : i + 1], others, metric=metric, tile=DEFAULT_TILE)[0]))
        dups = tb.duplicates(d)
        if dups:
            x = load_images(dups, 16)
            with torch.no_grad():
                rt = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            for metric in ("l2", "tiled"):
                from s2l_plugin.audit.distances import pairwise_distances

                real[f"duplicate_vae_roundtrip_{metric}"] += pairwise_distances(x, rt, metric=metric, tile=DEFAULT_TILE).diagonal().tolist()
    report["real_distances"] = {k: _quantiles(v) for k, v in real.items()}

    # 2. Generations: extraction against members and against non-members.
    per_domain = {}
    gen_to_dup, gen_to_single = [], []
    for d in tb.domains:
        members = tb.members(d)
        refs = load_images(members, 16)
        ids = [s.path.name for s in members]
        dup_ids = {s.path.name for s in tb.duplicates(d)}
        gens, seeds = generate_for_prompt(pipe, d.prompt, args.n, guidance_scale=CALIBRATION_GUIDANCE,
                                          num_inference_steps=CALIBRATION_STEPS, progress=False)
        res = extract_from_generations({d.prompt: gens}, {d.prompt: seeds}, refs, reference_ids=ids)
        res_non = extract_from_generations({d.prompt: gens}, {d.prompt: seeds}, load_images(tb.nonmembers(d), 16),
                                           reference_ids=[s.path.name for s in tb.nonmembers(d)])
        for m in res.matches:
            (gen_to_dup if m.reference_id in dup_ids else gen_to_single).append(m.distance_l2)
        found = set(res.params["extracted_ids"][d.prompt])
        print(f"{d.name}: extracted {sorted(found)}, candidates {len(res.candidates)}", file=sys.stderr, flush=True)
        per_domain[d.name] = {
            "has_duplicates": bool(dup_ids),
            "extracted_members": len(found),
            "extracted_duplicated": len(found & dup_ids),
            "duplicated": len(dup_ids),
            "extracted_from_nonmembers": res_non.extracted_total,
            "candidates": len(res.candidates),
            "median_l2_to_nearest_member": round(float(torch.tensor([m.distance_l2 for m in res.matches]).median()), 4),
            "median_l2_to_nearest_nonmember": round(float(torch.tensor([m.distance_l2 for m in res_non.matches]).median()), 4),
        }
    report["generations"] = {
        "n_per_prompt": args.n, "delta": DEFAULT_DELTA, "clique_delta": DEFAULT_CLIQUE_DELTA, "tile": DEFAULT_TILE,
        "guidance_scale": CALIBRATION_GUIDANCE, "num_inference_steps": CALIBRATION_STEPS,
        "nearest_is_duplicated_l2": _quantiles(gen_to_dup) if gen_to_dup else None,
        "nearest_is_single_l2": _quantiles(gen_to_single) if gen_to_single else None,
        "per_domain": per_domain,
    }

    # 3. Memorization score.
    mem = memorization_scores(pipe, [d.prompt for d in tb.domains], progress=False)
    has_dup = {d.prompt: bool(tb.duplicates(d)) for d in tb.domains}
    pos = [s.score for s in mem.scores if has_dup[s.prompt]]
    neg = [s.score for s in mem.scores if not has_dup[s.prompt]]
    report["memorization"] = {"scores": {s.prompt: round(s.score, 4) for s in mem.scores}, "auc": auc(pos, neg),
                              "n": mem.n_generations, "steps": mem.steps, **mem.params}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
