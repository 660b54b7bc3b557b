"""The shared training loop every built-in trainer uses (DreamBooth, LoRA, TI, hypernetwork, ...).

:func:`train_loop` is the loop of diffusers' example trainers, written once: VAE latents ×
``scaling_factor``, Gaussian noise, uniform timesteps, ``scheduler.add_noise``, target = noise
(epsilon) or ``get_velocity`` (v-prediction), MSE; gradient accumulation, mixed precision,
gradient clipping and AdamW through :class:`accelerate.Accelerator` (one CPU process, or several
GPUs under ``accelerate launch``); ``save_state`` checkpoints and resume from the newest one.

On a flow-matching base (SD3, Flux) the noising is rectified flow, as diffusers'
``train_dreambooth_lora_flux.py`` / ``train_dreambooth_lora_sd3.py`` do it (:class:`FlowMatchingNoise`):
``x_t = (1 − σ)·x0 + σ·ε``, target the velocity ``ε − x0``, σ one of the scheduler's training sigmas
(its static shift applied), drawn uniformly (Flux's default weighting scheme "none") or
logit-normal (SD3's default), plain MSE (both schemes weight the loss by 1).

What trains is described by a :class:`Trainable`: the parameters the optimizer updates (which
also decides whether the text encoder or the VAE must run every step) and an optional callback
after each optimizer step (Textual Inversion restores the frozen embedding rows there).

Determinism: the batch order and each sample's latent draw, noise and timestep are functions of
``config.seed`` and the sample's position in the global sample stream only, so a run resumed
from a checkpoint draws exactly what the uninterrupted run drew, and N processes under
``accelerate launch`` (each taking its slice of the global batch) draw what one process would.
When neither the VAE nor the text encoder trains, images are VAE-encoded (mean and std of the latent distribution) and prompts
text-encoded once before the loop; each step then samples ``mean + std * noise`` as
``latent_dist.sample()`` would, which keeps the loop cheap on a CPU.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_plugin._dist import check_joined, cpu_launch
from s2l_plugin.conditioning import FLOW_FAMILIES, denoiser, encode_prompts, pipeline_family, unet_forward
from s2l_plugin.conditioning import cat as cat_conditions
from s2l_plugin.conditioning import stack as stack_conditions
from s2l_plugin.data import ImageRecord, load_images
from s2l_plugin.errors import ConfigError, InputError

from .base import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LOOP_STATE = "loop_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Config fields that may change between a run and its resumption without changing what it computes.
_RESUME_FREE_FIELDS = ("max_train_steps", "checkpointing_steps", "resume")


@dataclass
class Trainable:
    """What a fine-tuning method trains inside a pipeline.

    ``parameters`` is what AdamW updates: a list of tensors, or of param-group dicts
    (``{"params": [...], "lr": ...}``) for per-group learning rates. The loop runs the text
    encoder (or the VAE) with gradients every step when one of these parameters belongs to it;
    otherwise it pre-encodes once. ``after_optimizer_step(global_step)`` runs after every
    optimizer step (global_step counts from 1). ``extra_modules`` are modules outside the
    pipeline's UNet / text encoder / VAE whose state must survive a checkpoint (saved as
    safetensors next to accelerate's state). ``trained_modules`` names the pipeline components
    put in train mode (default: those that own a trained parameter).
    """

    parameters: list[Any]
    after_optimizer_step: Callable[[int], None] | None = None
    extra_modules: dict[str, Any] = field(default_factory=dict)
    trained_modules: tuple[str, ...] | None = None

    def flat_parameters(self) -> list[Any]:
        flat: list[Any] = []
        for item in self.parameters:
            if isinstance(item, dict):
                flat.extend(item["params"])
            else:
                flat.append(item)
        return flat


@dataclass
class PriorPreservation:
    """DreamBooth prior preservation: class images with their prompt, loss weight ``weight``."""

    records: list[ImageRecord]
    prompt: str
    weight: float = 1.0


@dataclass
class TrainResult:
    """What :func:`train_loop` did: one loss per optimizer step (mean over accumulation micro-steps
    and processes, epsilon/v MSE, including earlier steps when resumed), the final step, and the
    checkpoint it resumed from (None for a fresh start)."""

    losses: list[float]
    global_step: int
    resumed_from: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)


# -- helpers shared by the loop and the fixed-batch evaluation ----------------------------------------


def _weight_dtype(mixed_precision: str) -> Any:
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def resolution_for(pipeline: Any, config: TrainConfig) -> int:
    """Training resolution in pixels: ``config.resolution`` or the base model's native size."""
    if config.resolution is not None:
        return int(config.resolution)
    from s2l_plugin.conditioning import default_resolution

    return default_resolution(pipeline)


def captions_for(records: Sequence[ImageRecord], config: TrainConfig) -> list[str]:
    """One training prompt per record: ``config.prompt``, or the record's own caption with ``caption_from_data``."""
    if not config.caption_from_data:
        return [config.prompt] * len(records)
    missing = [r.path for r in records if not r.caption]
    if missing:
        raise InputError(
            f"image {str(missing[0])!r} has no caption; expected a metadata.jsonl row or a .txt sidecar "
            "(or train with the fixed prompt)"
        )
    return [str(r.caption) for r in records]


class FlowMatchingNoise:
    """The rectified-flow noising of diffusers' Flux and SD3 training scripts, with a DDPMScheduler's interface.

    ``sigmas[i]`` are the training sigmas of a FlowMatchEulerDiscreteScheduler built from the base's
    scheduler config (``1 … 1/N``, the static shift applied; Flux shifts only at sampling time, so
    its training sigmas are unshifted), timestep index ``i`` drawn by :meth:`draw_index`
    (``weighting`` "none": uniform; "logit_normal": ``u = sigmoid(n)``, n ~ N(0, 1), index
    ``floor(u·N)``, as ``compute_density_for_timestep_sampling``). The denoiser is called at
    ``sigmas[i]·N`` (:meth:`model_timestep`), and learns the velocity ``ε − x0``.
    """

    def __init__(self, pipeline: Any, weighting: str) -> None:
        from types import SimpleNamespace

        from diffusers import FlowMatchEulerDiscreteScheduler

        flow = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        n = int(flow.config.num_train_timesteps)
        self.sigmas = flow.sigmas[:n].float().cpu()
        self.weighting = weighting
        self.config = SimpleNamespace(num_train_timesteps=n, prediction_type="flow", weighting_scheme=weighting)

    def draw_index(self, gen: Any) -> Any:
        import torch

        n = self.config.num_train_timesteps
        if self.weighting == "logit_normal":
            u = torch.sigmoid(torch.randn(1, generator=gen))
            return (u * n).long().clamp_(0, n - 1)
        return torch.randint(0, n, (1,), generator=gen)

    def _sigma(self, index: Any, like: Any) -> Any:
        return self.sigmas.to(like.device)[index.to(like.device)].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, latents: Any, noise: Any, index: Any) -> Any:
        s = self._sigma(index, latents)
        return (1 - s) * latents + s * noise

    def target(self, latents: Any, noise: Any) -> Any:
        return noise - latents

    def model_timestep(self, index: Any) -> Any:
        return self.sigmas[index.cpu()].to(index.device) * self.config.num_train_timesteps


#: The timestep-sampling scheme of each flow-matching family, the default of its diffusers training script.
FLOW_WEIGHTING = {"flux": "none", "sd3": "logit_normal"}


def make_noise_scheduler(pipeline: Any, config: TrainConfig) -> Any:
    """A DDPMScheduler with the base scheduler's config (as the diffusers scripts load it), prediction type
    overridable; for a flow-matching base a :class:`FlowMatchingNoise` (ConfigError for a prediction type)."""
    from diffusers import DDPMScheduler

    family = pipeline_family(pipeline)
    if family in FLOW_FAMILIES:
        if config.prediction_type is not None:
            raise ConfigError(
                f"prediction_type={config.prediction_type!r} is not valid for a {FLOW_FAMILIES[family]}; "
                "expected none (a flow-matching model predicts the velocity)"
            )
        return FlowMatchingNoise(pipeline, FLOW_WEIGHTING[family])

    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    if config.prediction_type is not None:
        scheduler.register_to_config(prediction_type=config.prediction_type)
    return scheduler


def tokenize(pipeline: Any, prompts: Sequence[str]) -> Any:
    """Token ids [N, model_max_length], padded and truncated as the diffusers scripts do."""
    tok = pipeline.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


def _latent_scale(vae: Any) -> tuple[float, float]:
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), float(shift or 0.0)


def _encode_moments(vae: Any, pixels: Any, batch_size: int, dtype: Any, device: Any) -> tuple[Any, Any]:
    """Mean and std of the VAE's latent distribution, float32 on the CPU, [N, C, h, w] each."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            dist = vae.encode(pixels[start : start + batch_size].to(device, dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _sample_generators(seed: int, purpose: int, start: int, count: int) -> list[Any]:
    """One generator per drawn sample, keyed by (seed, purpose, position in the sample stream).

    Every random draw of a training sample (flip, latent sample, noise, timestep) comes from its
    own generator, so resume needs no RNG state and N processes drawing their slices of a global
    batch draw exactly what one process drawing the whole batch would.
    """
    import torch

    return [torch.Generator().manual_seed((seed * 1_000_003 + purpose * 998_244_353 + p) % (2**63 - 1))
            for p in range(start, start + count)]


class _IndexStream:
    """An endless concatenation of seeded permutations of range(n): batch ``m`` of size ``b`` is a
    fixed function of ``(seed, m)``, so epochs need no bookkeeping and resume is exact."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> Any:
        import torch

        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + 104_729 * epoch))
        return self._perms[epoch]

    def take(self, start: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]


class _Data:
    """Images (pre-encoded or pixels) and prompts (pre-encoded or token ids) of one record set."""

    def __init__(self, pipeline: Any, records: Sequence[ImageRecord], prompts: Sequence[str], config: TrainConfig,
                 *, encode_images: bool, encode_text: bool, device: Any, dtype: Any) -> None:
        import torch

        self.n = len(records)
        self.random_flip = config.random_flip
        pixels = load_images(records, resolution_for(pipeline, config), center_crop=config.center_crop)
        self.pixels = self.flipped = self.mean = self.std = self.mean_f = self.std_f = None
        if encode_images:
            bs = max(1, config.train_batch_size)
            self.mean, self.std = _encode_moments(pipeline.vae, pixels, bs, dtype, device)
            if config.random_flip:
                self.mean_f, self.std_f = _encode_moments(pipeline.vae, torch.flip(pixels, dims=[3]), bs, dtype, device)
        else:
            self.pixels = pixels
        self.prompts = list(prompts)
        self.ids = tokenize(pipeline, self.prompts)
        self.embeds: dict[str, Any] | None = None
        if encode_text:
            self.embeds = {}
            with torch.no_grad():
                unique = sorted(set(self.prompts))
                if pipeline_family(pipeline) != "sd":
                    # SDXL: both encoders, the pooled embedding and the size ids of the training
                    # resolution; SD3/Flux: every encoder of the pipeline, as its encode_prompt runs them.
                    out = encode_prompts(pipeline, unique, device, resolution=resolution_for(pipeline, config)).float().cpu()
                    out = [out[i] for i in range(len(unique))]
                else:
                    ids = tokenize(pipeline, unique).to(device)
                    out = pipeline.text_encoder(ids)[0].float().cpu()
            self.embeds = dict(zip(unique, out, strict=True))

    def latents(self, idx: list[int], gens: list[Any], vae: Any, device: Any, dtype: Any) -> Any:
        """Scaled latents [B, C, h, w] for records ``idx``, sample i drawn from ``gens[i]`` (a fresh
        latent sample per call, as the scripts draw)."""
        import torch

        if self.random_flip:
            flip = torch.tensor([bool(torch.rand(1, generator=g) < 0.5) for g in gens])
        else:
            flip = torch.zeros(len(idx), dtype=torch.bool)
        if self.mean is not None:
            ii = torch.tensor(idx)
            mean, std = self.mean[ii].clone(), self.std[ii].clone()
            if flip.any():
                mean[flip], std[flip] = self.mean_f[ii[flip]], self.std_f[ii[flip]]
            eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens])
            latents = (mean + std * eps).to(device)
        else:
            px = self.pixels[torch.tensor(idx)]
            if flip.any():
                px[flip] = torch.flip(px[flip], dims=[3])
            dist = vae.encode(px.to(device, dtype)).latent_dist
            eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in gens]).to(device, dist.mean.dtype)
            latents = dist.mean + dist.std * eps
        scale, shift = _latent_scale(vae)
        return (latents - shift) * scale

    def text(self, idx: list[int], text_encoder: Any, device: Any) -> Any:
        """Encoder hidden states [B, L, D] for records ``idx``."""
        import torch

        if self.embeds is not None:
            return stack_conditions([self.embeds[self.prompts[i]] for i in idx]).to(device)
        return text_encoder(self.ids[torch.tensor(idx)].to(device))[0]


def _target(scheduler: Any, latents: Any, noise: Any, timesteps: Any) -> Any:
    kind = scheduler.config.prediction_type
    if kind == "flow":
        return scheduler.target(latents, noise)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"prediction_type={kind!r} is not supported; expected epsilon or v_prediction")


def _draw(data: _Data, stream: _IndexStream, m: int, batch: int, world: int, rank: int, seed: int, purpose: int,
          scheduler: Any, vae: Any, text_encoder: Any, device: Any, dtype: Any) -> tuple[Any, Any, Any, Any]:

    start = (m * world + rank) * batch
    idx = stream.take(start, batch)
    gens = _sample_generators(seed, purpose, start, batch)
    latents = data.latents(idx, gens, vae, device, dtype)
    noise, t = _noise_and_timesteps(gens, latents, scheduler)
    noisy = scheduler.add_noise(latents, noise, t)
    return noisy, t, data.text(idx, text_encoder, device), _target(scheduler, latents, noise, t)


def _noise_and_timesteps(gens: list[Any], latents: Any, scheduler: Any) -> tuple[Any, Any]:
    """Gaussian noise like ``latents`` and timesteps (uniform in [0, num_train_timesteps); a flow-matching
    base's index by its weighting scheme), sample i from ``gens[i]``."""
    import torch

    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(latents.device, latents.dtype)
    if isinstance(scheduler, FlowMatchingNoise):
        t = torch.cat([scheduler.draw_index(g) for g in gens]).to(latents.device)
    else:
        t = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g) for g in gens]).to(latents.device)
    return noise, t


def _model_timestep(scheduler: Any, t: Any) -> Any:
    """What the denoiser is called with for drawn timesteps ``t``: ``t`` itself, or σ·N on a flow-matching base."""
    return scheduler.model_timestep(t) if isinstance(scheduler, FlowMatchingNoise) else t


def _owner_of(params: list[Any], module: Any) -> bool:
    if module is None:
        return False
    ids = {id(p) for p in module.parameters()}
    return any(id(p) in ids for p in params)


def _fingerprint(config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    from s2l_plugin.config import to_json_dict

    data = to_json_dict(config, stamp=False)
    for key in _RESUME_FREE_FIELDS:
        data.pop(key, None)
    return json.loads(json.dumps({**data, **{f"_{k}": v for k, v in extra.items()}}, default=str))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoints/checkpoint-N`` under ``output_dir`` (None when there is none)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and (p / LOOP_STATE).exists()]
    return max(found)[1] if found else None


# -- the loop ------------------------------------------------------------------------------------------


def train_loop(
    pipeline: Any,
    dataset_records: Sequence[ImageRecord],
    config: TrainConfig,
    trainable: Trainable,
    *,
    output_dir: str | Path,
    prior: PriorPreservation | None = None,
    prompts: Sequence[str] | None = None,
    accelerator: Any = None,
    progress: bool = True,
    fingerprint_extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``trainable`` inside ``pipeline`` for ``config.max_train_steps`` optimizer steps, in place.

    ``dataset_records`` are the training images; their prompts are ``prompts`` (one per record)
    when given, else :func:`captions_for` (``config.prompt``, or the records' captions with
    ``config.caption_from_data``). Each micro-step draws ``config.train_batch_size`` images per
    process; an optimizer step is ``config.gradient_accumulation_steps`` micro-steps.
    Checkpoints go to ``output_dir/checkpoints/checkpoint-<step>`` every
    ``config.checkpointing_steps`` steps; with ``config.resume`` the newest one there is loaded
    first (ConfigError when it was written under a different config, ``fingerprint_extra``
    included). On return the pipeline's modules hold the trained weights, unwrapped.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from s2l_plugin.progress import progress_bar

    if not dataset_records:
        raise InputError("no training images; expected at least one image record")
    params = trainable.flat_parameters()
    if not params:
        raise ConfigError("nothing to train: the Trainable has no parameters")
    for p in params:
        p.requires_grad_(True)
    output_dir = Path(output_dir)
    if accelerator is None:
        _allow_new_precision(config.mixed_precision)
        cpu = cpu_launch()
        if config.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
            raise ConfigError("mixed_precision='fp16' is not valid on a CPU; expected 'no' or 'bf16' (or run on a GPU)")
        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            project_config=ProjectConfiguration(project_dir=str(output_dir)),
            cpu=cpu,
        )
        check_joined(accelerator.num_processes)
    device = accelerator.device
    if config.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("mixed_precision='fp16' is not valid on a CPU; expected 'no' or 'bf16' (or run on a GPU)")
    dtype = _weight_dtype(config.mixed_precision)
    unet, text_encoder, vae = denoiser(pipeline), pipeline.text_encoder, pipeline.vae
    unet_name = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
    text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
    text_encoder_3 = getattr(pipeline, "text_encoder_3", None)
    te_trains, vae_trains, unet_trains = (_owner_of(params, m) for m in (text_encoder, vae, unet))
    family = pipeline_family(pipeline)
    if family != "sd" and (te_trains or _owner_of(params, text_encoder_2) or _owner_of(params, text_encoder_3)):
        from s2l_plugin.pipeline import FAMILY_NAMES

        raise ConfigError(
            f"this method trains a text encoder; on an {FAMILY_NAMES[family]} base the built-in trainers train the "
            f"{unet_name} only (expected train_text_encoder=False, or a method that leaves the text encoders frozen)"
        )
    trained = trainable.trained_modules or tuple(
        name for name, flag in ((unet_name, unet_trains), ("text_encoder", te_trains), ("vae", vae_trains)) if flag
    )
    # Frozen components run in the mixed-precision dtype (as the scripts cast them); trained ones stay
    # fp32. A frozen component cast here gets its exact weights and dtype back at the end (kept on the
    # CPU meanwhile), so the pipeline differs from before only in what was trained.
    restore: dict[str, tuple[Any, Any]] = {}
    frozen_extra = tuple((n, m) for n, m in (("text_encoder_2", text_encoder_2), ("text_encoder_3", text_encoder_3)) if m is not None)
    for name, module in ((unet_name, unet), ("text_encoder", text_encoder), ("vae", vae), *frozen_extra):
        owns = {unet_name: unet_trains, "text_encoder": te_trains, "vae": vae_trains}.get(name, False)
        target = torch.float32 if owns else dtype
        module.to(device)
        if module.dtype != target:
            if not owns:
                restore[name] = (module.dtype, {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()})
            module.to(dtype=target)
        module.train(name in trained)
    # Exactly the Trainable's parameters get gradients (no wasted backward through frozen weights).
    wanted = {id(p) for p in params}
    for module in (unet, text_encoder, vae):
        for p in module.parameters():
            p.requires_grad_(id(p) in wanted)
    for module in trainable.extra_modules.values():
        module.to(device)

    scheduler = make_noise_scheduler(pipeline, config)
    prompts = list(prompts) if prompts is not None else captions_for(dataset_records, config)
    if len(prompts) != len(dataset_records):
        raise ConfigError(f"prompts has {len(prompts)} entries; expected one per record ({len(dataset_records)})")
    data = _Data(pipeline, dataset_records, prompts, config, encode_images=not vae_trains, encode_text=not te_trains, device=device, dtype=dtype)
    prior_data = None
    if prior is not None:
        prior_data = _Data(pipeline, prior.records, [prior.prompt] * len(prior.records), config,
                           encode_images=not vae_trains, encode_text=not te_trains, device=device, dtype=dtype)

    optimizer = torch.optim.AdamW(trainable.parameters, lr=config.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=config.adam_weight_decay, eps=1e-8)
    # Prepare the trained modules whose forward we call (DDP wraps them under multi-GPU). Trained
    # parameters outside them (VAE through encode(), a hypernetwork held elsewhere) get their
    # gradients averaged by hand.
    forward_modules = {name: m for name, m, flag in (("unet", unet, unet_trains), ("text_encoder", text_encoder, te_trains)) if flag}
    prepared = accelerator.prepare(*forward_modules.values(), optimizer)
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    wrapped = dict(zip(forward_modules, prepared[:-1], strict=True))
    run_unet = wrapped.get("unet", unet)
    run_te = wrapped.get("text_encoder", text_encoder)
    optimizer = prepared[-1]
    accumulate_on = list(wrapped.values())
    in_prepared = {id(p) for m in forward_modules.values() for p in m.parameters()}
    hand_synced = [p for p in params if id(p) not in in_prepared]

    fingerprint = _fingerprint(config, fingerprint_extra or {})
    losses: list[float] = []
    global_step = 0
    resumed_from = None
    if config.resume and (ckpt := latest_checkpoint(output_dir)) is not None:
        state = json.loads((ckpt / LOOP_STATE).read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            changed = sorted(k for k in set(fingerprint) | set(state.get("fingerprint", {}))
                             if fingerprint.get(k) != state.get("fingerprint", {}).get(k))
            raise ConfigError(
                f"checkpoint {str(ckpt)!r} was written with different settings ({', '.join(changed)}); "
                "expected the same config to resume (or resume=False / a new output folder)"
            )
        accelerator.load_state(str(ckpt))
        _load_extra(trainable.extra_modules, ckpt)
        global_step = int(state["global_step"])
        losses = [float(x) for x in state["losses"]]
        resumed_from = ckpt
        log.info("resumed from %s at step %d", ckpt, global_step)

    world, rank = accelerator.num_processes, accelerator.process_index
    batch, accum = config.train_batch_size, config.gradient_accumulation_steps
    stream = _IndexStream(len(dataset_records), config.seed)
    prior_stream = _IndexStream(len(prior.records), config.seed + 1) if prior is not None else None
    checkpoints: list[Path] = []
    bar = progress_bar(total=config.max_train_steps, initial=global_step, desc="training", unit="step",
                       disable=not (progress and accelerator.is_local_main_process))
    m = global_step * accum
    step_loss = 0.0
    while global_step < config.max_train_steps:
        with accelerator.accumulate(*accumulate_on):
            with accelerator.autocast():
                noisy, t, cond, target = _draw(data, stream, m, batch, world, rank, config.seed, 0, scheduler, vae, run_te, device, dtype)
                if prior_data is not None:
                    p_noisy, p_t, p_cond, p_target = _draw(prior_data, prior_stream, m, batch, world, rank, config.seed, 1,
                                                           scheduler, vae, run_te, device, dtype)
                    noisy, t = torch.cat([noisy, p_noisy]), torch.cat([t, p_t])
                    cond, target = cat_conditions([cond, p_cond]), torch.cat([target, p_target])
                pred = unet_forward(run_unet, noisy, _model_timestep(scheduler, t), cond.to(noisy.dtype), return_dict=False)[0]
            if prior_data is not None:
                pred, p_pred = pred.chunk(2)
                target, p_target = target.chunk(2)
                loss = torch.nn.functional.mse_loss(pred.float(), target.float()) + prior.weight * torch.nn.functional.mse_loss(
                    p_pred.float(), p_target.float())
            else:
                loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if world > 1:
                    for p in hand_synced:
                        if p.grad is not None:
                            p.grad = accelerator.reduce(p.grad, reduction="mean")
                if config.max_grad_norm and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += float(accelerator.reduce(loss.detach(), reduction="mean")) / accum
        m += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        losses.append(step_loss)
        step_loss = 0.0
        if trainable.after_optimizer_step is not None:
            trainable.after_optimizer_step(global_step)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
            checkpoints.append(_save_checkpoint(accelerator, output_dir, global_step, losses, fingerprint, trainable.extra_modules))
    bar.close()
    accelerator.wait_for_everyone()
    for module in forward_modules.values():
        accelerator.unwrap_model(module, keep_fp32_wrapper=False)
    for name, (orig_dtype, state) in restore.items():
        module = getattr(pipeline, name)
        module.to(dtype=orig_dtype)
        module.load_state_dict(state)
    return TrainResult(losses=losses, global_step=global_step, resumed_from=resumed_from, checkpoints=checkpoints)


def _allow_new_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    mixed precision. In a single, non-distributed process (several fine-tunes in one Python
    session) that state is reset; under ``accelerate launch`` the launcher's setting stands."""
    from accelerate.state import AcceleratorState, DistributedType

    state = AcceleratorState._shared_state
    if not state or state.get("_mixed_precision", mixed_precision) == mixed_precision:
        return
    if state.get("distributed_type", DistributedType.NO) == DistributedType.NO:
        AcceleratorState._reset_state()


def _save_checkpoint(accelerator: Any, output_dir: Path, step: int, losses: list[float], fingerprint: dict[str, Any],
                     extra: dict[str, Any]) -> Path:
    """accelerate's state plus our loop state, written to a temp folder and renamed (a crash leaves no half checkpoint)."""
    final = output_dir / CHECKPOINTS_DIR / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's RNG state is in tmp before it is renamed
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        for name, module in extra.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp / f"extra_{name}.safetensors"))
        (tmp / LOOP_STATE).write_text(json.dumps({"global_step": step, "losses": losses, "fingerprint": fingerprint}), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def _load_extra(extra: dict[str, Any], ckpt: Path) -> None:
    from safetensors.torch import load_file

    for name, module in extra.items():
        module.load_state_dict(load_file(str(ckpt / f"extra_{name}.safetensors")))


# -- evaluation on a fixed batch ------------------------------------------------------------------------


def fixed_batch_loss(
    pipeline: Any,
    dataset_records: Sequence[ImageRecord],
    config: TrainConfig,
    *,
    seed: int = 12345,
    draws: int = 4,
    prompts: Sequence[str] | None = None,
) -> float:
    """Mean training loss (epsilon/v MSE, the loop's objective) over every record × ``draws`` draws of
    latent sample, noise and timestep, all from ``seed``: the same number before and after training
    measures progress without step-to-step sampling noise. Lower = better fit. Runs on the CPU in fp32."""
    import torch

    prompts = list(prompts) if prompts is not None else captions_for(dataset_records, config)
    scheduler = make_noise_scheduler(pipeline, config)
    net = denoiser(pipeline)
    device = net.device
    data = _Data(pipeline, dataset_records, prompts, config, encode_images=True, encode_text=True, device=device, dtype=torch.float32)
    total, count = 0.0, 0
    n = len(dataset_records)
    modes = {name: getattr(pipeline, name).training for name in ("unet", "transformer", "text_encoder", "vae")
             if getattr(pipeline, name, None) is not None}
    for name in modes:
        getattr(pipeline, name).eval()  # dropout (e.g. LoRA dropout) off: a deterministic number
    with torch.no_grad():
        for d in range(draws):
            for start in range(0, n, config.train_batch_size):
                size = min(config.train_batch_size, n - start)
                idx = list(range(start, start + size))
                gens = _sample_generators(seed, 2, d * n + start, size)
                latents = data.latents(idx, gens, pipeline.vae, device, torch.float32)
                noise, t = _noise_and_timesteps(gens, latents, scheduler)
                pred = unet_forward(net, scheduler.add_noise(latents, noise, t), _model_timestep(scheduler, t), data.text(idx, None, device),
                                    return_dict=False)[0]
                err = torch.nn.functional.mse_loss(pred.float(), _target(scheduler, latents, noise, t).float(), reduction="none")
                total += float(err.mean(dim=(1, 2, 3)).sum())
                count += size
    for name, was_training in modes.items():
        getattr(pipeline, name).train(was_training)
    return total / max(count, 1)
