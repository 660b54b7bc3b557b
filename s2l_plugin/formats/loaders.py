"""Loaders for the checkpoints people share, registered through ``register_loaders``.

A loader has ``name``, ``sniff(path) -> bool`` (by content, via :mod:`.detect`) and
``load(path, base, *, allow_pickle=False) -> pipeline``. ``base`` is a pipeline (deep-copied,
never modified) or a model folder (loaded fresh); the returned pipeline is the target to audit.

Every LoRA layout (diffusers, kohya/A1111 incl. LoCon conv layers and ``.alpha``, PEFT adapter
folders as the S2L reference writes them) goes one way: tensors read once from a validated file
→ per-component peft state dicts (through :mod:`s2l_plugin.formats.lora_convert`) → every factor
checked against the base layer it patches (:mod:`.compat`) → one peft adapter injected with
exactly those target modules. A file is applied completely or not at all; LyCORIS variants
that are not plain LoRA fail with their name. Embeddings and hypernetworks go through their
adapters' ``load`` (which read the file through :mod:`.detect` too). A folder detected as a LoRA
(or PEFT folders) with Textual Inversion embeddings beside it (pivotal tuning; ``DetectedFormat.parts``)
is loaded whole onto one copy of the base: every embedding's token first, then the LoRA.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from s2l_plugin.errors import FormatError
from s2l_plugin.formats import detect as fmt
from s2l_plugin.hooks import hookimpl

ADAPTER_NAME = "s2l_target"
_KOHYA_COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


# -- base pipelines ---------------------------------------------------------------------------------


def load_base(base: Any = None, *, allow_pickle: bool = False, config: str | Path | None = None) -> tuple[Any, Path | None]:
    """``(pipeline, folder)`` for ``base``: a pipeline (returned as is, folder None), a diffusers folder, a
    single-file checkpoint with ``config`` (its config folder; that folder is returned), or None /
    "testbed" — through :func:`s2l_plugin.pipeline.load_pipeline`, the one loader, with its safety rules."""
    if base is not None and not isinstance(base, (str, Path)):
        return base, None
    from s2l_plugin.pipeline import TESTBED_MODEL, load_pipeline, resolve_model_dir

    single = base is not None and base != TESTBED_MODEL and Path(base).is_file()
    pipe = load_pipeline(base, allow_pickle=allow_pickle, config=config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, resolve_model_dir(config if single else base)


def _fresh_copy(base: Any, allow_pickle: bool) -> tuple[Any, Path | None]:
    """A pipeline the loader may modify: a deep copy of an in-memory base, or a fresh load of a folder."""
    if base is None or isinstance(base, (str, Path)):
        return load_base(base, allow_pickle=allow_pickle)
    return copy.deepcopy(base), None


# -- LoRA -------------------------------------------------------------------------------------------


def _read_tensors(found: fmt.DetectedFormat, allow_pickle: bool) -> dict[str, Any]:
    import torch

    if found.container == "safetensors":
        return fmt.load_safetensors(found.path)
    obj = found.extra.get("object")
    if obj is None:
        obj = fmt.load_pickle(found.path, allow_pickle=allow_pickle)
    state = obj.get("state_dict", obj)
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FormatError(f"{str(found.path)!r}: entry {bad[0]!r} is not a named tensor; expected a flat dict of tensors")
    return dict(state)


def _check_float(tensors: dict[str, Any], source: str) -> None:
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise FormatError(f"{source}: tensor {key!r} has dtype {t.dtype}; expected a floating-point LoRA factor")


def check_lora_tensors(tensors: dict[str, Any], source: str) -> None:
    """Every LoRA factor is a non-empty floating-point 2-D or 4-D tensor (a DoRA magnitude may be 1-D); every alpha
    a single real number.

    An ``.alpha`` may be an integer or any float dtype: diffusers' ``convert_state_dict_to_kohya``
    writes int64 alphas, others float16, and diffusers, kohya sd-scripts and AUTOMATIC1111 all read
    it as a number (``.item()`` / ``.float()``); the kohya conversion casts it to a Python float.
    Runs before any conversion, so a file with a wrong dtype or shape fails with its key named.
    """
    import torch

    _check_float({k: t for k, t in tensors.items() if not k.endswith(".alpha")}, source)
    for key, t in tensors.items():
        if key.endswith((".dora_scale", ".lora_magnitude_vector")) and t.ndim in (1, 2, 4) and 0 not in t.shape:
            continue  # DoRA's magnitude: [out] (peft), [out, 1] or [out, 1, 1, 1] (kohya/LyCORIS dora_scale)
        if key.endswith(".alpha"):
            if t.dtype == torch.bool or t.is_complex():
                raise FormatError(f"{source}: {key!r} has dtype {t.dtype}; expected a real number (alpha, integer or float)")
            if t.numel() != 1:
                raise FormatError(f"{source}: {key!r} has shape {tuple(t.shape)}; expected a single number (alpha)")
        elif t.ndim not in (2, 4) or 0 in t.shape:
            raise FormatError(f"{source}: LoRA factor {key!r} has shape {tuple(t.shape)}; expected a non-empty 2-D or 4-D tensor")


def _split_kohya(tensors: dict[str, Any], pipe: Any, source: str) -> dict[str, dict[str, Any]]:
    """kohya tensors grouped by component with prefixes normalised to ``lora_unet`` / ``lora_te``."""
    groups: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        module = key.partition(".")[0]
        prefix = next((p for p in ("lora_unet", "lora_te1", "lora_te2", "lora_te") if module.startswith(p + "_")), None)
        if prefix is None:
            raise FormatError(f"{source}: key {key!r} has no kohya prefix; expected lora_unet_ / lora_te_")
        component = _KOHYA_COMPONENTS[prefix]
        if getattr(pipe, component, None) is None:
            raise FormatError(f"{source}: keys with prefix {prefix}_ need a base with a {component} (an SDXL base); this base has none")
        canonical = "lora_unet" if component == "unet" else "lora_te"
        groups.setdefault(component, {})[canonical + key[len(prefix):]] = t
    return groups


def _kohya_to_components(tensors: dict[str, Any], pipe: Any, source: str) -> dict[str, tuple[dict[str, Any], dict[str, float]]]:
    """kohya / LyCORIS tensors → per-component peft state dicts and alphas.

    SD 1.x kohya names follow the diffusers module names; SDXL's UNet names use the original
    (SGM) blocks (``input_blocks_4_1_…``), which diffusers' own conversion maps
    (:func:`~s2l_plugin.formats.lora_convert.sgm_unet_module_paths`).
    """
    from s2l_plugin.formats.lora_convert import (
        KOHYA_TE_MODULE_ROOT,
        SGM_BLOCKS,
        _convert_kohya_to_peft,
        sgm_unet_module_paths,
    )

    out = {}
    for component, group in _split_kohya(tensors, pipe, source).items():
        model = getattr(pipe, component)
        names = [n for n, _ in model.named_modules() if n]
        prefix = "lora_unet" if component == "unet" else "lora_te"
        root = KOHYA_TE_MODULE_ROOT if component.startswith("text_encoder") else ""
        paths = None
        if component == "unet":
            sgm = {k[len(prefix) + 1:].partition(".")[0] for k in group if k[len(prefix) + 1:].startswith(SGM_BLOCKS)}
            paths = sgm_unet_module_paths(sgm, model.config)
        out[component] = _convert_kohya_to_peft(group, prefix, names, module_root=root, paths=paths)
    return out


def _diffusers_to_components(
    tensors: dict[str, Any], metadata: dict[str, str], source: str
) -> dict[str, tuple[dict[str, Any], dict[str, float]]]:
    from s2l_plugin.formats.lora_convert import _convert_diffusers_to_peft, rank_of

    alphas_meta: dict[str, Any] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{source}: lora_adapter_metadata is not JSON ({exc.msg})") from exc
        alphas_meta = parsed if isinstance(parsed, dict) else {}
    out = {}
    for component, sd in _convert_diffusers_to_peft(tensors).items():
        ranks = rank_of(sd)
        cfg = alphas_meta.get(f"{component}.lora_alpha"), alphas_meta.get(f"{component}.alpha_pattern") or {}
        alphas = {}
        for path, r in ranks.items():
            pattern = next((float(v) for k, v in cfg[1].items() if re.fullmatch(rf"(.*\.)?{k}", path)), None)
            alphas[path] = pattern if pattern is not None else float(cfg[0]) if cfg[0] is not None else float(r)
        out[component] = (sd, alphas)
    return out


def _factor_pairs(sd: dict[str, Any], source: str) -> dict[str, tuple[Any, Any]]:
    pairs: dict[str, list[Any]] = {}
    for key, t in sd.items():
        if key.endswith(".lora_A.weight"):
            pairs.setdefault(key[: -len(".lora_A.weight")], [None, None])[0] = t
        elif key.endswith(".lora_B.weight"):
            pairs.setdefault(key[: -len(".lora_B.weight")], [None, None])[1] = t
        else:
            raise FormatError(f"{source}: key {key!r} is not a LoRA factor")
    for path, (down, up) in pairs.items():
        if down is None or up is None:
            raise FormatError(f"{source}: LoRA module {path!r} has only its {'up' if down is None else 'down'} factor; expected both")
    return {p: (d, u) for p, (d, u) in pairs.items()}


def apply_lora_components(
    pipe: Any,
    components: dict[str, tuple[dict[str, Any], dict[str, float]]],
    *,
    source: str,
    adapter_name: str = ADAPTER_NAME,
    use_rslora: bool = False,
    configs: dict[str, Any] | None = None,
) -> Any:
    """Inject one peft adapter per component into ``pipe`` (in place) and return it.

    ``components`` maps ``unet`` / ``text_encoder`` / ``text_encoder_2`` / ``vae`` to ``(peft state
    dict, {module path: alpha})``. The algorithm comes from the tensors: LoRA (``lora_A``/``lora_B``),
    DoRA (LoRA plus ``lora_magnitude_vector``: ``LoraConfig(use_dora=True)``), LoHa (``hada_*``:
    peft's ``LoHaConfig``) or LoKr (``lokr_*``: ``LoKrConfig``); ``configs`` gives a component's
    peft config as saved beside it (PEFT folders), used as is. LoRA factors are checked against
    their base layers before anything is injected (FormatError naming both widths); LoHa / LoKr
    tensors are compared with what peft's layer creates for the base. The adapter targets exactly
    the file's modules and must load completely. ``pipe`` should be a fresh copy: after a
    FormatError it may hold part of the adapter.
    """
    from s2l_plugin.formats import lycoris

    configs = configs or {}
    plans = []
    for component, (sd, alphas) in components.items():
        model = getattr(pipe, component, None)
        if model is None:
            raise FormatError(f"{source}: LoRA for component {component!r}, which the base pipeline does not have")
        _check_float(sd, source)
        algorithm = lycoris.algorithm_of(sd, f"{source} ({component})")
        config = configs.get(component)
        if config is None and algorithm in (lycoris.LORA, lycoris.DORA):
            sd, config = _checked_lora_plan(model, sd, alphas, component, source, use_rslora)
        elif config is None and algorithm == lycoris.LOHA:
            config = lycoris.loha_config(sd, alphas)
        elif config is None:
            dims = {p: d for p, m in model.named_modules() if (d := _channels(m)) is not None}
            config = lycoris.lokr_config(sd, alphas, dims)
        plans.append((model, sd, config, algorithm))
    for model, state, config, algorithm in plans:
        _inject(model, config, state, adapter_name, algorithm, source)
    return pipe


def _channels(module: Any) -> tuple[int, int] | None:
    """``(out, in)`` channels of a Linear or Conv2d layer (None for other modules)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels, module.in_channels // module.groups
    return None


def _checked_lora_plan(
    model: Any, sd: dict[str, Any], alphas: dict[str, float], component: str, source: str, use_rslora: bool
) -> tuple[dict[str, Any], Any]:
    """``(state dict, LoraConfig)`` for LoRA / DoRA tensors, every factor checked against its base layer first."""
    import torch
    from peft import LoraConfig

    from s2l_plugin.formats.compat import check_lora_shapes
    from s2l_plugin.formats.lora_convert import MAGNITUDE

    magnitudes = {k[: -len(MAGNITUDE) - 1]: t for k, t in sd.items() if k.endswith("." + MAGNITUDE)}
    pairs = _factor_pairs({k: t for k, t in sd.items() if not k.endswith("." + MAGNITUDE)}, source)
    modules = dict(model.named_modules())
    fixed: dict[str, Any] = {}
    for path, (down, up) in pairs.items():
        module = modules.get(path)
        # A 1x1 convolution (SD's proj_in/proj_out) may be stored with 2-D factors.
        if isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and down.ndim == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        fixed[f"{path}.lora_A.weight"], fixed[f"{path}.lora_B.weight"] = down, up
        pairs[path] = (down, up)
    check_lora_shapes(model, pairs, component=component, source=source)
    stray = sorted(set(magnitudes) - set(pairs)) or (sorted(set(pairs) - set(magnitudes)) if magnitudes else [])
    if stray:
        raise FormatError(f"{source}: DoRA module {stray[0]!r} has {'a magnitude but no LoRA factors' if stray[0] in magnitudes else 'LoRA factors but no magnitude (dora_scale)'}; expected both on every module")
    for path, alpha in alphas.items():
        if path not in pairs:
            raise FormatError(f"{source}: alpha for module {path!r}, which has no LoRA factors")
        if not isinstance(alpha, float) or not alpha == alpha:
            raise FormatError(f"{source}: alpha of module {path!r} is {alpha!r}; expected a number")
    for path, m in magnitudes.items():
        fixed[f"{path}.{MAGNITUDE}"] = m
    ranks = {p: int(d.shape[0]) for p, (d, _) in pairs.items()}
    first = next(iter(pairs))
    # peft matches a target or pattern key to every module whose path ends with ".<key>" (Flux's top-level proj_out
    # and single_transformer_blocks.0.proj_out): patterns go longest first, so a module's own path is tried before a
    # shorter one it ends with, and where another module ends with a target path the targets are one exact regex.
    order = sorted(pairs, key=lambda p: (-len(p), p))
    targets: Any = sorted(pairs)
    if any(n not in pairs and n.endswith(tuple("." + p for p in pairs)) for n in modules):
        targets = "|".join(f"(?:{re.escape(p)})" for p in targets)
    config = LoraConfig(
        r=ranks[first],
        lora_alpha=alphas.get(first, float(ranks[first])),
        target_modules=targets,
        rank_pattern={re.escape(p): ranks[p] for p in order},
        alpha_pattern={re.escape(p): alphas.get(p, float(ranks[p])) for p in order},
        init_lora_weights=False,
        use_rslora=use_rslora,
        use_dora=bool(magnitudes),
    )
    return fixed, config


def _inject(model: Any, config: Any, state: dict[str, Any], adapter_name: str, algorithm: str, source: str) -> None:
    """Inject ``config`` into ``model`` as ``adapter_name`` and load ``state`` into it, completely or FormatError."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from s2l_plugin.formats import lycoris
    from s2l_plugin.formats.lora_convert import MAGNITUDE

    try:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FormatError(f"{source}: peft could not create the {algorithm} adapter: {msg[:300]}") from exc
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    if algorithm in (lycoris.LOHA, lycoris.LOKR):
        lycoris.check_created(model, state, adapter_name, algorithm, source)
    modules = dict(model.named_modules())
    for key in [k for k in state if k.endswith("." + MAGNITUDE)]:
        path = key[: -len(MAGNITUDE) - 1]
        expected = modules[path].lora_magnitude_vector[adapter_name].weight
        state[key] = lycoris.dora_magnitude(state[key], expected, path, source)
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    except RuntimeError as exc:  # a size mismatch torch reports
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise FormatError(f"{source}: {algorithm} weights do not fit the base: {msg.strip()[:300]}") from exc
    marks = ("lora_", "hada_", "lokr_")
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if any(m in k for m in marks)]
    missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter_name}" in k and any(m in k for m in marks)]
    if unexpected or missing:
        raise FormatError(f"{source}: {algorithm} weights did not load completely ({(unexpected or missing)[0]!r})")
    model.eval()


#: the peft adapter types a PEFT folder may hold, and their config classes (peft's own)
PEFT_TYPES = {"LORA": "LoraConfig", "LOHA": "LoHaConfig", "LOKR": "LoKrConfig"}


def _peft_folder_components(found: fmt.DetectedFormat) -> tuple[dict[str, tuple[dict[str, Any], dict[str, float]]], dict[str, Any]]:
    """PEFT ``save_pretrained`` folders → ``(components, options for apply_lora_components)``.

    LoRA (with or without ``use_dora``) goes the LoRA way (every factor checked against its base
    layer); LoHa and LoKr keep the config peft saved (``LoHaConfig`` / ``LoKrConfig``). The
    component of a root folder is inferred from its keys.
    """
    import peft

    from s2l_plugin.formats.lora_convert import rank_of

    out: dict[str, tuple[dict[str, Any], dict[str, float]]] = {}
    configs: dict[str, Any] = {}
    rslora = set()
    for comp in found.components:
        folder = found.path / comp
        try:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{str(folder / 'adapter_config.json')!r} is not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise FormatError(f"{str(folder / 'adapter_config.json')!r} is not a JSON object")
        peft_type = config.get("peft_type", "LORA")
        if peft_type not in PEFT_TYPES:
            raise FormatError(f"PEFT adapter {str(folder)!r} is of type {peft_type!r}; expected one of {', '.join(PEFT_TYPES)}")
        rslora.add(bool(config.get("use_rslora", False)))
        tensors = fmt.load_safetensors(folder / "adapter_model.safetensors")
        check_lora_tensors(tensors, str(folder))
        sd = {}
        for key, t in tensors.items():
            k = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            # peft drops the adapter name on save, but older files may keep ".default."
            k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            sd[k.removesuffix(".weight") if k.endswith(".lora_magnitude_vector.weight") else k] = t
        component = comp
        if comp == ".":
            component = ("text_encoder" if any(k.startswith("text_model.") for k in sd) else
                         "transformer" if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in sd) else "unet")
        if peft_type != "LORA":
            try:
                configs[component] = getattr(peft, PEFT_TYPES[peft_type]).from_pretrained(str(folder))
            except (TypeError, ValueError, OSError) as exc:
                raise FormatError(f"PEFT adapter {str(folder)!r} of type {peft_type!r}: adapter_config.json is not a valid "
                                  f"{PEFT_TYPES[peft_type]} ({exc})") from exc
            if not configs[component].target_modules:
                raise FormatError(f"PEFT adapter {str(folder)!r} of type {peft_type!r} names no target_modules; expected "
                                  "the adapter_config.json peft's save_pretrained writes")
            out[component] = (sd, {})
            continue
        alpha = config.get("lora_alpha")
        patterns = config.get("alpha_pattern") or {}
        alphas = {}
        for path, r in rank_of(sd).items():
            pat = next((float(v) for k, v in patterns.items() if re.fullmatch(rf"(.*\.)?{k}", path)), None)
            alphas[path] = pat if pat is not None else float(alpha) if isinstance(alpha, (int, float)) else float(r)
        out[component] = (sd, alphas)
    if len(rslora) > 1:
        raise FormatError(f"PEFT folders in {str(found.path)!r} mix use_rslora settings; expected one setting")
    return out, {"use_rslora": rslora == {True}, "configs": configs}


# -- the loader contract and objects ----------------------------------------------------------------


class Loader(Protocol):
    """The loader contract: what ``register_loaders`` accepts and :func:`load_target` calls.

    docs/hooks.md (``register_loaders``) states it for plugin authors; :func:`loader_problem`
    checks it at registration.

    - ``name``: a non-empty string, unique among loaders; the detected format's ``kind`` when this
      loader reads a file the built-in detection does not know.
    - ``sniff(path) -> bool``: True when the file or folder at ``path`` is this loader's format,
      decided by content (never by file name alone). False, never an exception, for anything else
      (a folder, an empty file, another format). :func:`load_target` calls it, in registration
      order, only where the built-in detection does not classify ``path``.
    - ``load(path, base) -> pipeline``: the pipeline to audit, ``base`` with ``path`` applied.
      ``base`` is a pipeline (copy it, never modify it), a model folder or None (the testbed); a
      misfit is a ``FormatError``.

    ``sniff`` and ``load`` get ``allow_pickle=`` (the user's opt-in to read pickles) only when they
    name it.
    """

    name: str

    def sniff(self, path: str | Path) -> bool: ...

    def load(self, path: str | Path, base: Any) -> Any: ...


def loader_problem(obj: Any) -> str | None:
    """What keeps ``obj`` from being a :class:`Loader` (one short phrase), or None when it is one."""
    from s2l_plugin.hooks.manager import call_problem

    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        return f"name must be a non-empty string, got {name!r}"
    return call_problem(obj, "sniff", ("path",)) or call_problem(obj, "load", ("path", "base"))



@dataclass
class _FormatLoader:
    """A built-in loader for the format kinds ``kinds`` (see :mod:`.detect`)."""

    name: str
    kinds: tuple[str, ...]
    description: str

    def sniff(self, path: str | Path, *, allow_pickle: bool = False) -> bool:
        """True when ``path``'s content is one of this loader's formats (malformed or refused input: False)."""
        try:
            return fmt.detect(path, allow_pickle=allow_pickle).kind in self.kinds
        except FormatError:
            return False

    def load(self, path: str | Path, base: Any = None, *, allow_pickle: bool = False,
             detected: fmt.DetectedFormat | None = None) -> Any:
        """The pipeline to audit: ``base`` (never modified) with ``path`` applied; FormatError on any misfit.

        ``detected``: ``detect(path)``'s result when the caller has it (a pickle is then not read again).
        """
        found = detected if detected is not None else fmt.detect(path, allow_pickle=allow_pickle)
        if found.kind not in self.kinds:
            raise FormatError(f"{str(path)!r} is a {found.kind} checkpoint; loader {self.name!r} reads {', '.join(self.kinds)}")
        if found.parts:
            return _load_parts(found, base, allow_pickle)
        return _LOAD[found.kind](found, base, allow_pickle)


def _load_pipeline_target(found: fmt.DetectedFormat, base: Any, allow_pickle: bool) -> Any:
    from s2l_plugin.formats.compat import check_pipelines_compatible

    target = load_base(found.path, allow_pickle=allow_pickle)[0]
    if base is not None:
        base_pipe = base if not isinstance(base, (str, Path)) else load_base(base, allow_pickle=allow_pickle)[0]
        check_pipelines_compatible(target, base_pipe, target_name=f"model {str(found.path)!r}")
    return target


def _load_single_file(found: fmt.DetectedFormat, base: Any, allow_pickle: bool) -> Any:
    """A single-file SD or SDXL checkpoint, converted by diffusers' ``from_single_file`` with the base's folder as
    config (:func:`s2l_plugin.pipeline.load_single_file`), then checked against the base."""
    from s2l_plugin.formats.compat import check_pipelines_compatible
    from s2l_plugin.pipeline import load_single_file

    base_pipe, base_dir = load_base(base, allow_pickle=allow_pickle)
    with tempfile.TemporaryDirectory(prefix="s2l-single-") as tmp:
        if base_dir is None:  # an in-memory base: its folder is the config from_single_file needs
            base_dir = Path(tmp) / "base"
            base_pipe.save_pretrained(base_dir)
        pipe = load_single_file(found.path, base_dir, allow_pickle=allow_pickle)
    check_pipelines_compatible(pipe, base_pipe, target_name=f"checkpoint {str(found.path)!r}")
    return pipe


def _lora_source(found: fmt.DetectedFormat, variant: str | None = None) -> str:
    """The file as errors name it; with its LyCORIS / DoRA variant, so a misfit says which algorithm it is."""
    variant = variant or (found.variant if found.kind == fmt.KOHYA_LORA else None)
    return f"{found.path} ({variant})" if variant and variant != "kohya" else str(found.path)


def _checked_lora_tensors(found: fmt.DetectedFormat, allow_pickle: bool) -> dict[str, Any]:
    tensors = _read_tensors(found, allow_pickle)
    # A pickle was not classified by its keys at detection: the variant is read here for both containers.
    variant = (fmt.lycoris_variant(tensors) or "kohya") if found.kind == fmt.KOHYA_LORA else None
    if variant is not None and variant not in fmt.LOADABLE_KOHYA_VARIANTS:
        raise FormatError(f"{found.path} is a {variant} network, which neither diffusers nor peft loads; expected LoRA / "
                          "LoCon (lora_down/lora_up/alpha), DoRA (dora_scale), LoHa (hada_*) or LoKr (lokr_*)")
    check_lora_tensors(tensors, _lora_source(found, variant))
    return tensors


def _apply_lora(found: fmt.DetectedFormat, pipe: Any, tensors: dict[str, Any]) -> Any:
    source = _lora_source(found, (fmt.lycoris_variant(tensors) or "kohya") if found.kind == fmt.KOHYA_LORA else None)
    family = check_lora_family(tensors, pipe, source)
    if family in FLOW_LORA_CLASSES:
        components = flow_lora_components(tensors, found.metadata, pipe, family, source)
    elif found.kind == fmt.KOHYA_LORA:
        components = _kohya_to_components(tensors, pipe, source)
    else:
        components = _diffusers_to_components(tensors, found.metadata, source)
    return apply_lora_components(pipe, components, source=source)


# -- SD3 and Flux LoRAs: diffusers' own conversion ------------------------------------------------------

#: the flow-matching families and the diffusers pipeline class whose ``lora_state_dict`` converts their LoRA layouts
FLOW_LORA_CLASSES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}
#: the components each flow family's diffusers loader puts LoRA layers into (``_lora_loadable_modules``)
FLOW_LORA_COMPONENTS = {"flux": ("transformer", "text_encoder"), "sd3": ("transformer", "text_encoder", "text_encoder_2")}
_LORA_FAMILY_NAMES = {"flow": "SD3 or Flux", "sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL", "sd3": "Stable Diffusion 3",
                      "flux": "Flux"}


def check_lora_family(tensors: dict[str, Any], pipe: Any, source: str) -> str:
    """The base's family (``sd``, ``sdxl``, ``sd3``, ``flux``) after checking the LoRA's keys belong to it
    (:func:`~s2l_plugin.formats.detect.lora_family`); FormatError naming both families otherwise."""
    from s2l_plugin.conditioning import pipeline_family

    try:
        base = pipeline_family(pipe)
    except TypeError as exc:
        raise FormatError(f"{source}: {exc}") from exc
    keys = list(tensors)
    lora = fmt.lora_family(keys, {k: tuple(t.shape) for k, t in tensors.items()})
    if lora is None:
        return base
    flow_base = base in FLOW_LORA_CLASSES
    # SD and SDXL LoRAs share the UNet way and are told apart by their layers (a te2 key on an SD base fails with its name).
    fits = (lora in ("sd", "sdxl") and not flow_base) or lora == base or (lora == "flow" and flow_base)
    if not fits:
        marks = (fmt.KOHYA_FLUX_MARKS + fmt.KOHYA_SD3_MARKS, ("transformer.", "unet.", "lora_unet_"))
        example = next((k for m in marks for k in keys if k.startswith(m) and not k.endswith(".alpha")), keys[0])
        raise FormatError(f"{source} is a{'n' if lora == 'sdxl' else ''} {_LORA_FAMILY_NAMES[lora]} LoRA (key {example!r}) but the "
                          f"base is a{'n' if base == 'sdxl' else ''} {_LORA_FAMILY_NAMES[base]} pipeline; expected a base of the LoRA's family")
    return base


def flow_lora_state_dict(tensors: dict[str, Any], family: str, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Flux / SD3 LoRA file's tensors as diffusers' own loader reads them: ``(state dict with component
    prefixes, network alphas)`` from ``FluxPipeline.lora_state_dict`` (which converts kohya's BFL names,
    XLabs' layout and more, folding kohya's alphas into the factors) or ``StableDiffusion3Pipeline.lora_state_dict``.

    Refused (FormatError) where diffusers would drop part of the file without an error: DoRA
    ``dora_scale`` keys (diffusers filters them out), kohya modules its conversion leaves out, and keys
    that stay outside the components its loader reads (a kohya SD3 file, which diffusers does not convert).
    """
    import logging

    import diffusers

    if any(k.endswith(".dora_scale") for k in tensors):
        raise FormatError(f"{source}: DoRA dora_scale keys, which diffusers' {_LORA_FAMILY_NAMES[family]} loader drops; "
                          "expected a LoRA without dora_scale (or a diffusers file with lora_magnitude_vector)")
    cls = getattr(diffusers, FLOW_LORA_CLASSES[family])
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # diffusers logs its conversion at INFO/WARNING; what it drops is refused below
    try:
        if family == "flux":
            state, alphas = cls.lora_state_dict(dict(tensors), return_alphas=True)
            dropped = _kohya_flux_dropped(tensors, cls)
        else:
            state, alphas, dropped = cls.lora_state_dict(dict(tensors)), {}, []
    except (ValueError, AssertionError, KeyError, IndexError, RuntimeError, TypeError, AttributeError) as exc:
        msg = (str(exc).strip().splitlines() or [""])[0][:300] or "a fused layer's width is not the one it splits it by"
        raise FormatError(f"{source}: diffusers' {FLOW_LORA_CLASSES[family]}.lora_state_dict could not convert it "
                          f"({type(exc).__name__}: {msg})") from exc
    finally:
        logger.setLevel(level)
    if dropped:
        raise FormatError(f"{source}: kohya module {dropped[0]!r} is left out by diffusers' Flux conversion "
                          f"({FLOW_LORA_CLASSES[family]}.lora_state_dict); expected only layers it converts")
    prefixes = tuple(c + "." for c in FLOW_LORA_COMPONENTS[family])
    if family == "flux" and any(k.endswith(".lora_down.weight") for k in tensors):
        # diffusers converts kohya's embedder and final layers (img_in, txt_in, time_in, vector_in, guidance_in,
        # final_layer) to transformer module paths without the "transformer." its loader selects by, so
        # load_lora_weights drops them; a file is applied completely here (a path the transformer lacks fails later).
        state = {k if k.startswith(prefixes) or not k.endswith((".lora_A.weight", ".lora_B.weight")) else f"transformer.{k}": v
                 for k, v in state.items()}
    stray = [k for k in state if not k.startswith(prefixes)]
    if stray:
        raise FormatError(f"{source}: key {stray[0]!r} is in no layout diffusers' {_LORA_FAMILY_NAMES[family]} loader reads "
                          f"(it would load nothing from it); expected keys under {', '.join(prefixes)}")
    return dict(state), dict(alphas or {})


def _kohya_flux_dropped(tensors: dict[str, Any], cls: Any) -> list[str]:
    """The kohya modules diffusers' Flux conversion leaves out without an error (a T5 or second text encoder,
    ``text_projection``, ...): each module's factors are tagged with its number (alpha = rank, so no
    scaling), converted by ``cls.lora_state_dict``, and the tags missing from the result name them."""
    import torch

    modules = sorted({k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")})
    if not modules:
        return []
    tagged: dict[str, Any] = {}
    for i, name in enumerate(modules, start=1):
        down, up = tensors[f"{name}.lora_down.weight"], tensors.get(f"{name}.lora_up.weight")
        if up is None:
            return []  # the conversion itself refuses a module without its up factor
        tagged[f"{name}.lora_down.weight"] = torch.full(tuple(down.shape), float(i))
        tagged[f"{name}.lora_up.weight"] = torch.full(tuple(up.shape), float(i))
        tagged[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    seen = {float(t.reshape(-1)[0]) for t in cls.lora_state_dict(tagged).values() if t.numel()}
    return [name for i, name in enumerate(modules, start=1) if float(i) not in seen]


def flow_lora_components(
    tensors: dict[str, Any], metadata: dict[str, str], pipe: Any, family: str, source: str
) -> dict[str, tuple[dict[str, Any], dict[str, float]]]:
    """A Flux / SD3 LoRA → ``{component: (peft state dict, {module path: alpha})}`` for :func:`apply_lora_components`.

    The keys are diffusers' (:func:`flow_lora_state_dict`); text-encoder keys in diffusers' older
    spellings (``to_q_lora.down``, ``lora_linear_layer``) are renamed by diffusers' ``convert_state_dict_to_peft``,
    and CLIP's ``text_model.`` root is dropped where transformers no longer has it, as diffusers' loader
    does. Alphas: the file's ``lora_adapter_metadata`` (``save_lora_weights``), else its ``.alpha``
    keys (network alphas), else the rank (kohya and XLabs files: diffusers folds their alpha into the factors).
    """
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    from s2l_plugin.formats.lora_convert import _convert_diffusers_to_peft

    state, network_alphas = flow_lora_state_dict(tensors, family, source)
    by_component: dict[str, dict[str, Any]] = {}
    for key, t in state.items():
        component, _, rest = key.partition(".")
        by_component.setdefault(component, {})[rest] = t
    plain: dict[str, Any] = {}
    for component, sd in by_component.items():
        if component.startswith("text_encoder"):
            sd = convert_state_dict_to_peft(sd, original_type=StateDictType.DIFFUSERS_OLD)
            if not hasattr(getattr(pipe, component, None), "text_model"):
                sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        plain.update({f"{component}.{k}": v for k, v in sd.items()})
    meta_alphas: dict[str, Any] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{source}: lora_adapter_metadata is not JSON ({exc.msg})") from exc
        meta_alphas = parsed if isinstance(parsed, dict) else {}
    from s2l_plugin.formats.lora_convert import rank_of

    out = {}
    for component, sd in _convert_diffusers_to_peft(plain).items():
        lora_alpha, pattern = meta_alphas.get(f"{component}.lora_alpha"), meta_alphas.get(f"{component}.alpha_pattern") or {}
        alphas = {}
        for path, r in rank_of(sd).items():
            alpha = next((v for k, v in pattern.items() if re.fullmatch(rf"(.*\.)?{k}", path)), None)
            if alpha is None:
                alpha = lora_alpha if lora_alpha is not None else network_alphas.get(f"{component}.{path}.alpha")
            try:
                alphas[path] = float(alpha) if alpha is not None else float(r)
            except (TypeError, ValueError) as exc:
                raise FormatError(f"{source}: alpha of module {component}.{path} is {alpha!r}; expected a number") from exc
        out[component] = (sd, alphas)
    return out


def _load_lora(found: fmt.DetectedFormat, base: Any, allow_pickle: bool) -> Any:
    tensors = _checked_lora_tensors(found, allow_pickle)  # before the copy: a bad file costs no deepcopy
    pipe, _ = _fresh_copy(base, allow_pickle)
    return _apply_lora(found, pipe, tensors)


def _load_peft(found: fmt.DetectedFormat, base: Any, allow_pickle: bool) -> Any:
    components, options = _peft_folder_components(found)
    pipe, _ = _fresh_copy(base, allow_pickle)
    return apply_lora_components(pipe, components, source=str(found.path), **options)


def _adapter(name: str) -> Any:
    from s2l_plugin.errors import ConfigError
    from s2l_plugin.hooks.manager import get

    try:
        return get("adapters", name)
    except ConfigError as exc:
        raise FormatError(f"loading this checkpoint needs the {name!r} adapter, which is not registered ({exc})") from exc


def _check_embedding_tensors(found: fmt.DetectedFormat) -> None:
    import torch

    obj = found.extra.get("object") if found.container == "pickle" else None
    tensors = (obj.get("string_to_param") or {}) if isinstance(obj, dict) and "string_to_param" in obj else (
        {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if obj is not None else None)
    if tensors is None:
        target = Path(found.path)
        tensors = fmt.load_safetensors(target)
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim not in (1, 2) or 0 in t.shape:
            what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise FormatError(f"{str(found.path)}: embedding {key!r} is {what}; expected a non-empty 1-D or 2-D float tensor")


def _apply_embedding(found: fmt.DetectedFormat, pipe: Any, allow_pickle: bool) -> Any:
    from s2l_plugin.adapters.base import Artifact

    if found.variant == "sdxl":  # clip_l + clip_g: one token in both text encoders
        from s2l_plugin.formats.embeddings import load_sdxl_embedding

        load_sdxl_embedding(pipe, found.path, allow_pickle=allow_pickle)
        return pipe
    # The file itself, not its folder: a folder may hold several embeddings, and a kohya file's token is its stem.
    artifact = Artifact(method="textual_inversion", path=Path(found.path))
    return _adapter("textual_inversion").load(pipe, artifact, allow_pickle=allow_pickle)


def _load_embedding(found: fmt.DetectedFormat, base: Any, allow_pickle: bool) -> Any:
    _check_embedding_tensors(found)
    pipe, _ = _fresh_copy(base, allow_pickle)
    return _apply_embedding(found, pipe, allow_pickle)


def _load_parts(found: fmt.DetectedFormat, base: Any, allow_pickle: bool) -> Any:
    """A folder's LoRA and embeddings (``found`` and ``found.parts``) applied to one copy of ``base``.

    Every file is read and checked before the copy is made; the embeddings' tokens are added
    first, then the LoRA, as the ``textual_inversion+lora`` adapter loads its own artifact. Any
    failure discards the copy, so the caller never sees a half-loaded target.
    """
    parts = [found, *found.parts]
    lora_kinds = fmt.LORA_KINDS + (fmt.PEFT_FOLDERS,)
    unknown = [p for p in parts if p.kind not in lora_kinds + (fmt.TEXTUAL_INVERSION,)]
    if unknown or sum(p.kind in lora_kinds for p in parts) > 1:
        raise FormatError(f"{str(found.path)!r}: cannot load {', '.join(p.kind for p in parts)} together; "
                          "expected at most one LoRA and any number of Textual Inversion embeddings")
    loras: dict[int, Any] = {}
    for part in parts:
        if part.kind == fmt.PEFT_FOLDERS:
            loras[id(part)] = _peft_folder_components(part)
        elif part.kind in fmt.LORA_KINDS:
            loras[id(part)] = _checked_lora_tensors(part, allow_pickle)
        else:
            _check_embedding_tensors(part)
    pipe, _ = _fresh_copy(base, allow_pickle)
    for part in sorted(parts, key=lambda p: p.kind != fmt.TEXTUAL_INVERSION):
        if part.kind == fmt.TEXTUAL_INVERSION:
            _apply_embedding(part, pipe, allow_pickle)
        elif part.kind == fmt.PEFT_FOLDERS:
            components, options = loras[id(part)]
            apply_lora_components(pipe, components, source=str(part.path), **options)
        else:
            _apply_lora(part, pipe, loras[id(part)])
    return pipe


def _load_hypernetwork(found: fmt.DetectedFormat, base: Any, allow_pickle: bool) -> Any:
    from s2l_plugin.adapters.base import Artifact

    pipe, _ = _fresh_copy(base, allow_pickle)
    artifact = Artifact(method="hypernetwork", path=found.path)
    return _adapter("hypernetwork").load(pipe, artifact, allow_pickle=allow_pickle)


_LOAD = {
    fmt.DIFFUSERS_PIPELINE: _load_pipeline_target,
    fmt.SINGLE_FILE: _load_single_file,
    fmt.DIFFUSERS_LORA: _load_lora,
    fmt.KOHYA_LORA: _load_lora,
    fmt.PEFT_FOLDERS: _load_peft,
    fmt.TEXTUAL_INVERSION: _load_embedding,
    fmt.HYPERNETWORK: _load_hypernetwork,
}

BUILTIN_LOADERS = (
    _FormatLoader("diffusers_pipeline", (fmt.DIFFUSERS_PIPELINE,), "diffusers pipeline folder (model_index.json)"),
    _FormatLoader("single_file", (fmt.SINGLE_FILE,), "single-file Stable Diffusion checkpoint (.safetensors; .ckpt with --allow-pickle)"),
    _FormatLoader("lora", (fmt.DIFFUSERS_LORA, fmt.KOHYA_LORA), "diffusers or kohya/A1111 LoRA (LoCon conv layers, .alpha)"),
    _FormatLoader("peft_folders", (fmt.PEFT_FOLDERS,), "PEFT adapter folders per component (adapter_config.json + adapter_model.safetensors)"),
    _FormatLoader("textual_inversion", (fmt.TEXTUAL_INVERSION,), "Textual Inversion embedding (diffusers, kohya emb_params, A1111 .pt)"),
    _FormatLoader("hypernetwork", (fmt.HYPERNETWORK,), "AUTOMATIC1111 hypernetwork (.pt, or its safetensors form)"),
)


@hookimpl
def register_loaders(register: Any) -> None:
    for loader in BUILTIN_LOADERS:
        register(loader)


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def load_target(
    path: str | Path, base: Any = None, *, allow_pickle: bool = False, pm: Any = None,
    detected: fmt.DetectedFormat | None = None,
) -> tuple[Any, fmt.DetectedFormat]:
    """Detect ``path``'s format and load it onto ``base`` with the first registered loader that reads it.

    Returns ``(target pipeline, detected format)``. ``base`` (a pipeline, a folder, or None =
    the shipped testbed) is left unmodified. A malformed file, a refused pickle, an unsupported
    variant or a width mismatch is one FormatError; nothing is written. Built-in loaders decide
    from the one detection (``detected`` when given), so a large pickle is read once.
    """
    from s2l_plugin.hooks.manager import collect

    error: FormatError | None = None
    found = detected
    if found is None:
        try:
            found = fmt.detect(path, allow_pickle=allow_pickle)
        except FormatError as exc:  # maybe a format only a plugin knows; else this is the error to show
            error = exc
    for loader in collect("loaders", pm).values():
        if isinstance(loader, _FormatLoader):
            if found is not None and found.kind in loader.kinds:
                return loader.load(path, base, allow_pickle=allow_pickle, detected=found), found
            continue
        # allow_pickle goes only to loaders that accept it (a third-party loader may have plain sniff(path)).
        hit = loader.sniff(path, allow_pickle=allow_pickle) if _accepts(loader.sniff, "allow_pickle") else loader.sniff(path)
        if hit:
            found = found or fmt.DetectedFormat(path=Path(path), kind=loader.name, container="plugin")
            if _accepts(loader.load, "allow_pickle"):
                return loader.load(path, base, allow_pickle=allow_pickle), found
            return loader.load(path, base), found
    if error is not None:
        raise error
    raise FormatError(f"no registered loader reads {str(path)!r} (detected as {found.kind}); expected one of the built-in formats")
