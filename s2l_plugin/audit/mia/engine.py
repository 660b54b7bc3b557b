"""The membership-inference engine: encode once, run every attack, stream, shard, score.

:func:`audit_membership` is the public entry point. It streams members and non-members in
batches (peak memory does not grow with the number of images), encodes each batch once (VAE
latents, caption embeddings) and hands the encoded batch to every attack, collects one score per
image and attack (higher = member), and turns the scores into an :class:`AttackResult` per attack
with :mod:`s2l_plugin.audit.metrics`.

Determinism: every random draw an attack makes for an image comes from
``(seed, stream, role, index)`` (:func:`image_generator`), where ``role`` is 0 for members and 1
for non-members and ``index`` is the image's position in its list. The noise an image sees is
therefore independent of batch size, batch composition and sharding, and a before / after
fine-tune pair of audits on the same lists sees identical noise, which is what a paired ΔAUC needs.

Sharding: with an accelerate ``Accelerator`` of several processes (or an explicit
``shard=(rank, world)``), batch ``b`` of the single stream goes to process ``b % world``. Each
image then sits in exactly the batch it would sit in single-process, so merged scores are
bitwise those of a single-process run on the same device.

This module imports no torch at import time (it is imported by the plugin registry).
"""

from __future__ import annotations

import inspect
import logging
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from s2l_plugin.config import DEFAULT_ATTACKS, DEFAULT_ATTACKS_WITH_BASE
from s2l_plugin.errors import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from s2l_plugin.result import MembershipResult

log = logging.getLogger(__name__)

MEMBER, NONMEMBER = 0, 1

#: How an image becomes a latent: the VAE posterior ``"mean"`` (default) or one seeded ``"sample"``.
LATENTS = ("mean", "sample")
#: Noise stream of the posterior draw under ``latent="sample"`` (its own: not an attack's).
LATENT_STREAM = 11


def check_latent(latent: Any) -> str:
    """``latent`` if it is one of :data:`LATENTS`; else a ConfigError naming the value."""
    if latent not in LATENTS:
        raise ConfigError(f"latent={latent!r} is not valid; expected one of: {', '.join(LATENTS)}")
    return latent


# -- randomness ------------------------------------------------------------------------------


def image_seed(seed: int, stream: int, role: int, index: int) -> int:
    """A 63-bit seed for one image's draws in one attack stream, mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, stream, role, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def image_noise(seed: int, stream: int, keys: Sequence[tuple[int, int]], shape: Sequence[int]) -> torch.Tensor:
    """Standard-normal noise ``[len(keys), *shape]`` (float32, CPU), row i drawn from image ``keys[i]`` only."""
    import torch

    out = torch.empty((len(keys), *shape), dtype=torch.float32)
    for row, (role, index) in enumerate(keys):
        gen = torch.Generator(device="cpu").manual_seed(image_seed(seed, stream, role, index))
        out[row] = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return out


# -- the model and an encoded batch ----------------------------------------------------------


class DiffusionModel:
    """What attacks need from a text-to-image pipeline: the denoiser as an ε-predictor and the schedule.

    Wraps a diffusers pipeline (``unet`` or ``transformer``, ``vae``, ``scheduler``,
    ``encode_prompt``). Latents are the VAE posterior *mean* by default, or one seeded posterior
    sample (:meth:`encode_images`), shifted and scaled as the pipeline's
    VAE config says (deterministic either way, so repeated audits agree); captions are encoded with the
    pipeline's own ``encode_prompt`` (so textual-inversion tokens and LoRA text layers apply), guidance 1.

    Every family is written ``x_t = α_t·x0 + σ_t·ε`` over integer timesteps ``0 <= t < N``:

    - DDPM families (SD 1.x/2.x, SDXL): ``α_t = sqrt(ᾱ_t)``, ``σ_t = sqrt(1 − ᾱ_t)`` from the
      scheduler's ``alphas_cumprod``; the UNet is called at ``t``.
    - Flow-matching families (SD3, Flux): ``σ_t`` is the scheduler's training sigma of ``t`` —
      ``t/N``, shifted by ``shift·σ / (1 + (shift − 1)·σ)`` when the scheduler has a static shift
      (SD3: 3.0), unshifted when it shifts by resolution at sampling time (Flux; diffusers'
      Flux training script draws its training sigmas unshifted too) — and ``α_t = 1 − σ_t``. The
      transformer is called at ``σ_t·N`` and predicts the velocity ``v = ε − x0``, which
      :meth:`eps` turns into ``ε̂ = x_t + (1 − σ_t)·v̂``.

    In this form a deterministic DDIM step is an Euler step of the flow ODE, so the attacks'
    formulas hold for both kinds unchanged.
    """

    def __init__(self, pipeline: Any) -> None:
        import torch

        from s2l_plugin.conditioning import (
            FLOW_FAMILIES,
            default_resolution,
            denoiser,
            pipeline_family,
            vae_factor,
        )

        if getattr(pipeline, "unet", None) is None and getattr(pipeline, "transformer", None) is None:
            raise InputError(f"pipeline {type(pipeline).__name__} has no unet or transformer; expected a text-to-image diffusion pipeline")
        for part in ("vae", "scheduler"):
            if getattr(pipeline, part, None) is None:
                raise InputError(f"pipeline {type(pipeline).__name__} has no {part}; expected a Stable Diffusion-style pipeline")
        self.pipeline = pipeline
        self.family = pipeline_family(pipeline)
        self.flow = self.family in FLOW_FAMILIES
        self.unet = denoiser(pipeline)
        self.vae = pipeline.vae
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        config = pipeline.scheduler.config
        if self.flow:
            self.prediction_type = "flow"
            sigmas = flow_sigmas(config).to(self.device)
            self.alphas_cumprod = None
            self.alpha, self.sigma = 1 - sigmas, sigmas
            self.model_timesteps = sigmas * sigmas.numel()
        else:
            self.prediction_type = getattr(config, "prediction_type", "epsilon")
            if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise InputError(f"scheduler prediction_type {self.prediction_type!r} is not supported; expected epsilon, v_prediction or sample")
            acp = getattr(pipeline.scheduler, "alphas_cumprod", None)
            if acp is None:
                raise InputError(f"scheduler {type(pipeline.scheduler).__name__} has no alphas_cumprod; expected a DDPM/DDIM-style scheduler")
            self.alphas_cumprod = torch.as_tensor(acp, dtype=torch.float32).to(self.device)
            self.alpha, self.sigma = self.alphas_cumprod.sqrt(), (1 - self.alphas_cumprod).sqrt()
            self.model_timesteps = None
        self.num_train_timesteps = int(self.alpha.numel())
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.vae_scale_factor = vae_factor(pipeline)
        self._resolution = default_resolution(pipeline)
        channels = self.vae.config.latent_channels if self.flow else self.unet.config.in_channels
        side = self._resolution // self.vae_scale_factor
        self.latent_shape = (int(channels), side, side)

    @property
    def resolution(self) -> int:
        """Pixel resolution the denoiser's native size implies (images are brought to it)."""
        return self._resolution

    def check_timestep(self, name: str, t: int) -> int:
        if not 0 <= int(t) < self.num_train_timesteps:
            raise ConfigError(f"{name}={t} is out of range; expected 0 <= t < {self.num_train_timesteps} (num_train_timesteps)")
        return int(t)

    def encode_images(
        self, images: torch.Tensor, latent: str = "mean", keys: Sequence[tuple[int, int]] | None = None, seed: int = 0
    ) -> torch.Tensor:
        """Images ``[B,3,H,W]`` in [-1, 1] to scaled latents ``[B,C,h,w]`` (float32).

        ``latent="mean"`` (default): the VAE posterior mean (deterministic). ``latent="sample"``:
        one draw ``mean + std·ε`` from the posterior, as the S2L/SecMI reference code encodes
        (``latent_dist.sample()``) and as the testbed's UNet was trained. Image i's ``ε`` comes
        from its own seed ``(seed, LATENT_STREAM, *keys[i])``, so every audit of the same image
        (base or fine-tune, any batch size) draws the same latent; ``keys`` are then required.
        """
        check_latent(latent)
        x = images.to(device=self.vae.device, dtype=self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        z = dist.mean.float()
        if latent == "sample":
            if keys is None or len(keys) != z.shape[0]:
                raise InputError(f"latent='sample' needs one (role, index) key per image; got {None if keys is None else len(keys)} for {z.shape[0]} images")
            eps = image_noise(seed, LATENT_STREAM, keys, tuple(z.shape[1:])).to(z.device)
            z = z + dist.std.float() * eps
        return ((z - self.shift_factor) * self.scaling_factor).to(self.device)

    def encode_text(self, captions: Sequence[str | None], resolution: int | None = None) -> Any:
        """Caption conditioning in the denoiser's dtype; None captions are encoded as "".

        SD 1.x/2.x: embeddings ``[B,L,D]``; SDXL: an :class:`~s2l_plugin.conditioning.SDXLCondition`
        whose size ids name ``resolution`` (pixels; default :attr:`resolution`); SD3/Flux: a
        :class:`~s2l_plugin.conditioning.FlowCondition`.
        """
        from s2l_plugin.conditioning import encode_prompts

        prompts = [c if c is not None else "" for c in captions]
        return encode_prompts(self.pipeline, prompts, self.device, resolution=resolution or self.resolution).to(self.dtype)

    def coeffs(self, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α_t, σ_t)`` of ``x_t = α_t·x0 + σ_t·ε`` (float32): scalars for an int ``t``, ``[N,1,1,1]`` for a ``[N]`` tensor."""
        if isinstance(t, int):
            return self.alpha[t], self.sigma[t]
        return self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)

    def predict(self, x: torch.Tensor, t: torch.Tensor | int, text: Any) -> torch.Tensor:
        """The denoiser's own prediction (float32) for ``x`` ``[N,C,h,w]`` at timesteps ``t`` (int or ``[N]``):
        ε, v or x0 as the scheduler's ``prediction_type`` says; velocity ``ε − x0`` for flow matching."""
        import torch

        from s2l_plugin.conditioning import unet_forward

        n = x.shape[0]
        tt = torch.full((n,), int(t), device=self.device, dtype=torch.long) if isinstance(t, int) else t.to(self.device)
        step = self.model_timesteps[tt] if self.flow else tt
        return unet_forward(self.unet, x.to(self.dtype), step, text).sample.float()

    def eps(self, x: torch.Tensor, t: torch.Tensor | int, text: Any) -> torch.Tensor:
        """ε-prediction (float32) for noisy latents ``x`` ``[N,C,h,w]`` at timesteps ``t`` (int or ``[N]``).

        v-, sample- and velocity-prediction models are converted to ε with the schedule, so every
        attack's formula holds unchanged. ``text``: :meth:`encode_text`'s conditioning (sliced/repeated per row).
        """
        import torch

        n = x.shape[0]
        tt = torch.full((n,), int(t), device=self.device, dtype=torch.long) if isinstance(t, int) else t.to(self.device)
        out = self.predict(x, tt, text)
        if self.prediction_type == "epsilon":
            return out
        if self.flow:
            return x.float() + (1 - self.sigma[tt].view(-1, 1, 1, 1)) * out
        a = self.alphas_cumprod[tt].view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * x.float()
        return (x.float() - a.sqrt() * out) / (1 - a).sqrt()

    def alpha_bar(self, t: int) -> torch.Tensor:
        """ᾱ_t of a DDPM family, ``α_t²`` in general."""
        return self.alphas_cumprod[int(t)] if self.alphas_cumprod is not None else self.alpha[int(t)] ** 2


def flow_sigmas(config: Any) -> torch.Tensor:
    """A flow-matching scheduler's training sigmas ``[N]`` (float32), ``σ[t]`` for ``0 <= t < N``:
    ``t/N``, with the static ``shift`` applied (``shift·σ / (1 + (shift − 1)·σ)``) unless the
    scheduler shifts by resolution (``use_dynamic_shifting``). ``σ[0] = 0`` is the clean image."""
    import torch

    n = int(getattr(config, "num_train_timesteps", 1000))
    sigmas = torch.arange(n, dtype=torch.float64) / n
    shift = float(getattr(config, "shift", 1.0) or 1.0)
    if not getattr(config, "use_dynamic_shifting", False) and shift != 1.0:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas.float()


@dataclass
class EncodedBatch:
    """One batch as every attack sees it: latents ``[B,C,h,w]`` (float32), text (``[B,L,D]``; for SDXL an
    :class:`~s2l_plugin.conditioning.SDXLCondition` that slices and repeats the same way), keys and seed.

    ``keys[i] = (role, index)`` identifies image i for :func:`image_noise`.
    """

    model: DiffusionModel
    latents: torch.Tensor
    text: Any
    keys: list[tuple[int, int]]
    seed: int
    latent: str = "mean"

    @property
    def size(self) -> int:
        return int(self.latents.shape[0])


def encode_batch(
    model: DiffusionModel, images: torch.Tensor, captions: Sequence[str | None], keys: Sequence[tuple[int, int]], seed: int,
    latent: str = "mean",
) -> EncodedBatch:
    """Encode images (``latent``: see :meth:`DiffusionModel.encode_images`) and captions once for all attacks."""
    return EncodedBatch(model, model.encode_images(images, latent, keys, seed), model.encode_text(captions, int(images.shape[-1])),
                        list(keys), seed, latent)


# -- the attack contract ---------------------------------------------------------------------


class Attack(Protocol):
    """The attack contract: what ``register_attacks`` accepts and :func:`audit_membership` runs.

    docs/hooks.md (``register_attacks``) states it for plugin authors; :func:`attack_problem`
    checks it at registration (``s2l_plugin.hooks.manager.collect``) and for attack objects
    passed to :func:`audit_membership`.

    - ``name``: a non-empty string, unique in the registry (``--attacks NAME``).
    - ``needs_reference``: a bool, optional (default False). True: the attack is only run with a
      reference (the pre-fine-tune base) model and gets it; where none is at hand (the base's own
      audit) it is left out.
    - ``score(pipeline, images, captions, **kwargs)``: the simple form. The engine calls it once
      per batch, under ``torch.inference_mode()`` with the models in eval mode, with

      - ``pipeline``: the audited diffusers ``StableDiffusionPipeline``-like object;
      - ``images``: a float32 CPU ``torch.Tensor`` ``[B, 3, R, R]`` with values in [-1, 1], RGB,
        R the audit resolution (the UNet's ``sample_size`` times the VAE's scale factor unless
        ``resolution=`` is given); a copy, the attack may modify it;
      - ``captions``: a ``list[str]`` of length B, ``""`` for an image without a caption;
      - keyword arguments, each passed only when ``score`` accepts it by name (all of them when
        it takes ``**kwargs``): ``seed`` (the audit's int seed), ``image_seeds`` (a ``list[int]``
        of B seeds, one per image, fixed by the audit seed, the attack's name and the image's
        place in its set: draw image i's noise from ``torch.Generator().manual_seed(image_seeds[i])``
        and every audit of the same images, base or fine-tune, any batch size, draws the same) and
        ``reference`` (the base pipeline when ``needs_reference``, else None).

      It returns B finite scores, one per image in order, **higher = more likely a member**
      (never thresholded): a 1-D ``torch.Tensor``, numpy array or sequence of numbers. Anything
      else is an :class:`InputError` naming the attack.
    - ``score_encoded(batch, reference)``: the fast form, optional. When an attack has it the
      engine calls it instead of ``score``, with the batch already encoded once for every attack
      (:class:`EncodedBatch`) and ``reference`` the base's encoding when ``needs_reference``
      (else None); it returns a ``torch.Tensor`` of B finite scores. The built-in attacks
      (:class:`MIAttack`) implement both forms.
    - ``params`` (a dict) and ``unet_calls_per_image`` (an int), optional: copied into the
      result as they are.

    An attack must have ``score`` or ``score_encoded`` (or both).
    """

    name: str
    needs_reference: bool

    def score(self, pipeline: Any, images: torch.Tensor, captions: list[str], **kwargs: Any) -> Any: ...


#: The keyword arguments the engine offers an attack's simple-form ``score`` (see :class:`Attack`).
SCORE_KWARGS = ("seed", "image_seeds", "reference")


def attack_problem(obj: Any) -> str | None:
    """What keeps ``obj`` from being an :class:`Attack` (one short phrase), or None when it is one."""
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        return f"name must be a non-empty string, got {name!r}"
    if not (callable(getattr(obj, "score", None)) or callable(getattr(obj, "score_encoded", None))):
        return "missing score or score_encoded"
    needs = getattr(obj, "needs_reference", False)
    if not isinstance(needs, bool):
        return f"needs_reference must be True or False, got {needs!r}"
    return None


def _needs_reference(attack: Any) -> bool:
    """The attack's declared need for a reference model (False when it declares nothing)."""
    return bool(getattr(attack, "needs_reference", False))


def image_seeds(seed: int, attack_name: str, keys: Sequence[tuple[int, int]]) -> list[int]:
    """The per-image seeds a simple-form attack gets: from ``(seed, the name's stream, role, index)``."""
    stream = zlib.crc32(attack_name.encode("utf-8"))
    return [image_seed(seed, stream, role, index) for role, index in keys]


def _accepted_kwargs(method: Any) -> set[str] | None:
    """The names in :data:`SCORE_KWARGS` that ``method`` accepts (None: it takes ``**kwargs``, so all)."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: offer nothing
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} & set(SCORE_KWARGS)


def attack_scores(attack: Any, returned: Any, n: int) -> np.ndarray:
    """An attack's returned scores as a float64 array ``[n]``; InputError naming the attack otherwise."""
    expected = f"expected {n} finite scores, one per image, higher = member"
    if returned is None:
        raise InputError(f"attack {attack.name!r} returned None; {expected}")
    try:
        if hasattr(returned, "detach"):  # a torch tensor (possibly on an accelerator)
            returned = returned.detach().double().cpu().numpy()
        vals = np.asarray(returned, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"attack {attack.name!r} returned a {type(returned).__name__} that is not numbers; {expected}") from None
    if vals.shape != (n,) or not np.all(np.isfinite(vals)):
        raise InputError(
            f"attack {attack.name!r} returned scores of shape {vals.shape} "
            f"(all finite: {bool(np.isfinite(vals).all())}); {expected}"
        )
    return vals


# -- attacks ---------------------------------------------------------------------------------


class MIAttack:
    """Base of the built-in attacks (an :class:`Attack` with both forms): per-image scores, higher =
    more likely a member; never thresholds.

    Subclasses set ``name``, ``needs_reference``, ``params`` and implement
    :meth:`score_encoded` and :attr:`unet_calls_per_image`; :meth:`score` (the simple form)
    encodes and calls :meth:`score_encoded`.
    """

    name: str = ""
    needs_reference: bool = False
    params: dict[str, Any]

    @property
    def unet_calls_per_image(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_encoded(self, batch: EncodedBatch, reference: EncodedBatch | None = None) -> torch.Tensor:  # pragma: no cover
        """Scores ``[B]`` (float64, CPU) for an encoded batch."""
        raise NotImplementedError

    def score(
        self,
        pipeline: Any,
        images: torch.Tensor,
        captions: Sequence[str | None],
        *,
        seed: int = 0,
        keys: Sequence[tuple[int, int]] | None = None,
        reference: Any = None,
    ) -> np.ndarray:
        """Scores (1-D float64, higher = member) for ``images`` ``[B,3,H,W]`` in [-1, 1], each with its own caption.

        ``keys`` name each image for its noise draws (default: member indices 0..B-1), so the
        same image with the same seed and key always gets the same noise.
        """
        import torch

        if self.needs_reference and reference is None:
            raise ConfigError(f"attack {self.name!r} needs a reference (base) pipeline; pass reference=")
        keys = list(keys) if keys is not None else [(MEMBER, i) for i in range(len(captions))]
        if len(keys) != images.shape[0] or len(captions) != images.shape[0]:
            raise InputError(f"{images.shape[0]} images, {len(captions)} captions and {len(keys)} keys; expected one each per image")
        with torch.inference_mode(), _eval_mode(pipeline, reference):
            target = encode_batch(DiffusionModel(pipeline), images, captions, keys, seed)
            ref = encode_batch(DiffusionModel(reference), images, captions, keys, seed) if self.needs_reference else None
            return self.score_encoded(target, ref).double().cpu().numpy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"


class _eval_mode:
    """Put the models' torch modules in eval mode (no dropout) for the audit, restoring their mode after."""

    def __init__(self, *pipelines: Any) -> None:
        self.modules = [
            m for p in pipelines if p is not None
            for m in (getattr(p, n, None) for n in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"))
            if m is not None
        ]

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in zip(self.modules, self.modes, strict=True):
            m.train(mode)


def resolve_attacks(attacks: Iterable[Any] | None, *, has_reference: bool, pm: Any = None) -> list[Any]:
    """Attack objects for names (looked up in the plugin registry) or objects; ConfigError on unknown
    names and on objects that break the :class:`Attack` contract (registered ones were checked then)."""
    from s2l_plugin.hooks.manager import get

    if attacks is None:
        attacks = DEFAULT_ATTACKS_WITH_BASE if has_reference else DEFAULT_ATTACKS
    if isinstance(attacks, str):
        attacks = [attacks]
    out = [get("attacks", a, pm) if isinstance(a, str) else a for a in attacks]
    if not out:
        raise ConfigError("attacks=[] selects no attack; expected at least one attack name")
    for a in out:
        problem = attack_problem(a)
        if problem is not None:
            raise ConfigError(f"{a!r} is not an attack ({problem}); expected an attack name or an object as docs/hooks.md describes")
    names = [a.name for a in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"attack(s) {', '.join(dup)} listed twice; expected each attack once")
    for a in out:
        if _needs_reference(a) and not has_reference:
            raise ConfigError(f"attack {a.name!r} needs a reference (base) model; pass reference= or drop the attack")
    return out


# -- streaming, sharding, merging ------------------------------------------------------------


@dataclass
class ShardScores:
    """Scores one process computed: ``scores[attack][k]`` (float64) for image ``keys[k]`` = (role, index),
    plus the pooled-latent shift features ``[k, d]`` (float32). Arrays, so memory per image is a few bytes."""

    keys: np.ndarray
    scores: dict[str, np.ndarray]
    features: np.ndarray


def shard_batches(n_batches: int, rank: int, world: int) -> range:
    """The batch indices process ``rank`` of ``world`` scores (round-robin over batches)."""
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"shard=({rank}, {world}) is not valid; expected 0 <= rank < world")
    return range(rank, n_batches, world)


def merge_shards(shards: Sequence[ShardScores], n_members: int, n_nonmembers: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Merge per-process scores into ``{attack: (member_scores, nonmember_scores)}`` in list order, plus features.

    Raises InputError when an image is missing or was scored twice (a sharding bug, never silent).
    """
    total = n_members + n_nonmembers
    seen = np.zeros(total, dtype=bool)
    attacks = list(shards[0].scores) if shards else []
    merged = {a: np.full(total, np.nan) for a in attacks}
    n_feat = next((s.features.shape[1] for s in shards if s.features.size), 0)
    features = np.zeros((total, n_feat), dtype=np.float32)
    for shard in shards:
        keys = np.asarray(shard.keys, dtype=np.int64).reshape(-1, 2)
        pos = np.where(keys[:, 0] == MEMBER, keys[:, 1], n_members + keys[:, 1])
        if pos.size and (pos.min() < 0 or pos.max() >= total or np.any(keys[:, 1] >= np.where(keys[:, 0] == MEMBER, n_members, n_nonmembers))):
            raise InputError(f"a shard scored image keys outside {n_members} members / {n_nonmembers} non-members")
        if np.unique(pos).size != pos.size or seen[pos].any():
            dup = keys[np.argmax(seen[pos])] if seen[pos].any() else keys[0]
            raise InputError(f"image {tuple(int(v) for v in dup)} was scored by two shards; expected each image in exactly one")
        seen[pos] = True
        for a in attacks:
            merged[a][pos] = shard.scores[a]
        if n_feat:
            features[pos] = shard.features
    if not seen.all():
        raise InputError(f"{int((~seen).sum())} image(s) were scored by no shard; expected every image once")
    return {a: (v[:n_members], v[n_members:]) for a, v in merged.items()}, features


def _feature_pool(latents: torch.Tensor) -> torch.Tensor:
    """Latents pooled to at most 8x8 per channel (<= 256 features for SD's 4 channels): the shift diagnostic's input."""
    import torch.nn.functional as F

    side = min(8, latents.shape[-1])
    return F.adaptive_avg_pool2d(latents, side).flatten(1)


def score_shard(
    pipeline: Any,
    items: Sequence[tuple[tuple[int, int], Any]],
    attacks: Sequence[Any],
    *,
    reference: Any = None,
    seed: int = 0,
    batch_size: int = 32,
    shard: tuple[int, int] = (0, 1),
    resolution: int | None = None,
    progress: bool = True,
    latent: str = "mean",
) -> ShardScores:
    """Score this process's share of ``items`` (``(key, ImageRecord)`` in stream order) with every attack.

    Batches are ``items[b*batch_size:(b+1)*batch_size]``; this process takes the batches
    :func:`shard_batches` gives it. Images are read one batch at a time.
    """
    import torch

    from s2l_plugin.audit.mia.data import iter_record_batches
    from s2l_plugin.progress import progress_bar

    model = DiffusionModel(pipeline)
    ref_model = DiffusionModel(reference) if reference is not None else None
    needs_ref = any(_needs_reference(a) for a in attacks)
    # The fast form when an attack has it; the simple form gets the keyword arguments it accepts.
    encoded = {a.name: callable(getattr(a, "score_encoded", None)) for a in attacks}
    accepted = {a.name: _accepted_kwargs(a.score) for a in attacks if not encoded[a.name]}
    encode_ref = any(_needs_reference(a) and encoded[a.name] for a in attacks)
    res = resolution or model.resolution
    n_batches = math.ceil(len(items) / batch_size)
    mine = shard_batches(n_batches, *shard)
    keys_out: list[np.ndarray] = []
    scores_out: dict[str, list[np.ndarray]] = {a.name: [] for a in attacks}
    feats_out: list[np.ndarray] = []
    bar = progress_bar(total=len(mine), desc=f"MIA ({', '.join(a.name for a in attacks)})", unit="batch", disable=not progress)
    try:
        with torch.inference_mode(), _eval_mode(pipeline, reference if needs_ref else None):
            for keys, images, captions in iter_record_batches(items, batch_size, res, batches=mine):
                batch = encode_batch(model, images, captions, keys, seed, latent)
                ref_batch = None
                if encode_ref and ref_model is not None:
                    ref_batch = _encode_reference(ref_model, model, batch, images, captions)
                for attack in attacks:
                    if encoded[attack.name]:
                        s = attack.score_encoded(batch, ref_batch if _needs_reference(attack) else None)
                    else:
                        s = _score_simple(attack, accepted[attack.name], pipeline, images, captions, keys, seed,
                                          reference if _needs_reference(attack) else None)
                    scores_out[attack.name].append(attack_scores(attack, s, batch.size))
                keys_out.append(np.asarray(keys, dtype=np.int64))
                feats_out.append(_feature_pool(batch.latents).float().cpu().numpy())
                bar.update(1)
    finally:
        bar.close()
    return ShardScores(
        keys=np.concatenate(keys_out) if keys_out else np.zeros((0, 2), dtype=np.int64),
        scores={a: np.concatenate(v) if v else np.zeros(0) for a, v in scores_out.items()},
        features=np.concatenate(feats_out) if feats_out else np.zeros((0, 0), dtype=np.float32),
    )


def _score_simple(
    attack: Any, accepted: set[str] | None, pipeline: Any, images: torch.Tensor, captions: Sequence[str | None],
    keys: Sequence[tuple[int, int]], seed: int, reference: Any,
) -> Any:
    """Call an attack's simple-form ``score`` as :class:`Attack` states (images a copy, captions str)."""
    offered = {"seed": seed, "image_seeds": image_seeds(seed, attack.name, keys), "reference": reference}
    kwargs = offered if accepted is None else {k: v for k, v in offered.items() if k in accepted}
    return attack.score(pipeline, images.clone(), ["" if c is None else str(c) for c in captions], **kwargs)


def _encode_reference(ref_model: DiffusionModel, model: DiffusionModel, batch: EncodedBatch, images: Any, captions: Sequence[str | None]) -> EncodedBatch:
    # Reuse the target's encodings when the reference shares the very same VAE / text encoder
    # objects (LoRA / DreamBooth-UNet fine-tunes): same numbers, half the encoder work.
    same_vae = ref_model.vae is model.vae
    same_text = all(getattr(ref_model.pipeline, n, None) is getattr(model.pipeline, n, None) for n in ("text_encoder", "text_encoder_2"))
    latents = batch.latents if same_vae else ref_model.encode_images(images, batch.latent, batch.keys, batch.seed)
    text = batch.text if same_text else ref_model.encode_text(captions, int(images.shape[-1]))
    return EncodedBatch(ref_model, latents, text.to(ref_model.dtype), batch.keys, batch.seed, batch.latent)


# -- the public entry point ------------------------------------------------------------------


def audit_membership(
    pipeline: Any,
    members: Any,
    nonmembers: Any,
    attacks: Iterable[Any] | None = None,
    *,
    reference: Any = None,
    seed: int = 0,
    batch_size: int = 32,
    caption: str | None = None,
    member_groups: Mapping[str, Sequence[int]] | None = None,
    n_boot: int = 1000,
    resolution: int | None = None,
    shift_check: bool = True,
    accelerator: Any = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    pm: Any = None,
    latent: str = "mean",
) -> MembershipResult:
    """Run membership-inference attacks on ``pipeline`` and return scores and metrics.

    - ``members`` / ``nonmembers``: lists of :class:`s2l_plugin.data.ImageRecord` (or testbed
      Samples), or an image folder (captions from metadata.jsonl, sidecar .txt, else ``caption``);
      at least 2 images each.
    - ``attacks``: names from the registry (default ``loss, secmi, pia, pian``, plus
      ``reference`` when ``reference`` is given) or attack objects.
    - ``reference``: the pre-fine-tune base pipeline, for reference-calibrated attacks.
    - ``seed``: every noise draw derives from ``(seed, attack stream, role, index)``.
    - ``member_groups``: named subsets of member indices (e.g. ``{"duplicated": [0, 5]}``);
      each AttackResult gets the metrics of each subset vs all non-members in ``subsets``.
    - ``resolution``: pixel size images are brought to (default: the UNet's); images of
      another size are resized (shorter side) and center-cropped by the same rule in both
      sets, and the result carries a warning saying how many were.
    - ``accelerator`` / ``shard``: score only this process's batches and gather; every process
      returns the same full result, with scores identical to a single-process run.
    - ``latent``: how images become latents for the built-in attacks (and any attack's
      ``score_encoded``): ``"mean"`` (default) the VAE posterior mean, ``"sample"`` one posterior
      draw seeded per image by ``(seed, role, index)``, so a before/after pair sees the same draw.
      Recorded in ``params["latent"]`` of every attack that scores encoded batches; a
      simple-form ``score`` gets pixels and encodes them itself.
    - ``shift_check``: the VAE-latent distribution-shift diagnostic (result ``shift``; a warning
      when the sets are distinguishable from their latents alone).

    Scores point one way: higher = more likely a member. Nothing is written to disk.
    """
    from s2l_plugin.audit import metrics
    from s2l_plugin.audit.mia.data import check_images, latent_shift, resolve_images
    from s2l_plugin.result import AttackResult, MembershipResult

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} is not valid; expected a non-negative integer")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is not valid; expected a positive integer")
    check_latent(latent)
    member_recs = resolve_images(members, caption=caption, what="members")
    nonmember_recs = resolve_images(nonmembers, caption=caption, what="non-members")
    groups = _check_groups(member_groups, len(member_recs))
    attack_objs = resolve_attacks(attacks, has_reference=reference is not None, pm=pm)
    res = resolution or DiffusionModel(pipeline).resolution
    warnings = check_images(member_recs, nonmember_recs, res)

    items = [((MEMBER, i), r) for i, r in enumerate(member_recs)] + [((NONMEMBER, i), r) for i, r in enumerate(nonmember_recs)]
    rank, world = _shard_of(accelerator, shard)
    part = score_shard(
        pipeline, items, attack_objs, reference=reference, seed=seed, batch_size=batch_size,
        shard=(rank, world), resolution=res, progress=progress and rank == 0, latent=latent,
    )
    parts = _gather(accelerator, part) if accelerator is not None and world > 1 else [part]
    merged, features = merge_shards(parts, len(member_recs), len(nonmember_recs))

    shift = None
    if shift_check:
        shift = latent_shift(features[: len(member_recs)], features[len(member_recs) :], seed=seed)
        if shift.get("warning"):
            warnings.append(shift["warning"])
    member_ids = [str(r.path) for r in member_recs]
    nonmember_ids = [str(r.path) for r in nonmember_recs]
    results = []
    for attack in attack_objs:
        m, n = merged[attack.name]
        stats = metrics.membership_metrics(m, n, n_boot=n_boot, seed=seed)
        subsets = {}
        for gname, idx in groups.items():
            sub = metrics.membership_metrics(m[idx], n, n_boot=n_boot, seed=seed)
            subsets[gname] = {
                "member_indices": list(idx),
                **{k: sub[k] for k in ("auc", "auc_ci", "tpr_at_1fpr", "tpr_at_1fpr_ci", "tpr_at_01fpr", "asr", "advantage")},
            }
        results.append(
            AttackResult(
                attack=attack.name,
                member_ids=member_ids,
                nonmember_ids=nonmember_ids,
                member_scores=[float(v) for v in m],
                nonmember_scores=[float(v) for v in n],
                params={**dict(getattr(attack, "params", {})),
                        **({"latent": latent} if callable(getattr(attack, "score_encoded", None)) else {})},
                unet_calls_per_image=getattr(attack, "unet_calls_per_image", None),
                subsets=subsets,
                **stats,
            )
        )
    for w in warnings:
        log.warning("%s", w)
    return MembershipResult(
        attacks=results,
        n_members=len(member_recs),
        n_nonmembers=len(nonmember_recs),
        seed=seed,
        shift=shift,
        warnings=warnings,
    )


def _check_groups(groups: Mapping[str, Sequence[int]] | None, n_members: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, idx in (groups or {}).items():
        idx = [int(i) for i in idx]
        bad = [i for i in idx if not 0 <= i < n_members]
        if bad:
            raise ConfigError(f"member_groups[{name!r}] has index(es) {bad[:5]} out of range; expected 0 <= i < {n_members} (member count)")
        if len(idx) < 1:
            raise ConfigError(f"member_groups[{name!r}] is empty; expected at least one member index")
        out[str(name)] = idx
    return out


def _shard_of(accelerator: Any, shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is not None:
        rank, world = shard
        shard_batches(0, rank, world)  # validates
        return int(rank), int(world)
    if accelerator is not None:
        return int(accelerator.process_index), int(accelerator.num_processes)
    return 0, 1


def _gather(accelerator: Any, part: ShardScores) -> list[ShardScores]:
    from accelerate.utils import gather_object

    gathered = gather_object([part])
    return list(gathered)
