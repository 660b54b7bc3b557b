"""AUTOMATIC1111 hypernetwork files: the ``.pt`` layout, a safetensors equivalent, and validation.

A1111 ``.pt`` layout (a ``torch.save`` dict, read here only with ``weights_only=True``):

- integer keys = attention *context width* → ``(k_state_dict, v_state_dict)``, one small MLP for
  keys and one for values; state-dict keys are ``linear.{i}.weight`` / ``linear.{i}.bias`` where
  ``i`` is the slot in A1111's ``torch.nn.Sequential`` (activation, LayerNorm and dropout slots
  take indices too; LayerNorm slots carry weights). Old files use ``linear1`` / ``linear2`` (a
  plain ``[1, 2, 1]`` linear MLP), which :func:`normalize_module_keys` maps to ``linear.0`` /
  ``linear.1``.
- metadata: ``layer_structure`` (multipliers of the width, first and last 1), ``activation_func``,
  ``is_layer_norm``, ``weight_initialization``, ``use_dropout``, ``dropout_structure``,
  ``last_layer_dropout``, ``activate_output``, ``name``, ``step``, ``sd_checkpoint``,
  ``sd_checkpoint_name``, ``optional_info``.

safetensors equivalent (this project's; A1111 has none): tensors ``"{width}.k.{key}"`` and
``"{width}.v.{key}"``, header metadata ``{"s2l_format": "a1111-hypernetwork"}`` plus every metadata
key above as a JSON string. Converting ``.pt`` → safetensors → ``.pt`` is lossless.

Everything here is pure (no nn.Module): :func:`layer_plan` is the one description of A1111's
Sequential, used both to validate files and (in ``adapters/hypernetwork.py``) to build modules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_plugin._io import atomic_path
from s2l_plugin.errors import ConfigError, FormatError, InputError

SAFETENSORS_MARKER_KEY = "s2l_format"
SAFETENSORS_MARKER = "a1111-hypernetwork"

#: A1111's activation names → torch.nn class names. Only parameter-free activations: a module with
#: weights (PReLU) would add state-dict keys that no A1111 file has.
ACTIVATIONS: dict[str, str] = {
    "linear": "Identity",
    "relu": "ReLU",
    "leakyrelu": "LeakyReLU",
    "elu": "ELU",
    "swish": "Hardswish",  # A1111 maps "swish" to Hardswish
    "tanh": "Tanh",
    "sigmoid": "Sigmoid",
    "gelu": "GELU",
    "silu": "SiLU",
    "mish": "Mish",
    "hardswish": "Hardswish",
    "softsign": "Softsign",
    "selu": "SELU",
    "celu": "CELU",
}
WEIGHT_INITIALIZATIONS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
#: Metadata keys A1111 writes, in its order; all of them round-trip.
METADATA_KEYS = (
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "activate_output",
    "name",
    "step",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "optional_info",
)
#: Keys of forks whose modules compute something else; refused unless off.
UNSUPPORTED_FORK_KEYS = ("skip_connection", "upsample_linear")
OLD_KEY_MAP = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


def default_dropout_structure(layer_structure: Iterable[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's dropout structure when a file gives none: 0 everywhere, or 0.3 after hidden layers."""
    n = len(list(layer_structure))
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


@dataclass
class HypernetworkSpec:
    """The structure of every MLP in a hypernetwork (A1111's options); validates on construction.

    ``layer_structure`` multiplies the context width per layer: ``[1, 2, 1]`` is width → 2·width →
    width. Raises ConfigError naming the bad value.
    """

    layer_structure: list[float] = field(default_factory=lambda: [1, 2, 1])
    activation_func: str = "linear"
    is_layer_norm: bool = False
    weight_initialization: str = "Normal"
    use_dropout: bool = False
    dropout_structure: list[float] | None = None
    last_layer_dropout: bool = False
    activate_output: bool = False

    def __post_init__(self) -> None:
        ls = self.layer_structure
        if (
            not isinstance(ls, (list, tuple))
            or len(ls) < 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in ls)
            or ls[0] != 1
            or ls[-1] != 1
        ):
            raise ConfigError(
                f"layer_structure={ls!r} is not valid; expected a list of positive numbers that starts and ends with 1, e.g. [1, 2, 1]"
            )
        self.layer_structure = list(ls)
        if self.activation_func is None:  # A1111 writes None for "linear" in some versions
            self.activation_func = "linear"
        if self.activation_func not in ACTIVATIONS:
            raise ConfigError(
                f"activation_func={self.activation_func!r} is not valid; expected one of: {', '.join(ACTIVATIONS)}"
            )
        if self.weight_initialization not in WEIGHT_INITIALIZATIONS:
            raise ConfigError(
                f"weight_initialization={self.weight_initialization!r} is not valid; expected one of: {', '.join(WEIGHT_INITIALIZATIONS)}"
            )
        for name in ("is_layer_norm", "use_dropout", "last_layer_dropout", "activate_output"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not valid; expected true or false")
        if self.dropout_structure is None:
            self.dropout_structure = default_dropout_structure(ls, self.use_dropout, self.last_layer_dropout)
        ds = self.dropout_structure
        if (
            not isinstance(ds, (list, tuple))
            or len(ds) != len(ls)
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1 for v in ds)
            or ds[0] != 0
            or ds[-1] != 0
        ):
            raise ConfigError(
                f"dropout_structure={ds!r} is not valid; expected {len(ls)} probabilities in [0, 1) "
                "(one per layer_structure entry) that start and end with 0"
            )
        self.dropout_structure = list(ds)

    def metadata(self) -> dict[str, Any]:
        """The A1111 metadata keys this spec sets (``name``/``step`` are the file's)."""
        return {
            "layer_structure": list(self.layer_structure),
            "activation_func": self.activation_func,
            "is_layer_norm": self.is_layer_norm,
            "weight_initialization": self.weight_initialization,
            "use_dropout": self.use_dropout,
            "dropout_structure": list(self.dropout_structure or []),
            "last_layer_dropout": self.last_layer_dropout,
            "activate_output": self.activate_output,
        }


def layer_plan(spec: HypernetworkSpec, width: int) -> list[tuple[str, Any]]:
    """A1111's Sequential for one MLP of context width ``width``, slot by slot.

    Each slot is ``("linear", (in_features, out_features))``, ``("activation", torch_class_name)``,
    ``("layer_norm", features)`` or ``("dropout", p)``; the slot's index is its ``linear.{i}`` index.
    The activation follows every linear layer but the last (unless ``activate_output``).
    """
    ls = spec.layer_structure
    ds = spec.dropout_structure or [0.0] * len(ls)
    slots: list[tuple[str, Any]] = []
    for i in range(len(ls) - 1):
        out_features = int(width * ls[i + 1])
        slots.append(("linear", (int(width * ls[i]), out_features)))
        last = i >= len(ls) - 2
        if spec.activation_func != "linear" and (not last or spec.activate_output):
            slots.append(("activation", ACTIVATIONS[spec.activation_func]))
        if spec.is_layer_norm:
            slots.append(("layer_norm", out_features))
        if ds[i + 1] > 0:
            slots.append(("dropout", float(ds[i + 1])))
    return slots


def expected_shapes(spec: HypernetworkSpec, width: int) -> dict[str, tuple[int, ...]]:
    """``linear.{i}.weight/bias`` → shape, for one MLP of ``width`` built from ``spec``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (kind, arg) in enumerate(layer_plan(spec, width)):
        if kind == "linear":
            shapes[f"linear.{i}.weight"] = (arg[1], arg[0])
            shapes[f"linear.{i}.bias"] = (arg[1],)
        elif kind == "layer_norm":
            shapes[f"linear.{i}.weight"] = (arg,)
            shapes[f"linear.{i}.bias"] = (arg,)
    return shapes


def normalize_module_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Map old-style ``linear1.*`` / ``linear2.*`` keys to ``linear.0.*`` / ``linear.1.*``; others unchanged."""
    return {OLD_KEY_MAP.get(key, key): value for key, value in state.items()}


@dataclass
class HypernetworkFile:
    """A hypernetwork in memory: ``layers[width] = (k_state_dict, v_state_dict)`` plus its metadata.

    State-dict keys are normalised (``linear.{i}.*``); tensors are CPU float tensors.
    ``extra`` keeps the remaining A1111 metadata (``sd_checkpoint``, ``optional_info``, ...).
    """

    spec: HypernetworkSpec
    layers: dict[int, tuple[dict[str, Any], dict[str, Any]]]
    name: str = "hypernetwork"
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        return sorted(self.layers)


def validate(hn: HypernetworkFile, *, source: str = "hypernetwork") -> HypernetworkFile:
    """Check every module's keys and shapes against ``hn.spec``; FormatError naming the first mismatch."""
    import torch

    if not hn.layers:
        raise FormatError(f"{source}: no modules (no integer context-width keys); expected e.g. {{768: (k, v)}}")
    for width, pair in hn.layers.items():
        if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
            raise FormatError(f"{source}: context width key {width!r} is not a positive integer")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise FormatError(f"{source}: width {width} holds {type(pair).__name__}; expected a (k, v) pair of state dicts")
        want = expected_shapes(hn.spec, width)
        for which, state in zip("kv", pair, strict=True):
            if not isinstance(state, dict):
                raise FormatError(f"{source}: width {width} {which}-module is {type(state).__name__}; expected a state dict")
            missing = sorted(set(want) - set(state))
            unexpected = sorted(set(state) - set(want))
            if missing or unexpected:
                raise FormatError(
                    f"{source}: width {width} {which}-module keys do not match layer_structure={hn.spec.layer_structure} "
                    f"is_layer_norm={hn.spec.is_layer_norm}: missing {missing[:4]}, unexpected {unexpected[:4]}"
                )
            for key, shape in want.items():
                tensor = state[key]
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                    got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise FormatError(
                        f"{source}: width {width} {which}-module {key} has shape {got}; expected {list(shape)} "
                        f"for context width {width}"
                    )
    return hn


def check_widths(file_widths: Iterable[int], model_widths: Iterable[int], *, source: str = "hypernetwork") -> None:
    """FormatError naming both numbers when a module's width is not a context width of the base model.

    ``model_widths`` are the widths of the contexts the base UNet's attention layers see
    (``attn.to_k.in_features``): the channel widths for self-attention, the text width for cross-attention.
    """
    model = sorted(set(model_widths))
    for width in sorted(set(file_widths)):
        if width not in model:
            raise FormatError(
                f"{source}: hypernetwork module width {width} does not match the base model, whose attention "
                f"context widths are {', '.join(map(str, model))}"
            )


def _convert_pt_to_file(data: Any, *, source: str) -> HypernetworkFile:
    """The dict of an A1111 ``.pt`` → :class:`HypernetworkFile` (old keys normalised, validated)."""
    import torch

    if not isinstance(data, dict):
        raise FormatError(f"{source}: an A1111 hypernetwork is a dict; this file holds a {type(data).__name__}")
    layers: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    meta: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(key, int) and not isinstance(key, bool):
            if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(isinstance(s, dict) for s in value):
                raise FormatError(f"{source}: width {key} holds {type(value).__name__}; expected a (k, v) pair of state dicts")
            layers[key] = tuple(
                {k: v.detach().to("cpu") if isinstance(v, torch.Tensor) else v for k, v in normalize_module_keys(s).items()}
                for s in value
            )  # type: ignore[assignment]
        else:
            meta[str(key)] = value
    for key in UNSUPPORTED_FORK_KEYS:
        if meta.get(key):
            raise FormatError(f"{source}: {key}={meta[key]!r} (a fork's extension) is not supported; expected it unset or false")
    init = meta.get("weight_initialization") or "Normal"
    try:
        spec = HypernetworkSpec(
            layer_structure=meta.get("layer_structure") or [1, 2, 1],
            activation_func=meta.get("activation_func") or "linear",
            is_layer_norm=bool(meta.get("is_layer_norm", False)),
            # how the weights were initialised does not change what a trained file computes; a name
            # this project does not know is kept as written (in ``extra``) instead of refusing the file
            weight_initialization=init if init in WEIGHT_INITIALIZATIONS else "Normal",
            use_dropout=bool(meta.get("use_dropout", False)),
            dropout_structure=meta.get("dropout_structure"),
            last_layer_dropout=bool(meta.get("last_layer_dropout", False)),
            activate_output=bool(meta.get("activate_output", False)),
        )
    except ConfigError as exc:
        raise FormatError(f"{source}: {exc}") from exc
    step = meta.get("step")
    name = meta.get("name")
    extra = {k: v for k, v in meta.items() if k not in METADATA_KEYS or k in ("sd_checkpoint", "sd_checkpoint_name", "optional_info")}
    if init not in WEIGHT_INITIALIZATIONS:
        extra["weight_initialization"] = init
    hn = HypernetworkFile(
        spec=spec,
        layers=layers,
        name=name if isinstance(name, str) and name else Path(source).stem,
        step=step if isinstance(step, int) and not isinstance(step, bool) else 0,
        extra=extra,
    )
    return validate(hn, source=source)


def _convert_file_to_pt(hn: HypernetworkFile) -> dict[str, Any]:
    """:class:`HypernetworkFile` → the A1111 ``.pt`` dict (int keys, tuples, metadata)."""
    from collections import OrderedDict

    data: dict[Any, Any] = {
        width: tuple(OrderedDict((k, v.detach().to("cpu").contiguous()) for k, v in s.items()) for s in pair)
        for width, pair in sorted(hn.layers.items())
    }
    data.update(hn.spec.metadata())
    data.update({"name": hn.name, "step": int(hn.step), "sd_checkpoint": None, "sd_checkpoint_name": None, "optional_info": None})
    data.update(hn.extra)
    return data


def _convert_file_to_safetensors(hn: HypernetworkFile) -> tuple[dict[str, Any], dict[str, str]]:
    """:class:`HypernetworkFile` → (tensors ``"{width}.{k|v}.{key}"``, str→JSON-str header metadata)."""
    tensors = {
        f"{width}.{which}.{key}": value.detach().to("cpu").contiguous()
        for width, pair in sorted(hn.layers.items())
        for which, state in zip("kv", pair, strict=True)
        for key, value in state.items()
    }
    meta_values = {**hn.spec.metadata(), "name": hn.name, "step": int(hn.step), **hn.extra}
    metadata = {SAFETENSORS_MARKER_KEY: SAFETENSORS_MARKER}
    try:
        metadata.update({key: json.dumps(value) for key, value in meta_values.items()})
    except TypeError as exc:
        raise FormatError(f"hypernetwork metadata cannot be stored as JSON in a safetensors header: {exc}") from exc
    return tensors, metadata


def _convert_safetensors_to_file(tensors: dict[str, Any], metadata: dict[str, str], *, source: str) -> HypernetworkFile:
    """The inverse of :func:`_convert_file_to_safetensors`; FormatError on a foreign or malformed file."""
    if metadata.get(SAFETENSORS_MARKER_KEY) != SAFETENSORS_MARKER:
        raise FormatError(
            f"{source}: safetensors header has {SAFETENSORS_MARKER_KEY}={metadata.get(SAFETENSORS_MARKER_KEY)!r}; "
            f"expected {SAFETENSORS_MARKER!r} (a hypernetwork written by s2l-plugin)"
        )
    data: dict[Any, Any] = {}
    for key, raw in metadata.items():
        if key == SAFETENSORS_MARKER_KEY:
            continue
        try:
            data[key] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{source}: header value of {key!r} is not JSON ({exc.msg})") from exc
    pairs: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    for name, tensor in tensors.items():
        width_s, _, rest = name.partition(".")
        which, _, key = rest.partition(".")
        if not width_s.isdigit() or which not in ("k", "v") or not key:
            raise FormatError(f"{source}: tensor name {name!r} is not '<width>.<k|v>.<key>'")
        pair = pairs.setdefault(int(width_s), ({}, {}))
        pair[0 if which == "k" else 1][key] = tensor
    data.update(pairs)
    return _convert_pt_to_file(data, source=source)


def read_hypernetwork(path: str | Path, *, allow_pickle: bool = False) -> HypernetworkFile:
    """Read this project's safetensors form or an A1111 ``.pt``, validated (format decided by content).

    A ``.pt`` is a pickle: refused unless ``allow_pickle``, then read with
    ``torch.load(weights_only=True)`` only, so no code in the file can run.
    """
    from s2l_plugin.formats.detect import container_of, load_pickle, load_safetensors, read_safetensors_header

    path = Path(path)
    if not path.is_file():
        raise InputError(f"hypernetwork file {str(path)!r} does not exist")
    if container_of(path) == "safetensors":
        metadata = read_safetensors_header(path).metadata
        return _convert_safetensors_to_file(load_safetensors(path), metadata, source=str(path))
    return _convert_pt_to_file(load_pickle(path, allow_pickle=allow_pickle), source=str(path))


def write_hypernetwork(hn: HypernetworkFile, path: str | Path) -> Path:
    """Write ``hn`` (validated first) as A1111 ``.pt`` or, for a ``.safetensors`` path, the safetensors form; atomic."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    validate(hn, source=str(path))
    if path.suffix == ".safetensors":
        tensors, metadata = _convert_file_to_safetensors(hn)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    elif path.suffix == ".pt":
        data = _convert_file_to_pt(hn)
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
    else:
        raise FormatError(f"hypernetwork path {str(path)!r} has suffix {path.suffix!r}; expected .pt or .safetensors")
    return path


def sniff_hypernetwork(path: str | Path, *, allow_pickle: bool = False) -> bool:
    """True when ``path`` is a hypernetwork file: our marked safetensors, or (with ``allow_pickle``) an A1111 ``.pt``."""
    from s2l_plugin.formats.detect import HYPERNETWORK, detect

    path = Path(path)
    if not path.is_file():
        return False
    try:
        found = detect(path, allow_pickle=allow_pickle)
    except FormatError:
        return False
    if found.container == "safetensors":
        return found.metadata.get(SAFETENSORS_MARKER_KEY) == SAFETENSORS_MARKER
    return found.kind == HYPERNETWORK
