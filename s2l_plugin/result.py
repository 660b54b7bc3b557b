"""The typed result model of an audit or an S2L run, saved as versioned JSON.

Every number a report shows lives here, computed once by the audit stages; report writers
read the saved JSON and never recompute. Scores point one way everywhere: higher = more
likely a member. Distances are normalized ℓ2 on images in [-1, 1] unless a field says otherwise.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_plugin._io import atomic_write_text
from s2l_plugin.errors import InputError

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
SAMPLES_DIR = "samples"


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
    # Named member subsets (e.g. "duplicated") vs all non-members: member_indices, auc, auc_ci,
    # tpr_at_1fpr, tpr_at_1fpr_ci, tpr_at_01fpr, asr, advantage.
    subsets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The finest FPR the non-members resolve (1/n for n non-members) and whether each reported FPR is
    # at or above it; a TPR at an unresolvable FPR stays above for compatibility but is not a
    # measurement (reports show "n/r"). The subsets share the non-members, so these hold for them too.
    # None in results written before they existed (reports then use len(nonmember_scores)).
    min_resolvable_fpr: float | None = None
    tpr_at_1fpr_resolvable: bool | None = None
    tpr_at_01fpr_resolvable: bool | None = None


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
    # 1/n for the n non-members both audits scored, and whether 1% FPR is at or above it (when not,
    # tpr_at_1fpr_before/after are not measurements; reports show "n/r"). None in older results.
    min_resolvable_fpr: float | None = None
    tpr_at_1fpr_resolvable: bool | None = None


@dataclass
class QueryImage:
    """One ``--query`` image: its score under the query statistic (higher = member) and its p-value against the null."""

    id: str
    score: float
    p_value: float  # (1 + #{null scores >= score}) / (1 + n_null), one-sided


@dataclass
class QueryResult:
    """``s2l audit --query``: per-image p-values against a null of known non-members, and the dataset test
    (:mod:`s2l_plugin.audit.query`); scored on the audited checkpoint, with its base as reference."""

    attack: str  # the per-image statistic
    statistic: str  # what the score and the p-value are, in words
    alpha: float  # the level verdicts are read at
    min_p_value: float  # 1 / (1 + n_null): the smallest p-value the null can give
    images: list[QueryImage]
    null_ids: list[str]
    null_scores: list[float]
    # One-sided Mann-Whitney U of query vs null scores: test, n_query, n_null, u, auc, p_value, alpha,
    # significant, statement (what it does and does not establish).
    dataset: dict[str, Any] = field(default_factory=dict)
    shift: dict[str, Any] | None = None  # query-vs-null VAE-latent shift diagnostic


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
    # Distribution-shift diagnostic of the member / non-member sets, without the model under audit
    # (s2l_plugin.audit.shift.shift_summary): test p-value and level, shift classifier AUC, base AUCs.
    shift: dict[str, Any] | None = None
    # s2l audit --query: per-image p-values against the null and the dataset-level test (None without --query)
    query: QueryResult | None = field(default=None, metadata={"omit_if_none": True})
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
        # A field marked omit_if_none is left out when unset, so results without it stay byte-identical.
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_if_none") and getattr(obj, f.name) is None)}
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
    if not isinstance(data, dict):
        raise InputError(f"{cls.__name__}: expected a JSON object in result data, got {type(data).__name__}")
    unknown = set(data) - names
    if unknown:
        raise InputError(f"{cls.__name__}: unexpected field(s) {sorted(unknown)} in result data")
    required = {
        f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = required - set(data)
    if missing:
        raise InputError(f"{cls.__name__}: missing field(s) {sorted(missing)} in result data")
    return cls(**{k: _build(hints[k], v) for k, v in data.items()})


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def sample_tables(result: RunResult) -> dict[str, str]:
    """The per-sample arrays of ``result`` as CSV texts, keyed by their path relative to the result folder.

    ``samples/<model>.<attack>.scores.csv``: ``id,member,score`` (member 1/0; higher score =
    more likely a member); ``samples/<model>.extraction.csv``: one row per extraction match;
    ``samples/query.<attack>.csv`` (``s2l audit --query``): ``id,score,p_value`` per query image.
    The same values are in ``result.json``; the CSVs are for spreadsheets and pandas.
    """
    tables: dict[str, str] = {}
    for audit in result.audits:
        label = _safe_name(audit.model.label)
        if audit.membership is not None:
            for att in audit.membership.attacks:
                rows = [[i, 1, repr(float(s))] for i, s in zip(att.member_ids, att.member_scores, strict=True)]
                rows += [[i, 0, repr(float(s))] for i, s in zip(att.nonmember_ids, att.nonmember_scores, strict=True)]
                tables[f"{SAMPLES_DIR}/{label}.{_safe_name(att.attack)}.scores.csv"] = _csv_text(["id", "member", "score"], rows)
        if audit.extraction is not None:
            fields = [f.name for f in dataclasses.fields(ExtractionMatch)]
            rows = [[to_dict(getattr(m, f)) for f in fields] for m in audit.extraction.matches]
            tables[f"{SAMPLES_DIR}/{label}.extraction.csv"] = _csv_text(fields, rows)
    if result.query is not None:
        rows = [[q.id, repr(float(q.score)), repr(float(q.p_value))] for q in result.query.images]
        tables[f"{SAMPLES_DIR}/query.{_safe_name(result.query.attack)}.csv"] = _csv_text(["id", "score", "p_value"], rows)
    return tables


def save_result(result: RunResult, out_dir: str | Path) -> Path:
    """Write ``result.json`` into ``out_dir`` with its per-sample CSVs (:func:`sample_tables`) beside it.

    Every file is written atomically, the CSVs first, so a ``result.json`` that exists always
    has its CSVs. Returns the path of ``result.json``.
    """
    out_dir = Path(out_dir)
    text = json.dumps(to_dict(result), indent=2, allow_nan=False) + "\n"  # fails on NaN before anything is written
    for rel, csv_text in sample_tables(result).items():
        atomic_write_text(out_dir / rel, csv_text)
    path = out_dir / RESULT_FILE
    atomic_write_text(path, text)
    return path


# Upgrades of older saved results: MIGRATIONS[v] turns a version-v dict into a version-(v+1) dict.
# A field added with a default needs no migration (a missing key takes the default); a version
# bump is for changes that old files cannot express.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
OLDEST_READABLE = SCHEMA_VERSION - len(MIGRATIONS)


def upgrade(data: dict[str, Any], *, source: str = "result") -> dict[str, Any]:
    """Bring a saved result dict to :data:`SCHEMA_VERSION`, or raise InputError naming its version."""
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or not OLDEST_READABLE <= version <= SCHEMA_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            hint = "it was written by a newer s2l-plugin; upgrade s2l-plugin to read it"
        else:
            hint = "re-run the audit to write a current result"
        readable = (
            f"version {SCHEMA_VERSION}" if OLDEST_READABLE == SCHEMA_VERSION else f"versions {OLDEST_READABLE} to {SCHEMA_VERSION}"
        )
        raise InputError(f"{source} has result schema_version {version!r}; this s2l-plugin reads {readable} ({hint})")
    while data["schema_version"] < SCHEMA_VERSION:
        data = MIGRATIONS[data["schema_version"]](dict(data))
    return data


def load_result(path: str | Path) -> RunResult:
    """Load a saved result (a ``result.json`` or the folder holding it).

    Older schema versions are upgraded through :data:`MIGRATIONS`; a version this s2l-plugin
    cannot read (newer, or older than :data:`OLDEST_READABLE`) fails with an InputError that
    names the version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    if not path.is_file():
        raise InputError(f"no result at {str(path)!r}; expected a {RESULT_FILE} written by s2l")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{str(path)!r} is not valid JSON ({getattr(exc, 'msg', exc)}); expected a {RESULT_FILE} written by s2l") from exc
    if not isinstance(data, dict):
        raise InputError(f"{str(path)!r} is not an s2l result (expected a JSON object)")
    return from_dict(RunResult, upgrade(data, source=repr(str(path))))


def load_result_data(path: str | Path) -> dict[str, Any]:
    """A saved result as the plain dict report writers render: validated and upgraded by
    :func:`load_result`, with every field present (defaults filled in for older files)."""
    return to_dict(load_result(path))


# -- JSON Schema ---------------------------------------------------------------------------

SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "result.schema.json"


def _schema_of(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if tp is Any:
        return {}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_of(a, defs) for a in typing.get_args(tp)]}
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return {"type": "array", "items": _schema_of(inner, defs)}
    if origin is dict:
        args = typing.get_args(tp)
        return {"type": "object", "additionalProperties": _schema_of(args[1] if len(args) == 2 else Any, defs)}
    if tp is type(None):
        return {"type": "null"}
    if dataclasses.is_dataclass(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder against recursion
            hints = typing.get_type_hints(tp)
            props = {f.name: _schema_of(hints[f.name], defs) for f in dataclasses.fields(tp)}
            required = [
                f.name for f in dataclasses.fields(tp)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
            doc = (tp.__doc__ or "").strip().splitlines()
            defs[name] = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
            if doc and not doc[0].startswith(f"{name}("):
                defs[name]["description"] = doc[0]
        return {"$ref": f"#/$defs/{name}"}
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"no JSON Schema for {tp!r}")


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``result.json``, generated from the dataclasses.

    The shipped ``s2l_plugin/schema/result.schema.json`` must equal this (a test checks);
    regenerate it with ``python -m s2l_plugin.result``.
    """
    defs: dict[str, Any] = {}
    root = _schema_of(RunResult, defs)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://s2l-plugin.dev/schema/result-v{SCHEMA_VERSION}.json",
        "title": "s2l-plugin result",
        **root,
        "$defs": defs,
    }
    # The version a file claims is fixed per schema file.
    defs["RunResult"]["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    return schema


def write_schema(path: str | Path = SCHEMA_FILE) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":  # pragma: no cover
    print(write_schema())
