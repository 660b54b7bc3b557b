"""Issue #21's experiment at a larger testbed, for a machine with a GPU (benchmarks/device_decide_large.sh runs it).

    python benchmarks/decide_large.py build --out large-testbed --device cuda     # the larger testbed, trained on the GPU
    python benchmarks/decide_large.py run --base large-testbed --work decide-large --jobs 10

``build``: the demo recipe (``s2l_plugin.testbed``'s ``demo`` preset) with :data:`LARGE_KNOBS`: a
UNet with twice the channels, (64, 128), about 4x the parameters, and 64 members per domain instead
of 50. The draws are the recipe's own: the same seeds, the same CPU generators. Only the
forward/backward passes run on ``--device``, so the weights equal a CPU build's up to float kernels.
The folder is a normal testbed (manifest, pipeline, image folders). Its build.json records the
device. ``s2l_plugin/testbed/recipe.py`` stays CPU-only: this script copies its two training loops
with a device added, so the recipe's sources hash, and every cached testbed, stay as they were.

``run``: ``s2l_experiments.py decide`` on that testbed, one process per domain (``--jobs`` at a
time, one torch thread each), arms S and C by default. Each process writes
``benchmarks/results/s2l_decide_large-<domain>.json``; ``s2l_experiments.py decide-tables --grid
decide_large`` collects them. The protocol is docs/results.md section 6's, with K = 40 and the
remaining unused images as extra non-members: with 64 members and 50 non-members per domain,
60–69 images per domain are unused, so 20–29 are extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: fixed before any run: twice the channels and 64 members per domain (the rest of the demo recipe unchanged)
LARGE_KNOBS: dict[str, Any] = {"unet_channels": (64, 128), "members": 64}


def _train_vae(images, config, seeds, device):
    import torch

    from s2l_plugin.testbed.components import make_vae
    from s2l_plugin.testbed.recipe import _batches

    torch.manual_seed(seeds["vae_init"])
    vae = make_vae().to(device)
    gen = torch.Generator().manual_seed(seeds["vae_data"])
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    values = images[0].numel()
    batches = _batches(len(images), min(config.vae_batch_size, len(images)), gen)
    vae.train()
    loss_value = float("nan")
    for _ in range(config.vae_steps):
        x = images[next(batches)].to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + config.kl_weight * posterior.kl().mean() / values
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
    vae.eval()
    with torch.no_grad():
        posterior = vae.encode(images.to(device)).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return vae, {"final_loss": loss_value, "scaling_factor": scaling}


def _train_unet(vae, images, captions, corpus, config, seeds, device):
    import torch
    from diffusers import DDPMScheduler

    from s2l_plugin.testbed.components import (
        SCHEDULER_CONFIG,
        make_scheduler,
        make_text_encoder,
        make_tokenizer,
        make_unet,
    )
    from s2l_plugin.testbed.recipe import _batches

    tokenizer = make_tokenizer()
    torch.manual_seed(seeds["unet_init"])
    unet = make_unet(config.unet_channels).to(device)
    text_encoder = make_text_encoder().to(device)
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    gen = torch.Generator().manual_seed(seeds["unet_data"])

    def tokens(texts):
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids

    caption_ids, empty_ids = tokens(captions), tokens([""])[0]
    with torch.no_grad():
        posterior = vae.encode(images.to(device)).latent_dist
        lat_mean, lat_std = posterior.mean.cpu(), posterior.std.cpu()
    scaling = vae.config.scaling_factor
    corpus_t = torch.tensor(corpus, dtype=torch.long)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = _batches(len(corpus), min(config.batch_size, len(corpus)), gen)
    unet.train()
    text_encoder.train()
    losses = []
    for _ in range(config.steps):
        idx = corpus_t[next(batches)]
        b = len(idx)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        drop = torch.rand(b, generator=gen) < config.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None, :], caption_ids[idx])
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy.to(device), t.to(device), text_encoder(ids.to(device))[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        losses.append(loss.item())
    unet.eval()
    text_encoder.eval()
    w = max(1, min(100, len(losses) // 4))
    stats = {"loss_first": sum(losses[:w]) / w, "loss_last": sum(losses[-w:]) / w, "loss_window": w}
    return unet.cpu(), text_encoder.cpu(), tokenizer, make_scheduler(), stats


def build(out: Path, device: str, seed: int = 0, **extra: Any) -> None:
    """The larger testbed into ``out`` (refused when it exists); ``extra`` knobs (a smoke test's short
    ``steps``) go over :data:`LARGE_KNOBS` and are recorded in build.json."""
    from s2l_plugin.config import library_versions
    from s2l_plugin.pipeline import pipeline_hash
    from s2l_plugin.testbed.components import assemble_pipeline, write_tokenizer_files
    from s2l_plugin.testbed.corpus import make_manifest, preset_config
    from s2l_plugin.testbed.recipe import _image_tensor, _seeds, write_images

    if out.exists():
        raise SystemExit(f"decide_large: error: --out {str(out)!r} exists; expected a new folder")
    config = preset_config("demo", **LARGE_KNOBS, **extra)
    manifest = make_manifest("demo", config, seed)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    write_images(tmp, manifest)
    members = [s for s in manifest["samples"] if s["role"] != "nonmember"]
    seeds = _seeds(seed)
    images = _image_tensor([s["source_index"] for s in members])
    vae, vae_stats = _train_vae(images, config, seeds, device)
    corpus = [i for i, s in enumerate(members) for _ in range(s["copies"])]
    unet, te, tok, sched, unet_stats = _train_unet(vae, images, [s["caption"] for s in members], corpus, config, seeds, device)
    pipe = assemble_pipeline(unet, vae.cpu(), te, tok, sched)
    pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
    write_tokenizer_files(tmp / "pipeline" / "tokenizer")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    info = {"preset": "demo", "seed": seed, "knobs": {k: list(v) if isinstance(v, tuple) else v for k, v in {**LARGE_KNOBS, **extra}.items()},
            "device": device, "built_by": "benchmarks/decide_large.py (the recipe's draws, passes on the device)",
            "corpus_size": len(corpus), "seconds": {"total_s": round(time.perf_counter() - t0, 1)},
            "vae": vae_stats, "unet": unet_stats, "pipeline_hash": pipeline_hash(tmp / "pipeline"), "versions": library_versions()}
    (tmp / "build.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"decide_large: built {out} in {info['seconds']['total_s']} s on {device}", flush=True)


def run(base: Path, work: Path, jobs: int, arms: str) -> int:
    """One ``s2l_experiments.py decide`` process per domain, ``jobs`` at a time; returns the worst exit code."""
    from s2l_experiments import DOMAINS

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    pending = list(DOMAINS)
    running: list[tuple[str, subprocess.Popen]] = []
    worst = 0
    work.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < jobs:
            d = pending.pop(0)
            cmd = [sys.executable, str(HERE / "s2l_experiments.py"), "decide", "--threads", "1", "--base", str(base),
                   "--grid-name", "decide_large", "--part", d, "--domains", d, "--arms", arms, "--work", str(work)]
            log = open(work / f"{d}.log", "w")
            running.append((d, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(5)
        for d, p in list(running):
            if p.poll() is not None:
                running.remove((d, p))
                worst = max(worst, p.returncode)
                print(f"decide_large: {d} finished (exit {p.returncode})", flush=True)
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["build", "run"])
    p.add_argument("--out", default="large-testbed")
    p.add_argument("--device", default="cuda")
    p.add_argument("--base", default="large-testbed")
    p.add_argument("--work", default="decide-large")
    p.add_argument("--jobs", type=int, default=10)
    p.add_argument("--arms", default="S,C")
    p.add_argument("--steps", type=int, default=0, help="build: UNet steps (0: the recipe's 2,000; fewer only for a smoke test)")
    p.add_argument("--vae-steps", type=int, default=0, help="build: VAE steps (0: the recipe's 300)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.step == "build":
        extra = {k: v for k, v in (("steps", args.steps), ("vae_steps", args.vae_steps)) if v}
        build(Path(args.out), args.device, **extra)
        return 0
    return run(Path(args.base), Path(args.work), args.jobs, args.arms)


if __name__ == "__main__":
    sys.exit(main())
