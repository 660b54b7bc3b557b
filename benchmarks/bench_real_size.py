"""Membership-inference attacks on real-size SD 1.5 and SDXL 1.0 models: seconds per image, overhead, peak memory.

Run: ``python benchmarks/bench_real_size.py [--cases sd15@512,sdxl@1024,sd15@1024,sdxl@512] [--device cpu] [--dtype float32]``
(about 20 minutes on 2 CPU cores; on a GPU: ``bash benchmarks/device_real_size.sh``)

The models are SD 1.5's and SDXL 1.0's UNet, text encoder(s) and VAE built in code from their
published configs (the dicts below) with **random weights**: nothing is downloaded, and time and
memory do not depend on the weights. The tokenizer is the testbed's character-level CLIP tokenizer
padded to 77 tokens (the real sequence length), so the text encoders do the real amount of work.

Each case (model @ pixel size) runs in its own subprocess, so each peak resident memory
(``ru_maxrss``) is that case's alone. In the subprocess, one model is built, then:

1. one bare UNet forward (batch 1, random latents at the case's size, the case's real text
   conditioning, t = 200) is timed right before every attack call (interleaved, so load on a
   shared machine hits both alike) and ``--bare-repeats`` times after them (a warm-up forward
   first, not counted); its median over all of these is the unit;
2. ``--images`` PNG images at the case's size are scored by the engine's own streaming path
   (``score_shard``, batch 1: image reading, VAE + text encoding once per batch, every attack),
   each attack wrapped in a timer around its ``score_encoded``;
3. ratio = attack time / (unet_calls_per_image x images x median bare forward).

Times are process CPU seconds (``time.process_time``; the less noisy number on a shared machine)
and wall seconds. On a GPU only wall seconds mean anything (CUDA is synchronised around each timer).

Attack settings: ``--attack-params default`` are the package defaults (loss 16 UNet calls per image,
secmi 16, pia 2, pian 2). ``--attack-params reduced`` (the CPU run) keeps each attack's code path
and cuts its calls: loss one timestep x one draw (1 call), secmi t_sec = 20, k = 10 (4 calls); pia
and pian are unchanged (2). Seconds per image at the default settings are then estimated as
default calls x bare forward x the measured ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CASES = "sd15@512,sdxl@1024,sd15@1024,sdxl@512"

# -- the published configs (diffusers / transformers config.json fields) ----------------------

SCHEDULER = {  # SD 1.5 and SDXL share the training schedule (scaled_linear 0.00085 .. 0.012, 1000 steps)
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}

SD15_UNET = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}

SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280), "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True, "cross_attention_dim": 2048,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 (pooled text) + 6 x 256 (size/crop ids)
}

CLIP_L = {  # openai/clip-vit-large-patch14 text model (SD 1.5 text_encoder, SDXL text_encoder)
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}

OPENCLIP_BIGG = {  # SDXL text_encoder_2 (OpenCLIP ViT-bigG/14), a CLIPTextModelWithProjection
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
}

VAE = {  # SD 1.5 / SDXL vae/config.json (same layout; SDXL's scale is 0.13025)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
}
SCALING = {"sd15": 0.18215, "sdxl": 0.13025}
NATIVE = {"sd15": 512, "sdxl": 1024}
TITLE = {"sd15": "SD 1.5", "sdxl": "SDXL 1.0"}


def _tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    from s2l_plugin.testbed.components import write_tokenizer_files

    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, local_files_only=True)


def _text_config(spec: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    from s2l_plugin.testbed.components import BOS_TOKEN, EOS_TOKEN, char_vocab

    vocab = char_vocab()  # the char tokenizer's special ids, so the pooled (EOS) position is found as in CLIP
    return CLIPTextConfig(**spec, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN])


def build_pipeline(family: str, resolution: int, text: str, tmp: Path) -> tuple[Any, dict[str, Any]]:
    """The family's pipeline with random weights (fp32, CPU). ``text="random"`` (SDXL only): no text
    encoders; ``encode_prompt`` returns random conditioning of the real shapes."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    info: dict[str, Any] = {}
    scheduler = DDIMScheduler(**SCHEDULER)
    vae = AutoencoderKL(**VAE, sample_size=NATIVE[family], scaling_factor=SCALING[family])
    tok = _tokenizer(tmp / "tok")
    if family == "sd15":
        unet = UNet2DConditionModel(**SD15_UNET)
        te = CLIPTextModel(_text_config(CLIP_L))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        info["params_text_encoders"] = sum(p.numel() for p in te.parameters())
    else:
        unet = UNet2DConditionModel(**SDXL_UNET)
        if text == "real":
            te = CLIPTextModel(_text_config(CLIP_L))
            te2 = CLIPTextModelWithProjection(_text_config(OPENCLIP_BIGG))
            info["params_text_encoders"] = sum(p.numel() for m in (te, te2) for p in m.parameters())
        else:
            te = te2 = None
            info["params_text_encoders"] = 0
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
        if text != "real":
            def encode_prompt(prompt: Any = None, device: Any = None, num_images_per_prompt: int = 1, **_: Any) -> Any:
                n = (len(prompt) if isinstance(prompt, list) else 1) * num_images_per_prompt
                g = torch.Generator().manual_seed(0)
                hidden = torch.randn(n, 77, 2048, generator=g).to(device)
                pooled = torch.randn(n, 1280, generator=g).to(device)
                return hidden, None, pooled, None

            pipe.encode_prompt = encode_prompt  # random conditioning of SDXL's shapes, in this benchmark only
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.eval()
    info["params_unet"] = sum(p.numel() for p in unet.parameters())
    info["params_vae"] = sum(p.numel() for p in vae.parameters())
    return pipe, info


def _rss_kib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def attacks_for(params: str) -> list[Any]:
    from s2l_plugin.audit.mia import LossAttack, PIAAttack, SecMIAttack

    if params == "default":
        return [LossAttack(), SecMIAttack(), PIAAttack(), PIAAttack(normalize=True)]
    return [LossAttack(timesteps=(200,), n_noise=1), SecMIAttack(t_sec=20, k=10), PIAAttack(), PIAAttack(normalize=True)]


DEFAULT_CALLS = {"loss": 16, "secmi": 16, "pia": 2, "pian": 2}


class TimedAttack:
    """An attack as the engine sees it (fast form), timed around each ``score_encoded`` call."""

    def __init__(self, attack: Any, sync: Any, before: Any = None) -> None:
        self.attack, self.sync, self.before = attack, sync, before
        self.name = attack.name
        self.needs_reference = False
        self.params = attack.params
        self.unet_calls_per_image = attack.unet_calls_per_image
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.nonfinite = 0

    def score_encoded(self, batch: Any, reference: Any = None) -> Any:
        import torch

        if self.before is not None:
            self.before()  # one bare forward right before the attack, outside its timer: side by side
        self.sync()
        c0, w0 = time.process_time(), time.perf_counter()
        s = self.attack.score_encoded(batch, reference)
        self.sync()
        self.cpu.append(time.process_time() - c0)
        self.wall.append(time.perf_counter() - w0)
        bad = ~torch.isfinite(s)
        self.nonfinite += int(bad.sum())  # random fp16 weights may overflow; timing is what is measured here
        return torch.nan_to_num(s.double(), nan=0.0, posinf=0.0, neginf=0.0)


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """Subprocess body: one model at one size; returns the case's measurements."""
    import numpy as np
    import torch
    from PIL import Image

    from s2l_plugin.audit.mia.engine import MEMBER, DiffusionModel, score_shard
    from s2l_plugin.conditioning import unet_forward
    from s2l_plugin.data import ImageRecord

    family, res = args.case.split("@")
    res = int(res)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {"case": args.case, "model": TITLE[family], "resolution": res, "device": args.device,
                           "dtype": args.dtype, "torch_threads": torch.get_num_threads(), "images": args.images,
                           "batch_size": 1, "attack_params": args.attack_params,
                           "mem_available_gib_at_start": round(_mem_available_gib(), 2), "load_average_start": os.getloadavg()}
    text = "real"
    if family == "sdxl" and args.sdxl_text != "real":
        # fp32 SDXL: UNet ~10.3 GB + bigG ~2.8 GB + CLIP-L ~0.5 GB + VAE ~0.3 GB, plus activations
        need = 17.0 if device.type == "cpu" else 0.0
        text = "random" if args.sdxl_text == "random" or _mem_available_gib() < need else "real"
    out["text_encoders"] = "real" if text == "real" else "none: random conditioning of SDXL's shapes"
    with tempfile.TemporaryDirectory(prefix="s2l-bench-real-") as tmp_s:
        tmp = Path(tmp_s)
        c0, w0 = time.process_time(), time.perf_counter()
        pipe, info = build_pipeline(family, res, text, tmp)
        out.update(info)
        if device.type != "cpu" or dtype != torch.float32:
            for name in ("unet", "text_encoder", "text_encoder_2"):
                m = getattr(pipe, name, None)
                if m is not None:
                    m.to(device=device, dtype=dtype)
            # SDXL's VAE overflows in fp16 (diffusers upcasts it: force_upcast); keep every VAE in fp32
            pipe.vae.to(device=device, dtype=torch.float32)
        sync()
        out["build_wall_s"] = time.perf_counter() - w0
        out["build_cpu_s"] = time.process_time() - c0
        out["rss_after_build_kib"] = _rss_kib()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        # images at the case's size, captions in metadata as a user's folder would have them
        rng = np.random.default_rng(0)
        items = []
        for i in range(args.images):
            path = tmp / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(path)
            items.append(((MEMBER, i), ImageRecord(path=path, caption=f"a photograph of a red bicycle leaning on a wall, number {i}")))

        model = DiffusionModel(pipe)
        bare_cpu: list[float] = []
        bare_wall: list[float] = []
        with torch.inference_mode():
            cond = model.encode_text(["a photograph of a red bicycle leaning on a wall"], res)
            h = res // model.vae_scale_factor
            x = torch.randn(1, 4, h, h, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
            t = torch.full((1,), 200, dtype=torch.long, device=device)

            def bare(record: bool = True) -> None:
                sync()
                c, w = time.process_time(), time.perf_counter()
                unet_forward(pipe.unet, x, t, cond).sample
                sync()
                if record:
                    bare_cpu.append(time.process_time() - c)
                    bare_wall.append(time.perf_counter() - w)

            w0 = time.perf_counter()
            bare(record=False)  # warm-up (first-call allocations, kernel selection)
            out["warmup_forward_wall_s"] = time.perf_counter() - w0
            attacks = [TimedAttack(a, sync, before=bare) for a in attacks_for(args.attack_params)]
            c0, w0 = time.process_time(), time.perf_counter()
            score_shard(pipe, items, attacks, seed=0, batch_size=1, resolution=res, progress=False)
            sync()
            engine_cpu, engine_wall = time.process_time() - c0, time.perf_counter() - w0
            engine_cpu -= sum(bare_cpu)  # the interleaved bare forwards ran inside score_shard
            engine_wall -= sum(bare_wall)
            for _ in range(args.bare_repeats):
                bare()
        n = args.images
        fwd_cpu, fwd_wall = statistics.median(bare_cpu), statistics.median(bare_wall)
        out["bare_forward_cpu_s"] = bare_cpu
        out["bare_forward_wall_s"] = bare_wall
        out["bare_forward_median_cpu_s"] = fwd_cpu
        out["bare_forward_median_wall_s"] = fwd_wall
        rows = {}
        for a in attacks:
            calls = a.unet_calls_per_image
            ratio_cpu = sum(a.cpu) / (calls * n * fwd_cpu)
            ratio_wall = sum(a.wall) / (calls * n * fwd_wall)
            rows[a.name] = {
                "params": a.params, "unet_calls_per_image": calls,
                "s_per_image_cpu": sum(a.cpu) / n, "s_per_image_wall": sum(a.wall) / n,
                "bare_calls_s_per_image_cpu": calls * fwd_cpu, "bare_calls_s_per_image_wall": calls * fwd_wall,
                "ratio_cpu": ratio_cpu, "ratio_wall": ratio_wall,
                "default_unet_calls_per_image": DEFAULT_CALLS[a.name],
                "est_default_s_per_image_cpu": DEFAULT_CALLS[a.name] * fwd_cpu * ratio_cpu,
                "est_default_s_per_image_wall": DEFAULT_CALLS[a.name] * fwd_wall * ratio_wall,
                "nonfinite_scores": a.nonfinite,
            }
        out["attacks"] = rows
        attack_cpu = sum(sum(a.cpu) for a in attacks)
        attack_wall = sum(sum(a.wall) for a in attacks)
        out["engine_cpu_s"], out["engine_wall_s"] = engine_cpu, engine_wall
        out["read_encode_s_per_image_cpu"] = (engine_cpu - attack_cpu) / n
        out["read_encode_s_per_image_wall"] = (engine_wall - attack_wall) / n
        out["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device.type == "cuda":
            out["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["load_average_end"] = os.getloadavg()
    return out


# -- the parent: one subprocess per case, then the result files --------------------------------


def machine() -> dict[str, Any]:
    from importlib import metadata

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 1024**2:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"arch": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(), "memory": mem,
            "python": platform.python_version(),
            **{p: metadata.version(p) for p in ("torch", "diffusers", "transformers")}}


def _fmt(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    cmd = result["command"]
    lines = [  # no title: benchmarks/run_all.py puts the section under "Real-size models on this CPU (issue 19)"
        f"SD 1.5 and SDXL 1.0 UNet, text encoder(s) and VAE built from their published configs with **random weights** "
        f"(no download; time and memory do not depend on the weights), {result['dtype']}, device {result['device']}, "
        f"{m['cpu_count']} CPU cores ({m['cpu']}), {m['memory']} RAM, torch {m['torch']}, diffusers {m['diffusers']}, "
        f"transformers {m['transformers']}; collected {result['collected']}; the whole run took {result['total_wall_s'] / 60:.1f} min.",
        f"Command: `{cmd}`",
        "",
        "Each case ran in its own process (its peak RSS is its own). The attacks ran through the engine's streaming path "
        "(`score_shard`: PNG reading, VAE + text encoding, each attack's `score_encoded`), batch 1; each attack was timed "
        "around its `score_encoded`, and its time is divided by its UNet calls x one bare UNet forward "
        "(batch 1, same size, same conditioning) timed in the same process right before each attack call and once more after "
        "(median of these; one warm-up forward first, not counted). "
        "CPU s = process CPU time (all threads), the less noisy number on a shared machine; wall s beside it.",
        "",
    ]
    if result["attack_params"] == "reduced":
        lines += [
            "Reduced attack settings (the default ones would take hours here): loss 1 timestep x 1 draw (1 UNet call), "
            "secmi t_sec = 20, k = 10 (4 calls), pia / pian as default (2 calls). The last column estimates the default "
            "settings (loss 16, secmi 16, pia 2, pian 2 calls): default calls x bare forward x the measured ratio.",
            "",
        ]
    else:
        lines += [
            "Default attack settings. loss sends its 16 noisy latents per image through the UNet as one batched forward, "
            "so its ratio against 16 single forwards is below 1 where batching pays (a GPU); the other attacks call the UNet "
            "once per step.",
            "",
        ]
    lines += [
        "| model @ px | attack | UNet calls / image (run) | s / image, CPU | s / image, wall | bare calls, CPU s | **ratio (CPU)** | ratio (wall) | est. s / image at default settings, CPU (calls) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        if "error" in c:
            lines.append(f"| {c['case']} | failed: {c['error']} | | | | | | | |")
            continue
        label = f"{c['model']} @ {c['resolution']}"
        for name, r in c["attacks"].items():
            lines.append(
                f"| {label} | {name} | {r['unet_calls_per_image']} | {_fmt(r['s_per_image_cpu'])} | {_fmt(r['s_per_image_wall'])} | "
                f"{_fmt(r['bare_calls_s_per_image_cpu'])} | **{r['ratio_cpu']:.2f}** | {r['ratio_wall']:.2f} | "
                f"{_fmt(r['est_default_s_per_image_cpu'])} ({r['default_unet_calls_per_image']}) |"
            )
    lines += [
        "",
        "| model @ px | text encoders | params UNet / text / VAE (M) | one bare UNet forward, CPU s (median; all) | wall s | read + encode per image, CPU s | peak RSS (GiB) | RSS after build (GiB) | build s (wall) | load avg start → end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        if "error" in c:
            continue
        lines.append(
            f"| {c['model']} @ {c['resolution']} | {c['text_encoders']} | {c['params_unet'] / 1e6:.0f} / {c['params_text_encoders'] / 1e6:.0f} / "
            f"{c['params_vae'] / 1e6:.0f} | {_fmt(c['bare_forward_median_cpu_s'])} ({', '.join(_fmt(v) for v in c['bare_forward_cpu_s'])}) | "
            f"{_fmt(c['bare_forward_median_wall_s'])} | {_fmt(c['read_encode_s_per_image_cpu'])} | {c['peak_rss_kib'] / 1024**2:.2f} | "
            f"{c['rss_after_build_kib'] / 1024**2:.2f} | {c['build_wall_s']:.0f} | "
            f"{c['load_average_start'][0]:.1f} → {c['load_average_end'][0]:.1f} |"
        )
    lines += [
        "",
        "Caveats:",
        "",
        "- **Random weights.** The architectures, sizes and sequence lengths are the real ones, so the arithmetic is; "
        "the scores mean nothing. The tokenizer is the testbed's character-level CLIP tokenizer padded to 77 tokens.",
    ]
    if result["device"] != "cpu":
        lines += [f"- Measured on {result['device']} in {result['dtype']}: only the wall columns mean anything (CPU time is the launching thread)."]
    else:
        lines += [
            "- **CPU, fp32, shared.** Other engineers' processes shared the 2 cores during the run (load average in the "
            "table): wall seconds measure them too; CPU seconds are the closer number, but with 2 torch threads on busy "
            "cores CPU time also counts some waiting, so ratios read within about ±0.2 of 1 are noise.",
            f"- **{result['cases'][0].get('images', 1)} image(s), batch 1**, one timed call per attack per image: enough to see the order of magnitude and whether the engine "
            "adds anything around the UNet, not a distribution. A GPU reads very differently (batching, fp16).",
            "- **No GPU was lent to this session**: `bash benchmarks/device_real_size.sh` (fp16, default attack settings, "
            "4 images, `--device cuda --dtype float16`, under 8 minutes, JSON under `$OUT`) is prepared and has not run.",
        ]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma list of FAMILY@PIXELS, FAMILY in sd15, sdxl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--bare-repeats", type=int, default=1, help="bare forwards after the attacks (one also runs right before each attack call)")
    p.add_argument("--attack-params", default=None, choices=["reduced", "default"], help="default: reduced on CPU, default on a GPU")
    p.add_argument("--sdxl-text", default="auto", choices=["auto", "real", "random"],
                   help="SDXL text encoders: real, random conditioning of the real shapes, or auto (random when memory is short)")
    p.add_argument("--out", default=str(HERE / "results" / "real_size.json"))
    p.add_argument("--md", default=None, help="markdown table (default: --out with .md)")
    p.add_argument("--md-only", action="store_true", help="only rewrite the markdown table from an existing --out JSON")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.attack_params is None:
        args.attack_params = "reduced" if args.device == "cpu" else "default"
    if args.case:
        print(json.dumps(run_case(args)), flush=True)
        return 0
    if args.md_only:
        md = Path(args.md) if args.md else Path(args.out).with_suffix(".md")
        md.write_text(markdown(json.loads(Path(args.out).read_text())))
        print(f"wrote {md}")
        return 0
    t0 = time.perf_counter()
    cases = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        family = case.split("@")[0]
        if family not in NATIVE:
            p.error(f"unknown model {family!r} in --cases; expected sd15 or sdxl")
        cmd = [sys.executable, __file__, "--case", case, "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads), "--images", str(args.images), "--bare-repeats", str(args.bare_repeats),
               "--attack-params", args.attack_params, "--sdxl-text", args.sdxl_text]
        print(f"== {case}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            print(proc.stderr[-3000:], file=sys.stderr)
            cases.append({"case": case, "error": f"exit {proc.returncode}: {tail[0][:200]}"})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({k: res[k] for k in ("case", "bare_forward_median_cpu_s", "peak_rss_kib")}), flush=True)
        cases.append(res)
    shown = ["python", "benchmarks/bench_real_size.py"] + [a for a in (argv if argv is not None else sys.argv[1:])]
    result = {
        "command": " ".join(shown),
        "device": args.device, "dtype": args.dtype, "attack_params": args.attack_params,
        "collected": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "cases": cases, "total_wall_s": time.perf_counter() - t0,
        "weights": "random (configs of SD 1.5 / SDXL 1.0, built in code, nothing downloaded)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = Path(args.md) if args.md else out.with_suffix(".md")
    md.write_text(markdown(result))
    print(f"wrote {out} and {md} ({result['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
