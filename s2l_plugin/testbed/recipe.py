"""The testbed recipe: write the split's images, train VAE then UNet + text encoder, save a diffusers folder.

Seeded end to end: the split and manifest depend only on (preset, knobs, seed); the weights also
depend on the machine (float summation order, the CPU kernels torch and its math libraries pick),
so they reproduce on one machine with the same ``threads`` knob; build.json records those facts
(:func:`machine_facts`). Torch's deterministic-algorithm switch and thread count are set for the build
and restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s2l_plugin.errors import InputError
from s2l_plugin.testbed.corpus import RecipeConfig, digit_image, make_manifest, preset_config
from s2l_plugin.testbed.layout import Testbed

if TYPE_CHECKING:  # pragma: no cover
    import torch


@contextlib.contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic algorithms inside the block; the caller's settings come back after."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def machine_facts() -> dict[str, str | None]:
    """What decides a build's float results besides the recipe and ``threads``: the CPU kernel set torch
    dispatches to (``ATEN_CPU_CAPABILITY`` forces one), the math libraries' forced instruction sets,
    the architecture and the CPU model."""
    import platform

    import torch

    cpu = None
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "forced": ",".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
                           if os.environ.get(k)) or None,
        "architecture": platform.machine(),
        "cpu": cpu or platform.processor() or None,
    }


def _seeds(seed: int) -> dict[str, int]:
    """Independent child seeds for each random stage, derived from the recorded ``seed``."""
    import numpy as np

    names = ("vae_init", "vae_data", "unet_init", "unet_data")
    states = np.random.SeedSequence(seed).generate_state(len(names))
    return {name: int(s) for name, s in zip(names, states, strict=True)}


def write_images(root: Path, manifest: dict[str, Any]) -> None:
    """Write every sample's PNG and one ``metadata.jsonl`` (file_name, text) per image folder."""
    from PIL import Image

    folders: dict[Path, list[dict[str, str]]] = {}
    for s in manifest["samples"]:
        target = root / s["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit_image(s["source_index"])).save(target, format="PNG")
        folders.setdefault(target.parent, []).append({"file_name": target.name, "text": s["caption"]})
    for folder, rows in folders.items():
        rows.sort(key=lambda r: r["file_name"])
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _image_tensor(indices: list[int]) -> torch.Tensor:
    """Images of ``load_digits`` as float32 (N, 3, 16, 16) in [-1, 1] (the PNGs' pixels exactly)."""
    import numpy as np
    import torch

    arr = np.stack([digit_image(i) for i in indices]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches over ``range(n)``, epoch by epoch (a fresh permutation each epoch)."""
    import torch

    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[start : start + batch_size]


def train_vae(images: torch.Tensor, config: RecipeConfig, seeds: dict[str, int], progress: bool = True):
    """Train the AutoencoderKL to reconstruct ``images``; set its ``scaling_factor`` to 1 / std of the latents.

    Returns (vae in eval mode, stats dict with the final loss, the median normalized L2 reconstruction
    error on ``images`` and the scaling factor).
    """
    import torch
    from tqdm.auto import tqdm

    from s2l_plugin.testbed.components import make_vae

    torch.manual_seed(seeds["vae_init"])
    vae = make_vae()
    gen = torch.Generator().manual_seed(seeds["vae_data"])
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    values = images[0].numel()
    batches = _batches(len(images), min(config.vae_batch_size, len(images)), gen)
    vae.train()
    loss_value = float("nan")
    for _ in tqdm(range(config.vae_steps), desc="testbed: VAE", disable=not progress, leave=False):
        x = images[next(batches)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # KL per pixel value, weighted: keeps the latents near unit scale without blurring reconstructions.
        loss = torch.nn.functional.mse_loss(recon, x) + config.kl_weight * posterior.kl().mean() / values
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
    vae.eval()
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.mean).sample.clamp(-1, 1)
        err = ((recon - images).flatten(1).pow(2).mean(1).sqrt()).median()
        latents = posterior.sample(generator=gen)
        scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return vae, {"final_loss": loss_value, "recon_l2_median": float(err), "scaling_factor": scaling}


def train_unet(
    vae,
    images: torch.Tensor,
    captions: list[str],
    corpus: list[int],
    config: RecipeConfig,
    seeds: dict[str, int],
    progress: bool = True,
):
    """Train UNet + text encoder with the epsilon objective on the corpus (``corpus`` indexes ``images``).

    Duplicated members occur several times in ``corpus``. Captions are replaced by "" with
    probability ``config.caption_dropout``. Returns (unet, text_encoder, tokenizer, scheduler, stats).
    """
    import torch
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from s2l_plugin.testbed.components import (
        SCHEDULER_CONFIG,
        make_scheduler,
        make_text_encoder,
        make_tokenizer,
        make_unet,
    )

    tokenizer = make_tokenizer()
    torch.manual_seed(seeds["unet_init"])
    unet = make_unet(config.unet_channels)
    text_encoder = make_text_encoder()
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    gen = torch.Generator().manual_seed(seeds["unet_data"])

    def tokens(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids

    caption_ids = tokens(captions)
    empty_ids = tokens([""])[0]
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        lat_mean, lat_std = posterior.mean, posterior.std
    scaling = vae.config.scaling_factor
    corpus_t = torch.tensor(corpus, dtype=torch.long)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = _batches(len(corpus), min(config.batch_size, len(corpus)), gen)
    unet.train()
    text_encoder.train()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="testbed: UNet + text encoder", disable=not progress, leave=False)
    for _ in bar:
        idx = corpus_t[next(batches)]
        b = len(idx)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=gen)
        drop = torch.rand(b, generator=gen) < config.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None, :], caption_ids[idx])
        noisy = noise_scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
    unet.eval()
    text_encoder.eval()
    window = max(1, min(100, len(losses) // 4))
    stats = {
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "loss_window": window,
    }
    return unet, text_encoder, tokenizer, make_scheduler(), stats


def build_testbed(
    preset: str = "test",
    out: Path | str | None = None,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: bool = True,
    **knobs: Any,
) -> Testbed:
    """Run the recipe for ``preset`` ("test" or "demo", ``knobs`` overriding its RecipeConfig) into ``out``.

    Writes manifest.json, build.json, pipeline/ and the member / non-member image folders to a
    temporary sibling folder, then renames it to ``out`` (nothing half-written). ``out`` defaults
    to ``./s2l-testbed-<preset>``; an existing non-empty ``out`` is refused unless ``overwrite``.
    """
    from s2l_plugin.config import library_versions
    from s2l_plugin.pipeline import pipeline_hash
    from s2l_plugin.testbed.components import assemble_pipeline, write_tokenizer_files

    config = preset_config(preset, **knobs)
    manifest = make_manifest(preset, config, seed)
    out = Path(out if out is not None else f"s2l-testbed-{preset}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"output folder {str(out)!r} exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    timings: dict[str, float] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        write_images(tmp, manifest)
        members = [s for s in manifest["samples"] if s["role"] != "nonmember"]
        with deterministic_torch(config.threads):
            seeds = _seeds(seed)
            images = _image_tensor([s["source_index"] for s in members])
            t0 = time.perf_counter()
            vae, vae_stats = train_vae(images, config, seeds, progress)
            timings["vae_s"] = time.perf_counter() - t0
            corpus = [i for i, s in enumerate(members) for _ in range(s["copies"])]
            t0 = time.perf_counter()
            unet, text_encoder, tokenizer, scheduler, unet_stats = train_unet(
                vae, images, [s["caption"] for s in members], corpus, config, seeds, progress
            )
            timings["unet_s"] = time.perf_counter() - t0
        pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler)
        pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
        # Slow (pre-v5) CLIPTokenizer reads vocab.json + merges.txt; keep them beside tokenizer.json.
        write_tokenizer_files(tmp / "pipeline" / "tokenizer")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        timings["total_s"] = time.perf_counter() - start
        # CPU seconds of this process: close to the wall time of a single-threaded build on an idle machine.
        timings["total_cpu_s"] = time.process_time() - cpu_start
        build = {
            "preset": preset,
            "seed": seed,
            "threads": config.threads,
            "corpus_size": len(corpus),
            "seconds": {k: round(v, 2) for k, v in timings.items()},
            "vae": vae_stats,
            "unet": unet_stats,
            "pipeline_hash": pipeline_hash(tmp / "pipeline"),
            "versions": library_versions(),
            "machine": machine_facts(),
        }
        (tmp / "build.json").write_text(json.dumps(build, indent=1) + "\n", encoding="utf-8")
        if out.exists() and overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        elif out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            # Another process wrote `out` while this one trained (e.g. two test sessions filling one
            # cache). Keep theirs if it is the same recipe, never delete what someone may be reading.
            if (out / "manifest.json").is_file() and Testbed.load(out).manifest == manifest:
                return Testbed.load(out)
            raise InputError(f"output folder {str(out)!r} was written by someone else during the build; not replacing it")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Testbed.load(out)
