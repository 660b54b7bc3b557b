"""Validated configuration dataclasses and the helpers every feature's config uses.

Configs validate in ``__post_init__`` and quote the bad value and what was expected. They
serialise to JSON with the package and library versions stamped in (:func:`to_json_dict`).
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from s2l_plugin.errors import ConfigError

#: The MIA attacks every entry point runs when none are named (``s2l audit``, ``s2l run`` configs,
#: ``s2l launch``, ``AuditSpec``, ``audit_membership``); ``reference`` is added wherever a reference
#: (base) model is at hand, and left out of a base model's own audit. The demo config names its own.
DEFAULT_ATTACKS = ("loss", "secmi", "pia", "pian")
DEFAULT_ATTACKS_WITH_BASE = (*DEFAULT_ATTACKS, "reference")

# Libraries whose versions decide whether a result reproduces.
STAMPED_LIBRARIES = (
    "s2l-plugin",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "numpy",
    "scikit-learn",
    "pluggy",
)


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide reproducibility (read from metadata: no imports).

    Read once per process (metadata lookups are slow and versions do not change under a run).
    """
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in STAMPED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not valid; expected one of: {', '.join(map(str, choices))}")


def check_positive(field: str, value: Any, *, allow_zero: bool = False, integer: bool = False) -> None:
    kind = "integer" if integer else "number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{field}={value!r} is not valid; expected a {'non-negative' if allow_zero else 'positive'} {kind}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{field}={value!r} is not valid; expected a {'non-negative' if allow_zero else 'positive'} {kind}")


def check_range(field: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ConfigError(f"{field}={value!r} is not valid; expected a number in [{low}, {high}]")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def to_json_dict(config: Any, *, stamp: bool = True) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict; with ``stamp`` the library versions are added under ``_versions``."""
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise TypeError(f"expected a dataclass instance, got {type(config).__name__}")
    data = _jsonable(config)
    if stamp:
        data["_versions"] = library_versions()
    return data


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build config ``cls`` from a dict, refusing unknown keys by name (no silent dropping)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in names and not k.startswith("_"))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for {cls.__name__}; expected some of: {', '.join(sorted(names))}"
        )
    return cls(**{k: v for k, v in data.items() if k in names})
