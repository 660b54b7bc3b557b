"""LyCORIS LoHa / LoKr and DoRA: the peft adapter configs that reproduce a file's factors exactly.

peft implements the three algorithms with LyCORIS's own tensor names (``hada_w1_a`` …,
``lokr_w1`` …) and formulas; DoRA is ``LoraConfig(use_dora=True)`` with one magnitude per output
channel (``lora_magnitude_vector``, LyCORIS's ``dora_scale``). What a file does not store is the
config, so it is inferred here from the tensors (pure functions, peft-layout state dicts in):

- the **rank** of each module (the rows of ``hada_w1_b`` / ``lokr_w2_b`` / ``lokr_w1_b``);
- the **scale**: LoHa and LoRA apply ``alpha / rank`` (no alpha: 1); LoKr applies ``alpha / rank``
  only when a Kronecker factor is rank-decomposed, and 1 when both are full matrices (LyCORIS,
  ComfyUI and diffusers' ``_bake_lokr_alpha_`` agree) — peft always applies ``alpha / r``, so the
  peft alpha is ``scale * r``;
- LoKr's ``decompose_factor`` (one per file in LyCORIS) and ``decompose_both``, and Tucker
  (``hada_t1`` / ``lokr_t2``: ``use_effective_conv2d``), chosen so that peft creates every tensor
  with the file's shape; :func:`check_created` then compares what peft made with the file, so
  a file peft cannot reproduce is refused, naming the module, never loaded approximately.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from s2l_plugin.errors import FormatError
from s2l_plugin.formats.lora_convert import LOHA_SUFFIXES, LOKR_SUFFIXES, MAGNITUDE

LORA = "LoRA"
DORA = "DoRA"
LOHA = "LoHa"
LOKR = "LoKr"


def module_tensors(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{module path: {tensor name: tensor}}`` of a peft-layout state dict (``<path>.<name>``)."""
    out: dict[str, dict[str, Any]] = {}
    for key, t in state.items():
        for name in (MAGNITUDE, "lora_A.weight", "lora_B.weight", *LOHA_SUFFIXES, *LOKR_SUFFIXES):
            if key.endswith("." + name):
                out.setdefault(key[: -len(name) - 1], {})[name] = t
                break
        else:
            raise FormatError(f"key {key!r} is not a LoRA, DoRA, LoHa or LoKr tensor")
    return out


def algorithm_of(state: Mapping[str, Any], source: str) -> str:
    """``"LoRA"``, ``"DoRA"``, ``"LoHa"`` or ``"LoKr"`` for one component's peft-layout tensors.

    FormatError when the component mixes algorithms (one peft adapter has one algorithm), or only
    some LoRA modules carry a DoRA magnitude (peft's DoRA needs one on every module).
    """
    kinds = {}
    for path, tensors in module_tensors(state).items():
        names = set(tensors)
        kind = LOHA if names & set(LOHA_SUFFIXES) else LOKR if names & set(LOKR_SUFFIXES) else (
            DORA if MAGNITUDE in names else LORA)
        kinds.setdefault(kind, path)
    if len(kinds) > 1:
        (a, pa), (b, pb) = sorted(kinds.items())[:2]
        raise FormatError(f"{source}: module {pa!r} is {a} but {pb!r} is {b}; expected one algorithm per component")
    return next(iter(kinds), LORA)


def loha_config(state: Mapping[str, Any], alphas: Mapping[str, float]) -> Any:
    """The ``LoHaConfig`` for LoHa tensors (peft layout): rank = rows of ``hada_w1_b``, scale alpha / rank."""
    from peft import LoHaConfig

    ranks, peft_alphas = {}, {}
    for path, tensors in module_tensors(state).items():
        w1_b = tensors.get("hada_w1_b")
        if w1_b is None:
            raise FormatError(f"LoHa module {path!r} has no hada_w1_b; expected hada_w1_a/b and hada_w2_a/b")
        rank = int(w1_b.shape[0])
        ranks[path] = rank
        peft_alphas[path] = float(alphas[path]) if path in alphas else float(rank)
    return LoHaConfig(**_patterns(ranks, peft_alphas), init_weights=False,
                      use_effective_conv2d=any(k.endswith(".hada_t1") for k in state))


def lokr_config(state: Mapping[str, Any], alphas: Mapping[str, float], dims: Mapping[str, tuple[int, int]]) -> Any:
    """The ``LoKrConfig`` for LoKr tensors (peft layout); ``dims`` gives each module's (out, in) channels.

    A module's left Kronecker factor is ``lokr_w1`` (or ``lokr_w1_a @ lokr_w1_b``), shaped
    (out_l, in_m); the one ``decompose_factor`` under which peft's ``factorization`` splits every
    module's widths that way is used (FormatError when none does).
    """
    from peft import LoKrConfig
    from peft.tuners.lokr.layer import factorization

    ranks, peft_alphas, left = {}, {}, {}
    for path, t in module_tensors(state).items():
        w1 = t.get("lokr_w1")
        if w1 is None and (t.get("lokr_w1_a") is None or t.get("lokr_w1_b") is None):
            raise FormatError(f"LoKr module {path!r} has neither lokr_w1 nor lokr_w1_a/lokr_w1_b")
        if t.get("lokr_w2") is None and (t.get("lokr_w2_a") is None or t.get("lokr_w2_b") is None):
            raise FormatError(f"LoKr module {path!r} has neither lokr_w2 nor lokr_w2_a/lokr_w2_b")
        out_l, in_m = (w1.shape[0], w1.shape[1]) if w1 is not None else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        left[path] = (int(out_l), int(in_m))
        decomposed = t.get("lokr_w2_b") if t.get("lokr_w2") is None else t.get("lokr_w1_b")
        if decomposed is not None:
            rank = int(decomposed.shape[0])
            scale = alphas[path] / rank if path in alphas else 1.0
        else:
            # Both factors full: LyCORIS applies no alpha. peft makes full factors when r is large enough.
            out_k, in_n = dims[path][0] // max(out_l, 1), dims[path][1] // max(in_m, 1)
            rank, scale = int(max(out_l, in_m, out_k, in_n)), 1.0
        ranks[path], peft_alphas[path] = rank, float(scale * rank)
    candidates = sorted({d for pair in left.values() for d in pair}) + [-1]
    factor = next((f for f in candidates if all(
        factorization(dims[p][0], f)[0] == ol and factorization(dims[p][1], f)[0] == im for p, (ol, im) in left.items())), None)
    if factor is None:
        path, (ol, im) = next(iter(left.items()))
        raise FormatError(f"LoKr factors (e.g. {path!r}: {ol}x{im} of {dims[path][0]}x{dims[path][1]}) follow no single "
                          "decompose_factor; expected a file written by LyCORIS or peft")
    return LoKrConfig(**_patterns(ranks, peft_alphas), init_weights=False, decompose_factor=factor,
                      decompose_both=any(k.endswith(".lokr_w1_a") for k in state),
                      use_effective_conv2d=any(k.endswith(".lokr_t2") for k in state))


def _patterns(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """``r``/``alpha``/``target_modules`` and per-module patterns (exact paths) for a peft LyCORIS config."""
    first = next(iter(ranks))
    return {
        "r": ranks[first], "alpha": alphas[first], "target_modules": sorted(ranks),
        "rank_pattern": {f"^{re.escape(p)}$": r for p, r in ranks.items()},
        "alpha_pattern": {f"^{re.escape(p)}$": a for p, a in alphas.items()},
    }


def dora_magnitude(magnitude: Any, expected: Any, path: str, source: str) -> Any:
    """A file's DoRA magnitude reshaped to peft's ``lora_magnitude_vector`` of module ``path`` (``expected``).

    peft decomposes along the output channels (one magnitude per output row), as LyCORIS with
    ``wd_on_out=True`` and peft-written files do; a kohya/LyCORIS ``dora_scale`` is then ``[out, 1]``
    (``[out, 1, 1, 1]`` for a convolution). A magnitude over the input channels (``[1, in]``,
    LyCORIS ``wd_on_out=False``) is a different model that peft does not implement: FormatError.
    """
    out = int(expected.numel())
    shape = tuple(magnitude.shape)
    per_output = magnitude.numel() == out and (shape[0] == out or tuple(expected.shape) == shape)
    if not per_output:
        raise FormatError(f"{source}: DoRA magnitude of module {path!r} has shape {shape}; expected one value per output "
                          f"channel ({out}) -- input-axis weight decomposition (LyCORIS wd_on_out=False) is not supported by peft's DoRA")
    return magnitude.reshape(expected.shape)


def check_created(model: Any, state: Mapping[str, Any], adapter_name: str, algorithm: str, source: str) -> None:
    """FormatError unless peft created exactly the file's tensors for ``adapter_name``, with the file's shapes."""
    modules = dict(model.named_modules())
    created: dict[str, tuple[int, ...]] = {}
    for path, module in modules.items():
        for name in (*LOHA_SUFFIXES, *LOKR_SUFFIXES):
            params = getattr(module, name, None)
            if params is not None and adapter_name in params:
                created[f"{path}.{name}"] = tuple(params[adapter_name].shape)
    for key, t in state.items():
        if key not in created:
            raise FormatError(f"{source}: {algorithm} tensor {key!r} (shape {tuple(t.shape)}) has no counterpart in peft's "
                              f"{algorithm} layer for this base (expected {sorted(k for k in created if k.startswith(key.rpartition('.')[0] + '.')) or 'none'})")
        if created[key] != tuple(t.shape):
            raise FormatError(f"{source}: {algorithm} tensor {key!r} has shape {tuple(t.shape)}; the base layer takes {created[key]}")
    missing = sorted(set(created) - set(state))
    if missing:
        raise FormatError(f"{source}: {algorithm} module {missing[0].rpartition('.')[0]!r} has no {missing[0].rpartition('.')[2]!r} in the file")
