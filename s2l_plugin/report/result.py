"""The typed result model of an audit or an S2L run, saved as versioned JSON.

Every number a report shows lives here, computed once by the audit stages; report writers
read the saved JSON and never recompute. Scores point one way everywhere: higher = more
likely a member. Distances are normalized ℓ2 on images in [-1, 1] unless a field says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_plugin.errors import InputError

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"


@dataclass
class AttackResult:
    """One MIA attack on one model: per-sample scores (higher = member) and the metrics from them."""

    attack: str
    member_ids: list[str]
    nonmember_ids: list[str]
    member_scores: list[float]
    nonmember_scores: list[float]
    auc: float
    auc_ci: list[float]  # [low, high], 95% bootstrap
    tpr_at_1fpr: float
    tpr_at_1fpr_ci: list[float]
    tpr_at_01fpr: float
    asr: float  # best balanced accuracy over thresholds
    advantage: float  # max |TPR - FPR|
    roc_fpr: list[float]
    roc_tpr: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    unet_calls_per_image: int | None = None


@dataclass
class MembershipResult:
    """Membership inference on one model: one AttackResult per attack, plus data diagnostics."""

    attacks: list[AttackResult]
    n_members: int
    n_nonmembers: int
    seed: int
    shift: dict[str, Any] | None = None  # distribution-shift diagnostic between the two sets
    warnings: list[str] = field(default_factory=list)

    def attack(self, name: str) -> AttackResult:
        for a in self.attacks:
            if a.attack == name:
                return a
        raise KeyError(name)


@dataclass
class ExtractionMatch:
    """A generation matched to its nearest reference image."""

    prompt: str
    generation_index: int
    seed: int
    reference_id: str | None
    distance_l2: float
    distance_tiled: float
    extracted: bool  # distance below delta
    clique_size: int = 1  # size of the near-duplicate group the generation belongs to
    distance_embedding: float | None = None


@dataclass
class ExtractionResult:
    """Carlini-style extraction: generate n per prompt, find near-duplicate groups, match to references."""

    prompts: list[str]
    n_per_prompt: int
    n_generations: int
    delta: float
    tile: int
    clique_k: int
    base_seed: int
    candidates: list[ExtractionMatch]  # members of near-duplicate groups of size >= clique_k
    matches: list[ExtractionMatch]  # best reference match of every generation within delta (or all, when small)
    extracted_unique: dict[str, int]  # prompt -> unique reference images extracted
    extracted_total: int  # unique reference images extracted over all prompts
    extraction_rate: float  # extracted generations / generations
    n_references: int = 0
    grid_png: str | None = None  # path relative to the result folder
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MemorizationScore:
    """Wen et al. text-conditional noise magnitude for one prompt (higher = more memorized)."""

    prompt: str
    score: float
    per_step: list[float] = field(default_factory=list)


@dataclass
class MemorizationResult:
    scores: list[MemorizationScore]
    steps: int
    n_generations: int
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetadataFinding:
    """A privacy-relevant piece of checkpoint metadata (needs no data to find)."""

    key: str
    severity: str  # "high" | "medium" | "low" | "info"
    message: str
    value: str = ""


@dataclass
class ModelIdentity:
    label: str  # "base", "lora", "dreambooth", ... (what the report calls it)
    path: str | None = None
    method: str | None = None
    sha256: str | None = None


@dataclass
class AuditResult:
    """Everything audited on one model."""

    model: ModelIdentity
    membership: MembershipResult | None = None
    extraction: ExtractionResult | None = None
    memorization: MemorizationResult | None = None
    findings: list[MetadataFinding] = field(default_factory=list)


@dataclass
class Comparison:
    """Before (base) vs after (fine-tuned) for one method and attack, on the same data and noise."""

    method: str
    attack: str
    auc_before: float
    auc_after: float
    delta_auc: float
    delta_auc_ci: list[float]  # paired bootstrap 95%
    tpr_at_1fpr_before: float
    tpr_at_1fpr_after: float
    extracted_before: int | None = None
    extracted_after: int | None = None
    n_generations: int | None = None
    subset: str = "all"  # "all" | "non-duplicated" | "duplicated" members vs non-members


@dataclass
class RunResult:
    """The saved outcome of ``s2l run`` / ``s2l audit`` / ``s2l launch``."""

    kind: str  # "run" | "audit" | "launch"
    audits: list[AuditResult]
    comparisons: list[Comparison] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    seeds: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def audit(self, label: str) -> AuditResult:
        for a in self.audits:
            if a.model.label == label:
                return a
        raise KeyError(label)


# -- (de)serialisation ---------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """A result dataclass as plain JSON-ready data (floats stay floats; NaN is not allowed)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def _build(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if data is None:
            return None
        return _build(args[0], data) if len(args) == 1 else data
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return [_build(inner, v) for v in data]
    if origin is dict:
        args = typing.get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        return {k: _build(inner, v) for k, v in data.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, data)
    return data


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild result dataclass ``cls`` from :func:`to_dict` output (unknown keys are an error)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InputError(f"{cls.__name__}: unexpected field(s) {sorted(unknown)} in result data")
    return cls(**{k: _build(hints[k], v) for k, v in data.items()})


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_result(result: RunResult, out_dir: str | Path) -> Path:
    """Write ``result.json`` (atomically) into ``out_dir``; returns its path."""
    path = Path(out_dir) / RESULT_FILE
    _atomic_write_text(path, json.dumps(to_dict(result), indent=2, allow_nan=False) + "\n")
    return path


def load_result(path: str | Path) -> RunResult:
    """Load a saved result (a ``result.json`` or the folder holding it).

    Results from a newer schema version, or an older one this version cannot read, fail with
    an InputError that names the version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    if not path.is_file():
        raise InputError(f"no result at {str(path)!r}; expected a {RESULT_FILE} written by s2l")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{str(path)!r} is not valid JSON ({exc.msg})") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise InputError(
            f"{str(path)!r} has result schema_version {version!r}; this s2l-plugin reads version {SCHEMA_VERSION}"
        )
    return from_dict(RunResult, data)
