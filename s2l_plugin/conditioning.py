"""The text conditioning of a Stable Diffusion or SDXL UNet: built and passed in one place.

Stable Diffusion 1.x/2.x conditions its UNet on one text encoder's hidden states, a tensor
``[B, L, D]``. SDXL conditions on both text encoders' hidden states concatenated, plus the second
encoder's pooled (projected) embedding and six size/crop numbers (``add_time_ids``), which the
UNet takes as ``added_cond_kwargs``. Every stage (the attacks, the memorization score, training)
builds the conditioning with :func:`encode_prompts` and calls the UNet with :func:`unet_forward`,
so none of them needs to know which family it runs on: an SDXL conditioning is a
:class:`SDXLCondition`, which slices, repeats, casts and concatenates like the tensor it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

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
    if not is_sdxl_unet(pipeline.unet):
        embeds, _ = pipeline.encode_prompt(list(prompts), device, 1, False)
        return embeds
    hidden, _, pooled, _ = pipeline.encode_prompt(
        prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    size = resolution or _default_resolution(pipeline)
    return SDXLCondition(hidden, pooled, time_ids(size, size, len(prompts), device))


def encode_guidance_pair(pipeline: Any, prompt: str, device: Any, n: int, *, resolution: int | None = None) -> tuple[Any, Any]:
    """``(conditional, unconditional)`` conditionings of ``prompt`` repeated ``n`` times, as the pipeline's
    own classifier-free guidance builds them (SDXL: zeros for the empty prompt when its config says so)."""
    if not is_sdxl_unet(pipeline.unet):
        return pipeline.encode_prompt(prompt, device, n, True, negative_prompt=None)
    hidden, neg_hidden, pooled, neg_pooled = pipeline.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=n, do_classifier_free_guidance=True
    )
    size = resolution or _default_resolution(pipeline)
    ids = time_ids(size, size, n, device)
    return SDXLCondition(hidden, pooled, ids), SDXLCondition(neg_hidden, neg_pooled, ids)


def _default_resolution(pipeline: Any) -> int:
    factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    return int(pipeline.unet.config.sample_size) * factor


def cat(conds: Sequence[Any]) -> Any:
    """Concatenate conditionings along the batch (tensors or :class:`SDXLCondition`, not mixed)."""
    import torch

    if isinstance(conds[0], SDXLCondition):
        return SDXLCondition(*(torch.cat([getattr(c, f) for c in conds]) for f in ("hidden", "pooled", "time_ids")))
    return torch.cat(list(conds))


def stack(items: Sequence[Any]) -> Any:
    """Stack per-sample conditionings (``cond[i]`` of either kind) into a batch."""
    import torch

    if isinstance(items[0], SDXLCondition):
        return SDXLCondition(*(torch.stack([getattr(c, f) for c in items]) for f in ("hidden", "pooled", "time_ids")))
    return torch.stack(list(items))


def unet_forward(unet: Any, sample: Any, timestep: Any, cond: Any, **kwargs: Any) -> Any:
    """``unet(sample, timestep, ...)`` with ``cond`` passed the way the UNet's family takes it;
    ``kwargs`` (e.g. ``return_dict=False``) go through. Returns what the UNet returns."""
    if isinstance(cond, SDXLCondition):
        added = {"text_embeds": cond.pooled.to(sample.dtype), "time_ids": cond.time_ids.to(sample.device)}
        return unet(sample, timestep, encoder_hidden_states=cond.hidden, added_cond_kwargs=added, **kwargs)
    if is_sdxl_unet(unet):
        raise TypeError("an SDXL UNet needs an SDXLCondition (pooled text and size ids); got a bare tensor")
    return unet(sample, timestep, encoder_hidden_states=cond, **kwargs)
