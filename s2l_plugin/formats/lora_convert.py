"""Pure LoRA state-dict conversions between the peft, diffusers and kohya layouts.

Three layouts of the same low-rank factors ``W + (alpha / r) * up @ down``:

- **peft** (one model's ``get_peft_model_state_dict``): ``<module path>.lora_A.weight`` (down,
  [r, in]) and ``<module path>.lora_B.weight`` (up, [out, r]); alpha lives in the LoraConfig.
- **diffusers** (``pytorch_lora_weights.safetensors`` from ``save_lora_weights``): the same keys
  prefixed by the component (``unet.`` / ``text_encoder.``), with ``lora_A``/``lora_B``, or the
  older ``lora.down``/``lora.up`` and ``lora_linear_layer.down``/``.up`` spellings; alpha is in
  the file's ``lora_adapter_metadata`` (or equals the rank when absent).
- **kohya** (sd-scripts ``networks/lora.py``, A1111): ``lora_unet_<path with _>.lora_down.weight``,
  ``.lora_up.weight`` and a scalar ``.alpha`` per module; text-encoder modules are named
  ``lora_te_text_model_<...>`` after the CLIP ``text_model`` path.

Every function takes and returns plain dicts of tensors (no model, no I/O), so the formats and
audit code can reuse them. Kohya names replace dots with underscores, which is ambiguous
(``to_out_0`` vs ``to.out.0``); the kohya → peft direction therefore takes the model's module
names to map back exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from s2l_plugin.errors import FormatError

KOHYA_UNET_PREFIX = "lora_unet"
KOHYA_TE_PREFIX = "lora_te"
#: kohya names CLIP modules from the ``CLIPTextModel`` root, whose children sit under ``text_model``.
KOHYA_TE_MODULE_ROOT = "text_model."
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
#: LyCORIS LoHa / LoKr tensor names; peft's LoHa / LoKr layers use the same names (``<module>.hada_w1_a``).
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
#: DoRA's magnitude: kohya/LyCORIS ``dora_scale``, peft ``lora_magnitude_vector``.
MAGNITUDE = "lora_magnitude_vector"
#: kohya/LyCORIS key suffix -> the peft state-dict suffix of the same tensor (alpha is kept apart)
_KOHYA_TO_PEFT = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "dora_scale": MAGNITUDE,
                  **{s: s for s in LOHA_SUFFIXES + LOKR_SUFFIXES}}
#: the original (SGM) UNet block names kohya uses for SDXL
SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")

_DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")
_UP_SUFFIXES = (".lora_B.weight", ".lora.up.weight", ".lora_linear_layer.up.weight")


def _split_factor(key: str) -> tuple[str, str] | None:
    """``(module path, "down"|"up")`` for a peft/diffusers factor key, None for anything else."""
    for suffix in _DOWN_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], "down"
    for suffix in _UP_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], "up"
    return None


def _convert_peft_to_kohya(
    state_dict: Mapping[str, Any], prefix: str, alphas: Mapping[str, float] | float, *, module_root: str = ""
) -> dict[str, Any]:
    """peft keys of one model → kohya keys with ``prefix`` (``lora_unet`` / ``lora_te``).

    ``alphas`` is one alpha for every module or ``{module path: alpha}``; each module gets a
    scalar ``.alpha`` tensor (float32) as kohya writes it. ``module_root`` is prepended to module
    paths that do not already start with it (``"text_model."`` for transformers' CLIPTextModel
    when its state dict is rooted at the inner model). FormatError on a key that is not a LoRA
    factor, or a module missing its down or up factor.
    """
    import torch

    out: dict[str, Any] = {}
    seen: dict[str, set[str]] = {}
    for key, tensor in state_dict.items():
        split = _split_factor(key)
        if split is None:
            raise FormatError(f"key {key!r} is not a LoRA factor; expected '<module>.lora_A.weight' or '.lora_B.weight'")
        path, side = split
        full = path if path.startswith(module_root) else module_root + path
        name = f"{prefix}_{full.replace('.', '_')}"
        out[f"{name}.lora_{side}.weight"] = tensor
        seen.setdefault(path, set()).add(side)
        alpha = alphas if isinstance(alphas, (int, float)) else alphas.get(path)
        if alpha is None:
            raise FormatError(f"no alpha for LoRA module {path!r}; expected one alpha per module")
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    incomplete = sorted(p for p, sides in seen.items() if sides != {"down", "up"})
    if incomplete:
        raise FormatError(f"LoRA module {incomplete[0]!r} has only a {next(iter(seen[incomplete[0]]))} factor; expected down and up")
    return out


def _convert_kohya_to_peft(
    state_dict: Mapping[str, Any], prefix: str, module_names: Iterable[str], *, module_root: str = "",
    paths: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """kohya / LyCORIS keys with ``prefix`` → (peft state dict, ``{module path: alpha}``).

    ``module_names`` are the target model's module names (``model.named_modules()``), used to
    undo the dot → underscore flattening; ``paths`` maps further flattened names (without the
    prefix) to module paths (the SDXL block names, through :func:`sgm_unet_module_paths`). Keys
    with another prefix are ignored; ``module_root`` is stripped from names that carry it but whose
    model does not. ``lora_down``/``lora_up`` become ``lora_A``/``lora_B``, ``dora_scale`` becomes
    DoRA's ``lora_magnitude_vector`` and LoHa/LoKr tensors keep their names (peft's layers use
    LyCORIS's). A LoRA module without ``.alpha`` gets alpha = its rank (kohya's loader does the
    same). FormatError for a name that matches no module (naming both), or an unknown suffix.
    """
    names = list(module_names)
    known = set(names)
    lookup = {n.replace(".", "_"): n for n in names}
    lookup.update(paths or {})
    root_flat = module_root.replace(".", "_")
    lead = prefix + "_"
    out: dict[str, Any] = {}
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for key, tensor in state_dict.items():
        if not key.startswith(lead):
            continue
        flat, _, suffix = key[len(lead):].partition(".")
        path = lookup.get(flat)
        if path is None and root_flat and flat.startswith(root_flat):
            path = lookup.get(flat[len(root_flat):])
        if path is None or path not in known:
            mapped = f" (diffusers maps it to {path!r})" if path is not None else ""
            raise FormatError(f"kohya module {key.partition('.')[0]!r}{mapped} matches no module of the target model; expected one of its layers")
        if suffix == "alpha":
            alphas[path] = float(tensor.item() if hasattr(tensor, "item") else tensor)
        elif suffix in _KOHYA_TO_PEFT:
            out[f"{path}.{_KOHYA_TO_PEFT[suffix]}"] = tensor
            if suffix == "lora_down.weight":
                ranks[path] = int(tensor.shape[0])
        else:
            raise FormatError(f"key {key!r} has suffix {suffix!r}; expected lora_down.weight, lora_up.weight, alpha, "
                              "dora_scale or LoHa/LoKr factors (hada_*, lokr_*)")
    for path, rank in ranks.items():
        alphas.setdefault(path, float(rank))
    return out, alphas


def sgm_unet_module_paths(flat_names: Iterable[str], unet_config: Any) -> dict[str, str]:
    """SDXL's original (SGM) kohya module names (``input_blocks_4_1_proj_in``, without ``lora_unet_``) → UNet
    module paths (``down_blocks.1.attentions.0.proj_in``), by diffusers' own conversion.

    diffusers maps the block numbers with the UNet's ``layers_per_block``
    (``StableDiffusionXLPipeline.lora_state_dict``) and then renames to peft paths
    (``convert_unet_state_dict_to_peft``); each name is passed through as a tagged LoRA factor, so the
    mapping holds for any suffix (LoHa, LoKr, DoRA). A path that is not a module of the base is
    left for the caller to refuse; FormatError when diffusers cannot map a name, or maps two to one path.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    names = sorted(set(flat_names))
    if not names:
        return {}
    tagged: dict[str, Any] = {}
    for i, name in enumerate(names):
        for side in ("lora_down", "lora_up"):
            tagged[f"{KOHYA_UNET_PREFIX}_{name}.{side}.weight"] = torch.tensor([float(i)])
    try:
        converted, _ = StableDiffusionXLPipeline.lora_state_dict(tagged, unet_config=unet_config)
        peft_keys = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in converted.items() if k.startswith("unet.")})
    except (ValueError, IndexError, KeyError) as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FormatError(f"kohya SDXL block names ({KOHYA_UNET_PREFIX}_{names[0]} ...) could not be mapped by diffusers: {msg[:200]}") from exc
    paths: dict[str, str] = {}
    for key, tag in peft_keys.items():
        if key.endswith(".lora_A.weight"):
            name, path = names[int(tag.item())], key[: -len(".lora_A.weight")]
            if path in paths.values():
                raise FormatError(f"kohya modules {KOHYA_UNET_PREFIX}_{name} and another both map to UNet module {path!r}; expected one file key per module")
            paths[name] = path
    missing = [n for n in names if n not in paths]
    if missing:
        raise FormatError(f"kohya module {KOHYA_UNET_PREFIX}_{missing[0]} was not mapped by diffusers' SDXL conversion; expected an SDXL UNet block name")
    return paths


def _convert_diffusers_to_peft(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A diffusers LoRA file's tensors → ``{component: peft state dict}`` (``unet``, ``text_encoder``, ``text_encoder_2``).

    Accepts the ``lora_A``/``lora_B``, ``lora.down``/``lora.up`` and ``lora_linear_layer`` spellings,
    and DoRA's ``lora_magnitude_vector`` (peft's name, which ``save_lora_weights`` keeps).
    FormatError on a key without a known component prefix or factor suffix.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in DIFFUSERS_COMPONENTS or not rest:
            raise FormatError(f"key {key!r} has no component prefix; expected one of: {', '.join(c + '.' for c in DIFFUSERS_COMPONENTS)}")
        if rest.endswith("." + MAGNITUDE):
            out.setdefault(component, {})[rest] = tensor
            continue
        split = _split_factor(rest)
        if split is None:
            raise FormatError(f"key {key!r} is not a LoRA factor; expected '.lora_A.weight'/'.lora_B.weight' (or lora.down/lora.up)")
        path, side = split
        out.setdefault(component, {})[f"{path}.lora_{'A' if side == 'down' else 'B'}.weight"] = tensor
    return out


def _convert_peft_to_diffusers(components: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{component: peft state dict}`` → one diffusers-layout dict (``<component>.<path>.lora_A.weight``)."""
    return {f"{component}.{key}": tensor for component, sd in components.items() for key, tensor in sd.items()}


def rank_of(state_dict: Mapping[str, Any]) -> dict[str, int]:
    """``{module path: rank}`` of a peft-layout state dict (rank = rows of the down factor)."""
    ranks = {}
    for key, tensor in state_dict.items():
        split = _split_factor(key)
        if split is not None and split[1] == "down":
            ranks[split[0]] = int(tensor.shape[0])
    return ranks


def convert_diffusers_to_kohya(
    state_dict: Mapping[str, Any], alphas: Mapping[str, Mapping[str, float] | float] | None = None
) -> dict[str, Any]:
    """A diffusers LoRA state dict → kohya keys (``lora_unet_…`` / ``lora_te_text_model_…``) with ``.alpha``.

    ``alphas`` maps a component to one alpha or ``{module path: alpha}``; a component left out
    gets alpha = rank per module (what a diffusers file without metadata means: scale 1).
    """
    out: dict[str, Any] = {}
    alphas = alphas or {}
    for component, sd in _convert_diffusers_to_peft(state_dict).items():
        comp_alpha = alphas.get(component)
        if comp_alpha is None:
            comp_alpha = {path: float(r) for path, r in rank_of(sd).items()}
        if component == "unet":
            out.update(_convert_peft_to_kohya(sd, KOHYA_UNET_PREFIX, comp_alpha))
        else:
            prefix = KOHYA_TE_PREFIX + ("2" if component == "text_encoder_2" else "")
            out.update(_convert_peft_to_kohya(sd, prefix, comp_alpha, module_root=KOHYA_TE_MODULE_ROOT))
    return out


def convert_kohya_to_diffusers(
    state_dict: Mapping[str, Any], module_names: Mapping[str, Iterable[str]]
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """A kohya LoRA state dict → (diffusers-layout dict, ``{component: {module path: alpha}}``).

    ``module_names`` gives each target component's module names (``{"unet": [...],
    "text_encoder": [...]}``). FormatError when a key belongs to neither prefix.
    """
    prefixes = {KOHYA_UNET_PREFIX: "unet", KOHYA_TE_PREFIX: "text_encoder"}
    stray = [k for k in state_dict if not k.startswith(tuple(p + "_" for p in prefixes))]
    if stray:
        raise FormatError(f"key {stray[0]!r} is not a kohya SD1 LoRA key; expected 'lora_unet_' or 'lora_te_' prefixes")
    other = [k for k in state_dict if k.partition(".")[2] not in ("lora_down.weight", "lora_up.weight", "alpha")]
    if other:
        raise FormatError(f"key {other[0]!r} has suffix {other[0].partition('.')[2]!r}; the diffusers layout holds "
                          "lora_down.weight, lora_up.weight or alpha (plain LoRA)")
    components: dict[str, dict[str, Any]] = {}
    all_alphas: dict[str, dict[str, float]] = {}
    for prefix, component in prefixes.items():
        if not any(k.startswith(prefix + "_") for k in state_dict):
            continue
        root = KOHYA_TE_MODULE_ROOT if component == "text_encoder" else ""
        sd, alphas = _convert_kohya_to_peft(state_dict, prefix, module_names.get(component, ()), module_root=root)
        components[component], all_alphas[component] = sd, alphas
    return _convert_peft_to_diffusers(components), all_alphas
