"""Does a target fit its base? Width checks that end in one FormatError naming both numbers.

Three widths decide whether a fine-tuned artifact belongs to a base model: the text encoder's
hidden width (= token-embedding width), the UNet's block widths, and the UNet's cross-attention
width (which must equal the text width). A LoRA factor also fixes the input and output width of
the layer it patches, so a LoRA for SD 1.5 (cross-attention 768) on the testbed (32) fails here
before any weight is touched, never half-applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from s2l_plugin.errors import FormatError


def pipeline_widths(pipe: Any) -> dict[str, Any]:
    """``{"text_width", "unet_block_widths", "cross_attention_width"}`` of a StableDiffusionPipeline; for an
    SD3/Flux pipeline the transformer's widths stand in for the UNet's (its class and inner width
    ``heads x head dim`` as the block widths, its joint-attention width as the cross-attention width)."""
    text_width = int(pipe.text_encoder.config.hidden_size)
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        cfg = pipe.transformer.config
        return {
            "text_width": text_width,
            "unet_block_widths": [type(pipe.transformer).__name__, int(cfg.num_attention_heads) * int(cfg.attention_head_dim)],
            "cross_attention_width": int(cfg.joint_attention_dim),
        }
    unet_cfg = pipe.unet.config
    cross = unet_cfg.cross_attention_dim
    return {
        "text_width": text_width,
        "unet_block_widths": [int(w) for w in unet_cfg.block_out_channels],
        "cross_attention_width": int(cross) if isinstance(cross, int) else [int(c) for c in cross],
    }


_LABELS = {
    "text_width": "text-encoder width",
    "unet_block_widths": "UNet block widths",
    "cross_attention_width": "cross-attention width",
}


def check_pipelines_compatible(target: Any, base: Any, *, target_name: str = "target", base_name: str = "base") -> None:
    """FormatError naming the first width that differs between two pipelines (target's number, then base's)."""
    t, b = pipeline_widths(target), pipeline_widths(base)
    for key, label in _LABELS.items():
        if t[key] != b[key]:
            raise FormatError(f"{target_name} has {label} {t[key]} but {base_name} has {b[key]}; expected the same architecture")


def _width_label(component: str, path: str, side: str) -> str:
    if component.startswith("text_encoder"):
        return "text-encoder width"
    if side == "in" and (".attn2.to_k" in path or ".attn2.to_v" in path):
        return "cross-attention width"
    return "UNet block width" if component == "unet" else f"{component} width"


def check_lora_shapes(
    model: Any, factors: Mapping[str, tuple[Any, Any]], *, component: str, source: str = "LoRA"
) -> None:
    """Check every LoRA factor pair against the module it patches in ``model``; FormatError on the first misfit.

    ``factors`` maps a module path (as in ``model.named_modules()``) to ``(down, up)`` tensors:
    down is [r, in] (Linear) or [r, in, kh, kw] (Conv2d), up is [out, r] or [out, r, 1, 1].
    The error names the module, the width kind (text-encoder / cross-attention / UNet block)
    and both numbers.
    """
    import torch

    modules = dict(model.named_modules())
    for path, (down, up) in factors.items():
        module = modules.get(path)
        if module is None:
            raise FormatError(f"{source}: module {path!r} is not in the base {component}; expected a {component} layer")
        if hasattr(module, "get_base_layer"):  # a base that already carries a peft adapter
            module = module.get_base_layer()
        if isinstance(module, torch.nn.Linear):
            expected_in, expected_out, kernel = module.in_features, module.out_features, None
        elif isinstance(module, torch.nn.Conv2d):
            expected_in, expected_out, kernel = module.in_channels, module.out_channels, tuple(module.kernel_size)
        else:
            raise FormatError(f"{source}: module {path!r} of the base {component} is a {type(module).__name__}; expected Linear or Conv2d")
        if down.ndim not in (2, 4) or up.ndim != down.ndim:
            raise FormatError(f"{source}: module {path!r} has factor shapes {tuple(down.shape)} / {tuple(up.shape)}; expected 2-D or 4-D pairs")
        rank = int(down.shape[0])
        if int(down.shape[1]) != expected_in:
            label = _width_label(component, path, "in")
            raise FormatError(f"{source}: {label} mismatch at {component}.{path}: the file has input width {int(down.shape[1])}, the base has {expected_in}")
        if int(up.shape[0]) != expected_out:
            label = _width_label(component, path, "out")
            raise FormatError(f"{source}: {label} mismatch at {component}.{path}: the file has output width {int(up.shape[0])}, the base has {expected_out}")
        if int(up.shape[1]) != rank or rank < 1:
            raise FormatError(f"{source}: module {path!r} has down rank {rank} but up rank {int(up.shape[1])}; expected equal ranks >= 1")
        if down.ndim == 4:
            if kernel is None:
                raise FormatError(f"{source}: module {path!r} has 4-D (conv) factors but the base layer is Linear")
            if tuple(down.shape[2:]) != kernel or tuple(up.shape[2:]) != (1, 1):
                raise FormatError(
                    f"{source}: conv module {path!r} has kernel {tuple(down.shape[2:])} but the base has {kernel}"
                )
        elif kernel is not None and kernel != (1, 1):
            raise FormatError(f"{source}: module {path!r} has 2-D factors but the base layer is a {kernel} convolution")
