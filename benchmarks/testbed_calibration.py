"""Calibration of a testbed: pretraining memorization (loss-attack AUC) and sample fidelity.

Reproduces the numbers in docs/testbed.md::

    python benchmarks/testbed_calibration.py                     # the shipped demo testbed
    python benchmarks/testbed_calibration.py --build /tmp/demo   # rebuild the demo preset first, then measure

Memorization: a plain loss attack. Each image is encoded by the testbed VAE (posterior mean x
scaling factor), noised at every t in --timesteps with --draws fixed Gaussian draws (drawn once
from --seed, in manifest order, the same draws at every t), and scored by minus the mean epsilon
MSE of the UNet conditioned on the image's own caption (higher score = more member-like). AUC
of members vs held-out non-members with a 95% percentile bootstrap interval (members and
non-members resampled separately), overall, per domain, and for duplicated / non-duplicated
members. This scorer is deliberately small and local to this script; the project's attacks
live in s2l_plugin/audit/mia/ (LossAttack) and the calibration can switch to them.

Fidelity: per domain, --n-gen generations of the domain prompt with the S2L generation defaults
(guidance 7.5, the pipeline's DDIM scheduler with the SD-like config, 50 steps), each compared to
its nearest real member of the domain by normalized l2 (||a-b||_2 / sqrt(#values), pixels in
[-1, 1]); the same for every held-out image of the domain. Target: median(generations) <=
1.5 x median(held-out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def load_images(paths: list[Path]):
    """PNG files as float32 tensor [N, 3, H, W] in [-1, 1]."""
    import torch
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in paths]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def loss_scores(pipe, images, captions: list[str], timesteps: list[int], draws: int, seed: int, batch: int = 100) -> np.ndarray:
    """Per-image loss-attack score: minus the mean epsilon-MSE over timesteps x draws (higher = member-like)."""
    import torch
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn((len(images), draws, *latents.shape[1:]), generator=gen)
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        losses = torch.zeros(len(images))
        for start in range(0, len(images), batch):
            sl = slice(start, start + batch)
            hidden = pipe.text_encoder(ids[sl])[0]
            total = torch.zeros(hidden.shape[0])
            for t in timesteps:
                for d in range(draws):
                    eps = noise[sl, d]
                    tt = torch.full((hidden.shape[0],), t, dtype=torch.long)
                    pred = pipe.unet(sched.add_noise(latents[sl], eps, tt), tt, hidden).sample
                    total += (pred - eps).pow(2).flatten(1).mean(1)
            losses[sl] = total / (len(timesteps) * draws)
    return -losses.numpy()


def auc_row(name: str, members: np.ndarray, nonmembers: np.ndarray, n_boot: int, seed: int) -> dict:
    from s2l_plugin.audit.metrics import bootstrap_ci, roc_auc

    low, high = bootstrap_ci(members, nonmembers, lambda m, n: roc_auc(m, n), n_boot=n_boot, seed=seed)
    return {"subset": name, "n_members": int(members.size), "n_nonmembers": int(nonmembers.size),
            "auc": roc_auc(members, nonmembers), "ci95": [low, high]}


def measure_memorization(tb, pipe, timesteps, draws, seed, n_boot) -> dict:
    samples = tb.samples()
    images = load_images([s.path for s in samples])
    scores = loss_scores(pipe, images, [s.caption for s in samples], timesteps, draws, seed)
    role = np.array([s.role for s in samples])
    dom = np.array([s.domain for s in samples])
    rows = []

    def add(name, mask_m, mask_n):
        rows.append(auc_row(name, scores[mask_m], scores[mask_n], n_boot, seed))

    member, non, dup = role != "nonmember", role == "nonmember", role == "duplicated"
    add("all domains: members vs non-members", member, non)
    add("all domains: duplicated vs non-members", dup, non)
    add("all domains: non-duplicated members vs non-members", role == "member", non)
    for d in tb.domains:
        here = dom == d.name
        add(f"{d.name}: members vs non-members", member & here, non & here)
        add(f"{d.name}: duplicated vs non-members", dup & here, non & here)
        add(f"{d.name}: non-duplicated vs non-members", (role == "member") & here, non & here)
    return {"timesteps": list(timesteps), "draws": draws, "seed": seed, "n_boot": n_boot, "rows": rows}


def measure_fidelity(tb, pipe, n_gen, steps, guidance, seed, threshold=0.15) -> dict:
    import torch

    from s2l_plugin.audit.distances import nearest

    per_domain, gen_all, held_all = [], [], []
    for k, d in enumerate(tb.domains):
        mem_samples = tb.members(d)
        members = load_images([s.path for s in mem_samples])
        held = load_images([s.path for s in tb.nonmembers(d)])
        out = pipe(d.prompt, num_images_per_prompt=n_gen, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed * 1000 + k), output_type="np")
        gens = torch.from_numpy(out.images).permute(0, 3, 1, 2).float() * 2.0 - 1.0
        g_dist, g_idx = nearest(gens, members)
        h_dist, _ = nearest(held, members)
        close = g_dist <= threshold
        hit = sorted({int(i) for i in g_idx[close]})
        per_domain.append({
            "domain": d.name,
            "gen_median": float(g_dist.median()), "heldout_median": float(h_dist.median()),
            "gen_within_threshold": int(close.sum()),
            "unique_members_within_threshold": len(hit),
            "of_which_duplicated": sum(mem_samples[i].role == "duplicated" for i in hit),
        })
        gen_all.append(g_dist.numpy())
        held_all.append(h_dist.numpy())
    g, h = np.concatenate(gen_all), np.concatenate(held_all)
    return {"n_gen_per_domain": n_gen, "steps": steps, "guidance": guidance, "seed": seed, "threshold": threshold,
            "gen_median": float(np.median(g)), "heldout_median": float(np.median(h)),
            "ratio": float(np.median(g) / np.median(h)), "per_domain": per_domain}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testbed", type=Path, default=None, help="testbed folder (default: the shipped demo)")
    p.add_argument("--build", type=Path, default=None, help="first build the demo preset (seed --build-seed) into this folder")
    p.add_argument("--build-seed", type=int, default=0)
    p.add_argument("--set", dest="knobs", action="append", default=[], metavar="KNOB=VALUE",
                   help="with --build: override a demo recipe knob (as `s2l testbed build --set`)")
    p.add_argument("--timesteps", default="50,100,200,300")
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--n-gen", type=int, default=50, help="generations per domain for fidelity")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (S2L generation default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (S2L generation default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack's noise draws and of the generations")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/testbed_calibration.json"))
    args = p.parse_args(argv)

    import torch

    from s2l_plugin.testbed import Testbed, build_testbed

    torch.set_num_threads(args.threads)
    result: dict = {"command": "python benchmarks/testbed_calibration.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.build is not None:
        t0, c0 = time.perf_counter(), time.process_time()
        from s2l_plugin.commands.testbed import _parse_knobs

        knobs = _parse_knobs([tuple(k.split("=", 1)) for k in args.knobs])
        tb = build_testbed("demo", out=args.build, seed=args.build_seed, overwrite=True, **knobs)
        result["build"] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    else:
        tb = Testbed.load(args.testbed)
    result["testbed"] = {"path": str(tb.path), "preset": tb.preset, "seed": tb.seed,
                         "pipeline_hash": tb.build_info.get("pipeline_hash"), "build_seconds": tb.build_info.get("seconds")}
    pipe = tb.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    timesteps = [int(t) for t in args.timesteps.split(",")]
    result["memorization"] = measure_memorization(tb, pipe, timesteps, args.draws, args.seed, args.n_boot)
    result["memorization"]["seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result["fidelity"] = measure_fidelity(tb, pipe, args.n_gen, args.steps, args.guidance, args.seed)
    result["fidelity"]["seconds"] = time.perf_counter() - t0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| subset | members | non-members | AUC | 95% CI |\n|---|---|---|---|---|")
    for r in result["memorization"]["rows"]:
        print(f"| {r['subset']} | {r['n_members']} | {r['n_nonmembers']} | {r['auc']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] |")
    f = result["fidelity"]
    print(f"\nfidelity: generations median {f['gen_median']:.3f}, held-out median {f['heldout_median']:.3f}, ratio {f['ratio']:.2f}")
    print("| domain | gen median | held-out median | gens within 0.15 | unique members | duplicated |\n|---|---|---|---|---|---|")
    for r in f["per_domain"]:
        print(f"| {r['domain']} | {r['gen_median']:.3f} | {r['heldout_median']:.3f} | {r['gen_within_threshold']} | "
              f"{r['unique_members_within_threshold']} | {r['of_which_duplicated']} |")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
