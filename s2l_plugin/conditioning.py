"""The text conditioning of a text-to-image denoiser (SD 1.x/2.x, SDXL, SD3, Flux): built and passed in one place.

Stable Diffusion 1.x/2.x conditions its UNet on one text encoder's hidden states, a tensor
``[B, L, D]``. SDXL conditions on both text encoders' hidden states concatenated, plus the second
encoder's pooled (projected) embedding and six size/crop numbers (``add_time_ids``), which the
UNet takes as ``added_cond_kwargs``. Every stage (the attacks, the memorization score, training)
builds the conditioning with :func:`encode_prompts` and calls the UNet with :func:`unet_forward`,
so none of them needs to know which family it runs on: an SDXL conditioning is a
:class:`SDXLCondition`, which slices, repeats, casts and concatenates like the tensor it replaces.

The flow-matching families (Stable Diffusion 3, Flux) denoise with a transformer
(``pipeline.transformer``, :func:`denoiser`) that predicts the velocity ``ε − x0`` of
``x_t = (1 − σ)·x0 + σ·ε``. Their conditioning is a :class:`FlowCondition` (T5 + CLIP hidden
states, the pooled CLIP embedding; Flux also its text position ids and, for guidance-distilled
models, the guidance value), and :func:`unet_forward` takes the latents as ``[B, C, h, w]`` and
the timestep on the scheduler's scale ``σ·1000`` for every family, packing Flux's 2x2 latent
patches and unpacking its output itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class SDXLCondition:
    """SDXL's conditioning for B samples.

    ``hidden``: ``[B, L, D1 + D2]`` both encoders' penultimate hidden states, concatenated;
    ``pooled``: ``[B, P]`` the second encoder's projected embedding; ``time_ids``: ``[B, 6]``
    (original height, width, crop top, left, target height, width, in pixels).
    """

    hidden: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.hidden.shape)

    @property
    def dtype(self) -> Any:
        return self.hidden.dtype

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def __getitem__(self, index: Any) -> SDXLCondition:
        return SDXLCondition(self.hidden[index], self.pooled[index], self.time_ids[index])

    def repeat_interleave(self, repeats: int, dim: int = 0) -> SDXLCondition:
        if dim != 0:
            raise ValueError("an SDXL conditioning repeats along the batch dimension only (dim=0)")
        return SDXLCondition(*(t.repeat_interleave(repeats, dim=0) for t in (self.hidden, self.pooled, self.time_ids)))

    def to(self, *args: Any, **kwargs: Any) -> SDXLCondition:
        """Cast/move the hidden states and pooled embedding; the size/crop ids keep their dtype but follow a device."""
        device = kwargs.get("device") or next((a for a in args if not _is_dtype(a)), None)
        return SDXLCondition(self.hidden.to(*args, **kwargs), self.pooled.to(*args, **kwargs),
                             self.time_ids.to(device) if device is not None else self.time_ids)

    def float(self) -> SDXLCondition:
        return SDXLCondition(self.hidden.float(), self.pooled.float(), self.time_ids)

    def cpu(self) -> SDXLCondition:
        return SDXLCondition(self.hidden.cpu(), self.pooled.cpu(), self.time_ids.cpu())


@dataclass
class FlowCondition:
    """A flow-matching transformer's conditioning for B samples.

    ``hidden``: ``[B, L, D]`` the joint-attention context (Flux: T5's hidden states; SD3: both
    CLIPs' penultimate states, zero-padded to T5's width, then T5's along the sequence);
    ``pooled``: ``[B, P]`` the pooled CLIP embedding(s); ``family``: "flux" or "sd3";
    ``text_ids``: Flux's ``[L, 3]`` text position ids (shared by the batch; None for SD3);
    ``guidance``: the guidance value a guidance-distilled Flux is conditioned on (None otherwise).
    """

    hidden: torch.Tensor
    pooled: torch.Tensor
    family: str
    text_ids: Any = None
    guidance: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.hidden.shape)

    @property
    def dtype(self) -> Any:
        return self.hidden.dtype

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def _with(self, hidden: Any, pooled: Any, text_ids: Any = None) -> FlowCondition:
        return FlowCondition(hidden, pooled, self.family, self.text_ids if text_ids is None else text_ids, self.guidance)

    def __getitem__(self, index: Any) -> FlowCondition:
        return self._with(self.hidden[index], self.pooled[index])

    def repeat_interleave(self, repeats: int, dim: int = 0) -> FlowCondition:
        if dim != 0:
            raise ValueError("a flow-matching conditioning repeats along the batch dimension only (dim=0)")
        return self._with(self.hidden.repeat_interleave(repeats, dim=0), self.pooled.repeat_interleave(repeats, dim=0))

    def to(self, *args: Any, **kwargs: Any) -> FlowCondition:
        """Cast/move the hidden states and pooled embedding; the text ids keep their dtype but follow a device."""
        device = kwargs.get("device") or next((a for a in args if not _is_dtype(a)), None)
        ids = self.text_ids.to(device) if device is not None and self.text_ids is not None else None
        return self._with(self.hidden.to(*args, **kwargs), self.pooled.to(*args, **kwargs), ids)

    def float(self) -> FlowCondition:
        return self._with(self.hidden.float(), self.pooled.float())

    def cpu(self) -> FlowCondition:
        return self._with(self.hidden.cpu(), self.pooled.cpu(), self.text_ids.cpu() if self.text_ids is not None else None)


def _flow_families() -> dict[str, str]:
    from s2l_plugin.pipeline import PIPELINE_CLASSES

    return {family: cls for cls, family in PIPELINE_CLASSES.items() if family in ("flux", "sd3")}


#: The flow-matching families (a transformer denoiser predicting velocity) and the pipeline class of
#: each, read from :data:`s2l_plugin.pipeline.PIPELINE_CLASSES`.
FLOW_FAMILIES = _flow_families()
#: The guidance value a guidance-distilled Flux is conditioned on when training and auditing (the
#: default ``--guidance_scale`` of diffusers' train_dreambooth_lora_flux.py and FluxPipeline).
FLUX_GUIDANCE = 3.5


def pipeline_family(pipeline: Any) -> str:
    """"sd", "sdxl", "sd3" or "flux" for a loaded pipeline (by its class name, then its denoiser)."""
    for family, cls in FLOW_FAMILIES.items():
        if type(pipeline).__name__ == cls:
            return family
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None and getattr(pipeline, "unet", None) is None:
        name = type(transformer).__name__
        if name.startswith("Flux"):
            return "flux"
        if name.startswith("SD3"):
            return "sd3"
        raise TypeError(f"a {type(pipeline).__name__} with a {name} is not a supported denoiser; expected a UNet, SD3 or Flux transformer")
    return "sdxl" if is_sdxl_unet(getattr(pipeline, "unet", None)) else "sd"


def denoiser(pipeline: Any) -> Any:
    """The pipeline's denoising network: ``pipeline.unet``, or ``pipeline.transformer`` for SD3/Flux."""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else pipeline.transformer


def vae_factor(pipeline: Any) -> int:
    """Pixels per latent cell: 2 ** (VAE blocks - 1), as every diffusers pipeline computes it."""
    return 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


def default_resolution(pipeline: Any) -> int:
    """The pixel size a pipeline generates and is audited at by default: the denoiser's ``sample_size``
    latent cells (UNet, SD3) times :func:`vae_factor`; Flux's transformer has none, so its VAE's
    ``sample_size`` (1024 in Flux.1's vae/config.json, the FluxPipeline default)."""
    net = denoiser(pipeline)
    sample = getattr(net.config, "sample_size", None)
    if sample is None or pipeline_family(pipeline) == "flux":
        return int(pipeline.vae.config.sample_size)
    return int(sample) * vae_factor(pipeline)


def _is_dtype(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.dtype)


def is_sdxl_unet(unet: Any) -> bool:
    """True for a UNet conditioned on pooled text and size/crop ids (SDXL's ``addition_embed_type="text_time"``)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def time_ids(height: int, width: int, batch: int, device: Any = None) -> torch.Tensor:
    """SDXL's ``add_time_ids`` ``[batch, 6]`` for an uncropped ``height`` x ``width`` image, as the SDXL
    pipeline sets them by default (original size = target size, crop (0, 0)); float32."""
    import torch

    row = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device)
    return row.repeat(batch, 1)


def encode_prompts(pipeline: Any, prompts: Sequence[str], device: Any, *, resolution: int | None = None) -> Any:
    """The conditioning of ``prompts`` (no classifier-free guidance): a ``[B, L, D]`` tensor for SD 1.x/2.x,
    an :class:`SDXLCondition` for SDXL (``resolution``: the pixel size its size ids name; default the
    UNet's ``sample_size`` times the VAE factor). Encoded with the pipeline's own ``encode_prompt``, so
    Textual Inversion tokens and LoRA text layers apply."""
    family = pipeline_family(pipeline)
    if family in FLOW_FAMILIES:
        return _encode_flow(pipeline, family, list(prompts), device)
    if family == "sd":
        embeds, _ = pipeline.encode_prompt(list(prompts), device, 1, False)
        return embeds
    hidden, _, pooled, _ = pipeline.encode_prompt(
        prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    size = resolution or default_resolution(pipeline)
    return SDXLCondition(hidden, pooled, time_ids(size, size, len(prompts), device))


def encode_guidance_pair(pipeline: Any, prompt: str, device: Any, n: int, *, resolution: int | None = None) -> tuple[Any, Any]:
    """``(conditional, unconditional)`` conditionings of ``prompt`` repeated ``n`` times, as the pipeline's
    own classifier-free guidance builds them (SDXL: zeros for the empty prompt when its config says so)."""
    family = pipeline_family(pipeline)
    if family in FLOW_FAMILIES:
        # SD3's own classifier-free guidance encodes the empty prompt; Flux has no negative branch
        # (Flux.1-dev is guidance-distilled), so its "unconditional" is the empty prompt through the
        # same conditional path, which is what a second FluxPipeline call with prompt="" computes.
        return _encode_flow(pipeline, family, [prompt] * n, device), _encode_flow(pipeline, family, [""] * n, device)
    if family == "sd":
        return pipeline.encode_prompt(prompt, device, n, True, negative_prompt=None)
    hidden, neg_hidden, pooled, neg_pooled = pipeline.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=n, do_classifier_free_guidance=True
    )
    size = resolution or default_resolution(pipeline)
    ids = time_ids(size, size, n, device)
    return SDXLCondition(hidden, pooled, ids), SDXLCondition(neg_hidden, neg_pooled, ids)


def _encode_flow(pipeline: Any, family: str, prompts: list[str], device: Any) -> FlowCondition:
    """A :class:`FlowCondition` from the pipeline's own ``encode_prompt`` (its default T5 length)."""
    if family == "flux":
        hidden, pooled, text_ids = pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1)
        guided = bool(getattr(pipeline.transformer.config, "guidance_embeds", False))
        return FlowCondition(hidden, pooled, "flux", text_ids, FLUX_GUIDANCE if guided else None)
    hidden, _, pooled, _ = pipeline.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return FlowCondition(hidden, pooled, "sd3")


def cat(conds: Sequence[Any]) -> Any:
    """Concatenate conditionings along the batch (tensors or :class:`SDXLCondition`, not mixed)."""
    import torch

    if isinstance(conds[0], SDXLCondition):
        return SDXLCondition(*(torch.cat([getattr(c, f) for c in conds]) for f in ("hidden", "pooled", "time_ids")))
    if isinstance(conds[0], FlowCondition):
        return conds[0]._with(torch.cat([c.hidden for c in conds]), torch.cat([c.pooled for c in conds]))
    return torch.cat(list(conds))


def stack(items: Sequence[Any]) -> Any:
    """Stack per-sample conditionings (``cond[i]`` of either kind) into a batch."""
    import torch

    if isinstance(items[0], SDXLCondition):
        return SDXLCondition(*(torch.stack([getattr(c, f) for c in items]) for f in ("hidden", "pooled", "time_ids")))
    if isinstance(items[0], FlowCondition):
        return items[0]._with(torch.stack([c.hidden for c in items]), torch.stack([c.pooled for c in items]))
    return torch.stack(list(items))


def unet_forward(unet: Any, sample: Any, timestep: Any, cond: Any, **kwargs: Any) -> Any:
    """``unet(sample, timestep, ...)`` with ``cond`` passed the way the denoiser's family takes it;
    ``kwargs`` (e.g. ``return_dict=False``) go through. Returns what the UNet returns.

    For a flow-matching transformer (``cond`` a :class:`FlowCondition`): ``sample`` ``[B, C, h, w]``
    latents, ``timestep`` ``σ·1000`` (a number or ``[B]``, the scale of the scheduler's timesteps);
    the velocity prediction ``[B, C, h, w]`` comes back as ``.sample`` (or ``(prediction,)`` with
    ``return_dict=False``), Flux's latents packed into 2x2 patches and unpacked here."""
    if isinstance(cond, FlowCondition):
        return _flow_forward(unet, sample, timestep, cond, **kwargs)
    if isinstance(cond, SDXLCondition):
        added = {"text_embeds": cond.pooled.to(sample.dtype), "time_ids": cond.time_ids.to(sample.device)}
        return unet(sample, timestep, encoder_hidden_states=cond.hidden, added_cond_kwargs=added, **kwargs)
    if is_sdxl_unet(unet):
        raise TypeError("an SDXL UNet needs an SDXLCondition (pooled text and size ids); got a bare tensor")
    return unet(sample, timestep, encoder_hidden_states=cond, **kwargs)


def _flow_forward(transformer: Any, sample: Any, timestep: Any, cond: FlowCondition, return_dict: bool = True, **kwargs: Any) -> Any:
    import torch
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    b, c, h, w = sample.shape
    t = torch.as_tensor(timestep, device=sample.device, dtype=sample.dtype)
    t = t.expand(b) if t.ndim == 0 else t.to(sample.dtype)
    hidden, pooled = cond.hidden.to(sample.dtype), cond.pooled.to(sample.dtype)
    if cond.family == "sd3":
        out = transformer(hidden_states=sample, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled,
                          return_dict=False, **kwargs)[0]
    else:
        from diffusers import FluxPipeline

        packed = FluxPipeline._pack_latents(sample, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, sample.device, sample.dtype)
        guidance = None
        if getattr(transformer.config, "guidance_embeds", False):
            guidance = torch.full((b,), float(cond.guidance if cond.guidance is not None else FLUX_GUIDANCE), device=sample.device,
                                  dtype=sample.dtype)
        # FluxTransformer2DModel multiplies the timestep (and guidance) by 1000 itself, as FluxPipeline divides it.
        out = transformer(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                          encoder_hidden_states=hidden, txt_ids=cond.text_ids.to(sample.device), img_ids=img_ids,
                          return_dict=False, **kwargs)[0]
        out = FluxPipeline._unpack_latents(out, h, w, 1)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)
