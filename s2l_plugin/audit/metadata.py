"""Metadata privacy scan: what a checkpoint's own metadata says about its training data.

No model is loaded and no data is needed. kohya's sd-scripts write the training set into the
safetensors header unless run with ``--no_metadata``: ``ss_tag_frequency`` lists every caption
tag and how often it occurs per image folder, ``ss_dataset_dirs`` / ``ss_datasets`` the image
folders (kohya DreamBooth names them ``<repeats>_<token> <class>``, so the identity token is in
the name), repeats, image counts and local paths; SAI ``modelspec.trigger_phrase`` names the
trigger word. Textual Inversion files carry their token, A1111 hypernetworks their ``name``
and the checkpoint they were trained on (``sd_checkpoint_name``).

Severities: ``high`` = training-data content (captions, dataset paths); ``medium`` =
identifying names (trigger words, tokens, dataset folder names, local paths); ``low`` =
training details (image counts, seeds, timestamps); ``info`` = harmless provenance.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from s2l_plugin.pipeline import FAMILY_NAMES
from s2l_plugin.result import MetadataFinding

SEVERITIES = ("high", "medium", "low", "info")
_SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}

#: a POSIX home/absolute path, a Windows drive path or a UNC path inside a metadata value
_PATH_RE = re.compile(r"(?:[A-Za-z]:[\\/][^\"',;]*|\\\\[^\\\s\"']+\\[^\"',;]*|(?<![\w.])/(?:home|Users|mnt|media|data|root|srv|content|workspace|opt|tmp|var)/[^\"',;]*|~/[^\"',;]*)")
#: kohya DreamBooth-style folder name: "<repeats>_<token and class>"
_KOHYA_DIR_RE = re.compile(r"^(\d+)_(.+)$")
_MAX_VALUE_CHARS = 400

_LOW_KEYS = {
    "ss_num_train_images": "number of training images",
    "ss_num_reg_images": "number of regularisation images",
    "ss_num_batches_per_epoch": "batches per epoch",
    "ss_seed": "training seed",
    "ss_session_id": "training session id",
    "ss_training_started_at": "training start time",
    "ss_training_finished_at": "training end time",
    "ss_bucket_info": "image-size buckets of the training set",
    "ss_resolution": "training resolution",
    "ss_max_train_steps": "training steps",
    "modelspec.date": "training date",
    "modelspec.resolution": "training resolution",
    "ss_epoch": "epochs",
    "ss_steps": "steps",
}
_INFO_KEYS = {
    "ss_sd_model_name": "base model the network was trained on",
    "ss_sd_model_hash": "base model hash",
    "ss_new_sd_model_hash": "base model hash",
    "ss_vae_name": "VAE used in training",
    "ss_network_module": "network module",
    "ss_output_name": "output name chosen by the trainer",
    "sshs_model_hash": "additional-networks model hash",
    "modelspec.title": "model title",
    "modelspec.author": "model author",
    "modelspec.description": "model description",
    "modelspec.sai_model_spec": "SAI model spec version",
    "modelspec.implementation": "implementation the model is written for",
    "modelspec.license": "model license",
    "modelspec.usage_hint": "usage hint written by the author",
    "modelspec.tags": "tags written by the author",
    "modelspec.prediction_type": "prediction type",
    "modelspec.timestep_range": "timestep range",
    "modelspec.hash_sha256": "hash of the model",
    "sd_checkpoint": "hash of the base checkpoint",
}


def _short(value: str) -> str:
    return value if len(value) <= _MAX_VALUE_CHARS else value[: _MAX_VALUE_CHARS - 3] + "..."


def _json_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError, ValueError):
        return None


def _tag_frequency_findings(raw: str) -> list[MetadataFinding]:
    data = _json_value(raw)
    if not isinstance(data, dict):
        return [MetadataFinding("ss_tag_frequency", "medium", "ss_tag_frequency is present but not a JSON object", _short(raw))]
    tags: dict[str, int] = {}
    for counts in data.values():
        if isinstance(counts, dict):
            for tag, n in counts.items():
                tags[str(tag)] = tags.get(str(tag), 0) + (n if isinstance(n, int) else 0)
    ranked = sorted(tags.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{t} ({n})" for t, n in ranked[:20])
    folders = ", ".join(repr(str(d)) for d in list(data)[:10])
    return [
        MetadataFinding(
            "ss_tag_frequency",
            "high",
            f"leaks the training captions: {len(tags)} distinct caption tags from {len(data)} image folder(s) "
            f"({folders}); most frequent: {shown}",
            _short(json.dumps(dict(ranked), ensure_ascii=False)),
        )
    ]


def _dataset_dirs_findings(key: str, raw: str) -> list[MetadataFinding]:
    data = _json_value(raw)
    if not isinstance(data, dict):
        return [MetadataFinding(key, "medium", f"{key} is present but not a JSON object", _short(raw))]
    parts = []
    for name, info in data.items():
        info = info if isinstance(info, dict) else {}
        repeats, count = info.get("n_repeats"), info.get("img_count")
        match = _KOHYA_DIR_RE.match(str(name))
        token = f", token/class {match.group(2)!r}" if match else ""
        parts.append(f"{name!r} ({count} images x {repeats} repeats{token})")
    reg = " regularisation" if key.startswith("ss_reg") else ""
    return [
        MetadataFinding(
            key,
            "medium",
            f"names {len(data)}{reg} dataset folder(s) with repeats and image counts: " + "; ".join(parts[:10]),
            _short(raw),
        )
    ]


def _datasets_findings(raw: str) -> list[MetadataFinding]:
    data = _json_value(raw)
    if not isinstance(data, list):
        return [MetadataFinding("ss_datasets", "medium", "ss_datasets is present but not a JSON list", _short(raw))]
    dirs, tokens, files = [], [], []
    for ds in data:
        for sub in (ds.get("subsets", []) if isinstance(ds, dict) else []):
            if not isinstance(sub, dict):
                continue
            if sub.get("image_dir"):
                dirs.append(str(sub["image_dir"]))
            if sub.get("class_tokens"):
                tokens.append(str(sub["class_tokens"]))
            if sub.get("metadata_file"):
                files.append(str(sub["metadata_file"]))
    findings = [
        MetadataFinding(
            "ss_datasets",
            "high" if dirs or files else "medium",
            f"describes {len(data)} dataset(s): image folders {dirs[:10]}, class tokens {tokens[:10]}, "
            f"caption files {files[:10]}",
            _short(raw),
        )
    ]
    return findings


def _ti_token_findings(tokens: Iterable[str], source: str) -> list[MetadataFinding]:
    tokens = [t for t in tokens if t]
    if not tokens:
        return []
    return [
        MetadataFinding(
            source,
            "medium",
            f"Textual Inversion token name(s) {', '.join(repr(t) for t in tokens[:10])} -- often the name of the trained identity",
            _short(", ".join(tokens)),
        )
    ]


def _is_caption_text(key: str, raw: str) -> bool:
    """A key that names captions or prompts (``sample_captions``, ``ss_sample_prompts``) and holds text,
    not one of kohya's caption settings (``ss_caption_dropout_rate`` = "0.0", ``ss_shuffle_caption`` = "True",
    ``ss_caption_extension`` = ".txt")."""
    name = key.lower()
    if not ("caption" in name or "prompt" in name) or name.endswith(("extension", "extention")):
        return False
    value = raw.strip()
    if value.lower() in ("", "none", "null", "true", "false", "[]", "{}"):
        return False
    try:
        float(value)
    except ValueError:
        return True
    return False


def scan_metadata(
    metadata: dict[str, str],
    *,
    kind: str | None = None,
    keys: Iterable[str] = (),
) -> list[MetadataFinding]:
    """Privacy findings from a checkpoint's metadata (str→str) and, for embeddings, its tensor keys.

    ``kind`` is a :mod:`s2l_plugin.formats.detect` kind; for ``textual_inversion`` the tensor
    keys are the token names. Findings are sorted by severity (high first), then key. Every
    metadata key yields at most one finding per rule; unknown keys are listed as ``info``.
    """
    from s2l_plugin.formats.detect import TEXTUAL_INVERSION

    findings: list[MetadataFinding] = []
    seen: set[str] = set()
    for key, raw in metadata.items():
        base_key = key.rsplit("/", 1)[-1]  # PEFT folders prefix keys with their component
        if base_key == "ss_tag_frequency":
            findings += _tag_frequency_findings(raw)
        elif base_key in ("ss_dataset_dirs", "ss_reg_dataset_dirs"):
            findings += _dataset_dirs_findings(key, raw)
        elif base_key == "ss_datasets":
            findings += _datasets_findings(raw)
        elif base_key == "modelspec.trigger_phrase" and raw.strip():
            findings.append(MetadataFinding(key, "medium", f"trigger phrase {raw.strip()!r} (the word that invokes the trained subject)", _short(raw)))
        elif base_key in ("modelspec.architecture", "ss_base_model_version") and raw.strip():
            family = _family_from_metadata({base_key: raw})
            named = f" ({FAMILY_NAMES[family]})" if family in FAMILY_NAMES else ""
            findings.append(MetadataFinding(key, "info", f"base model family {raw.strip()!r}{named}", _short(raw)))
        elif base_key == "modelspec.thumbnail" and raw.strip():
            findings.append(MetadataFinding(key, "medium", "preview image embedded in the file (often a sample of the "
                                            "trained subject)", _short(raw)))
        elif base_key == "ss_training_comment" and raw.strip():
            findings.append(MetadataFinding(key, "low", "free-text training comment written by the trainer", _short(raw)))
        elif base_key == "name" and kind in ("hypernetwork", "textual_inversion") and raw.strip():
            what = "hypernetwork" if kind == "hypernetwork" else "embedding"
            findings.append(MetadataFinding(key, "medium", f"{what} name {raw.strip()!r} (often the trained subject)", _short(raw)))
        elif base_key == "sd_checkpoint_name" and raw.strip():
            findings.append(MetadataFinding(key, "low", f"trained on base checkpoint {raw.strip()!r}", _short(raw)))
        elif base_key == "string_to_token":
            parsed = _json_value(raw)
            toks = [str(t) for t in parsed] if isinstance(parsed, list) else [raw]
            # A1111 files key every embedding by the placeholder "*"; the real name is `name`.
            findings += _ti_token_findings([t for t in toks if t != "*"], key)
        elif _is_caption_text(base_key, raw):
            findings.append(MetadataFinding(key, "high", "caption or prompt text written by the trainer "
                                            "(sample prompts, captions)", _short(raw)))
        elif base_key in _LOW_KEYS:
            findings.append(MetadataFinding(key, "low", _LOW_KEYS[base_key], _short(raw)))
        elif base_key in _INFO_KEYS:
            findings.append(MetadataFinding(key, "info", _INFO_KEYS[base_key], _short(raw)))
        else:
            findings.append(MetadataFinding(key, "info", "other metadata", _short(raw)))
        seen.add(key)
        # Local paths can hide in any value (ss_sd_model_name, ss_datasets, ss_output_name, ...).
        paths = sorted(set(m.group(0).strip() for m in _PATH_RE.finditer(raw)))
        if paths:
            findings.append(
                MetadataFinding(key, "medium", f"contains local path(s) of the trainer's machine: {', '.join(paths[:5])}",
                                _short("; ".join(paths)))
            )
    if kind == TEXTUAL_INVERSION:
        tokens = [k for k in keys if k not in ("emb_params", "clip_l", "clip_g", "string_to_token", "string_to_param",
                                                "name", "step", "sd_checkpoint", "sd_checkpoint_name")]
        findings += _ti_token_findings(tokens, "token")
    findings.sort(key=lambda f: (_SEVERITY_RANK.get(f.severity, 99), f.key))
    return findings


def scan_detected(found: Any) -> list[MetadataFinding]:
    """Findings of a :class:`~s2l_plugin.formats.detect.DetectedFormat`, every file it loads included.

    A folder loaded as several files (a LoRA and its embeddings) is scanned file by file, each
    finding's key prefixed with its file name (``"learned_embeds.safetensors/token"``).
    """
    if not found.parts:
        return scan_metadata(found.metadata, kind=found.kind, keys=found.keys)
    findings: list[MetadataFinding] = []
    for part in [found, *found.parts]:
        for f in scan_metadata(part.metadata, kind=part.kind, keys=part.keys):
            findings.append(dataclasses.replace(f, key=f"{Path(part.path).name}/{f.key}"))
    findings.sort(key=lambda f: (_SEVERITY_RANK.get(f.severity, 99), f.key))
    return findings


def scan_file(path: str | Path, *, allow_pickle: bool = False) -> list[MetadataFinding]:
    """Detect ``path``'s format (validating it) and scan its metadata; no model is loaded.

    Raises FormatError for a malformed or unsupported file (a pickle needs ``allow_pickle``).
    """
    from s2l_plugin.formats.detect import detect

    return scan_detected(detect(path, allow_pickle=allow_pickle))


def worst_severity(findings: Iterable[MetadataFinding]) -> str | None:
    """The most severe level among ``findings`` (None when there are none)."""
    ranks = [_SEVERITY_RANK.get(f.severity, 99) for f in findings]
    return SEVERITIES[min(ranks)] if ranks else None


# -- metadata clean-up (``s2l scan FILE --strip OUT``) ----------------------------------------------

#: The keys kohya's sd-scripts keep even with ``--no_metadata`` (``SS_METADATA_MINIMUM_KEYS`` in its
#: ``library/train_util.py``): what kohya-aware loaders read to rebuild the network.
KOHYA_MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                      "ss_network_args")
#: Keys loaders read to load the file itself: safetensors' ``format`` (transformers checks it) and
#: diffusers' ``lora_adapter_metadata`` (a LoRA's rank / alpha / target modules). Never stripped.
LOADER_KEYS = ("format", "lora_adapter_metadata")
MODELSPEC_PREFIX = "modelspec."


@dataclasses.dataclass
class StripResult:
    """What :func:`strip_file` wrote: the output path, the metadata kept and the keys removed."""

    path: Path
    kept: dict[str, str]
    removed: list[str]
    findings: list[MetadataFinding]  # what the scan still finds in the output (e.g. a token name that is a tensor key)


def strip_plan(metadata: dict[str, str], *, strip_all: bool = False, keep: Iterable[str] = ()) -> tuple[dict[str, str], list[str]]:
    """``(kept, removed)``: the metadata a stripped copy keeps, and the keys it drops.

    Kept: :data:`LOADER_KEYS`, the keys in ``keep`` and, unless ``strip_all``, kohya's minimum keys
    (:data:`KOHYA_MINIMUM_KEYS`) and every ``modelspec.*`` key. Everything else is removed: every key
    the scan flags as training data (captions, tag frequencies, dataset folders, sample prompts, image
    counts, seeds, timestamps, comments, names) and every key it does not know.
    """
    wanted = set(LOADER_KEYS) | set(keep)
    kept: dict[str, str] = {}
    removed: list[str] = []
    for key, value in metadata.items():
        if key in wanted or (not strip_all and (key in KOHYA_MINIMUM_KEYS or key.startswith(MODELSPEC_PREFIX))):
            kept[key] = value
        else:
            removed.append(key)
    return kept, removed


def strip_file(
    src: str | Path, dst: str | Path, *, strip_all: bool = False, keep: Iterable[str] = (), overwrite: bool = False
) -> StripResult:
    """Write a copy of safetensors file ``src`` to ``dst`` with the metadata :func:`strip_plan` drops removed.

    The tensor entries of the header and the whole data section are copied unchanged, so every tensor
    is byte-identical. ``dst`` is written to a temporary file beside it and renamed, and validated
    before the rename. Refused (FormatError / InputError, nothing written): ``src`` a folder or a
    pickle, ``dst`` the same file as ``src``, ``dst`` an existing file without ``overwrite``, or a folder.
    """
    import os
    import struct

    from s2l_plugin._io import atomic_path
    from s2l_plugin.errors import FormatError, InputError
    from s2l_plugin.formats.detect import container_of, read_safetensors_header

    src, dst = Path(src), Path(dst)
    container = container_of(src)
    if container == "folder":
        raise InputError(f"--strip takes one checkpoint file; {str(src)!r} is a folder (strip each file in it)")
    if container == "pickle":
        raise FormatError(
            f"--strip writes safetensors copies of safetensors files only; {str(src)!r} is a pickle "
            "(.pt/.ckpt/.bin), whose fields are not metadata that can be removed safely"
        )
    if dst.exists() or dst.is_symlink():
        if dst.is_dir():
            raise InputError(f"--strip output {str(dst)!r} is a folder; expected a file path")
        if os.path.samefile(src, dst) or dst.resolve() == src.resolve():
            raise InputError(f"--strip output {str(dst)!r} is the input file; expected a new path (the input is never modified)")
        if not overwrite:
            raise InputError(f"--strip output {str(dst)!r} exists; pass --overwrite to replace it")
    elif dst.resolve() == src.resolve():
        raise InputError(f"--strip output {str(dst)!r} is the input file; expected a new path")
    header = read_safetensors_header(src)  # validates the input
    with open(src, "rb") as fh:
        fh.seek(8)
        raw_header = json.loads(fh.read(header.header_bytes).decode("utf-8"))
    kept, removed = strip_plan(header.metadata, strip_all=strip_all, keep=keep)
    raw_header.pop("__metadata__", None)
    new_header = ({"__metadata__": kept} if kept else {}) | raw_header
    text = json.dumps(new_header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with atomic_path(dst) as tmp:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            fout.write(struct.pack("<Q", len(text)))
            fout.write(text)
            fin.seek(8 + header.header_bytes)
            while block := fin.read(1 << 20):
                fout.write(block)
        out_header = read_safetensors_header(tmp)
        if out_header.tensors != header.tensors or out_header.data_bytes != header.data_bytes:
            raise FormatError(f"stripped copy of {str(src)!r} does not match its tensors; nothing written")
    from s2l_plugin.formats.detect import detect

    try:
        findings = scan_detected(detect(dst))
    except FormatError:  # a valid safetensors file of a kind detection does not know: scan its metadata alone
        findings = scan_metadata(kept)
    return StripResult(path=dst, kept=kept, removed=removed, findings=findings)


# -- batch scan (``s2l scan DIR``) -------------------------------------------------------------------

BASE_FAMILIES = (*FAMILY_NAMES, "unknown")
#: value prefixes of kohya's ``ss_base_model_version`` (sd-scripts: ``sd_v1``, ``sd_v2_768_v``, ``sdxl_base_v1-0``,
#: ``sd3``, ``flux1``) and of SAI ``modelspec.architecture`` (``stable-diffusion-xl-v1-base/lora``,
#: ``stable-diffusion-v3-medium``, ``flux-1-dev/lora``), first match wins
_METADATA_FAMILIES = {
    "ss_base_model_version": (("sdxl", "sdxl"), ("sd_v1", "sd"), ("sd_v2", "sd"), ("sd3", "sd3"), ("flux", "flux")),
    "modelspec.architecture": (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v1", "sd"), ("stable-diffusion-v2", "sd"),
                               ("stable-diffusion-v3", "sd3"), ("stable-diffusion-3", "sd3"), ("flux", "flux")),
}


def _family_from_metadata(metadata: dict[str, str]) -> str | None:
    """``sd`` / ``sdxl`` / ``sd3`` / ``flux`` from kohya's ``ss_base_model_version`` or SAI ``modelspec.architecture``;
    ``unknown`` when they name another family; None when neither is there."""
    for key, value in metadata.items():
        name, value = key.rsplit("/", 1)[-1], value.strip().lower()
        if name in _METADATA_FAMILIES and value:
            return next((family for prefix, family in _METADATA_FAMILIES[name] if value.startswith(prefix)), "unknown")
    return None


def _family_from_keys(keys: Iterable[str], shapes: dict[str, tuple[int, ...]]) -> str:
    from s2l_plugin.formats.detect import lora_family

    keys = list(keys)
    family = lora_family(keys, shapes)
    if family in ("flux", "sd3"):
        return family
    if family == "flow":  # an SD3 or Flux transformer LoRA whose keys do not tell which
        return "unknown"
    sdxl_marks = ("lora_te1_", "lora_te2_", "text_encoder_2", "conditioner.embedders", "lora_unet_input_blocks",
                  "lora_unet_output_blocks", "transformer_blocks.1.", "transformer_blocks_1_")
    if any(m in k for k in keys for m in sdxl_marks) or (keys and set(keys) <= {"clip_l", "clip_g"}):
        return "sdxl"
    sd_marks = ("lora_te_", "lora_unet_", "text_encoder.", "unet.", "cond_stage_model.", "model.diffusion_model.")
    if any(m in k for k in keys for m in sd_marks):
        return "sd"
    # An SD 1.x / 2.x embedding: one token tensor of CLIP ViT-L (768) or OpenCLIP ViT-H (1024) width.
    widths = {s[-1] for s in shapes.values() if s}
    return "sd" if widths and widths <= {768, 1024} else "unknown"


def base_family(found: Any) -> str:
    """``sd`` (SD 1.x / 2.x), ``sdxl``, ``sd3``, ``flux`` or ``unknown`` for a
    :class:`~s2l_plugin.formats.detect.DetectedFormat`: from its metadata (``ss_base_model_version``,
    ``modelspec.architecture``), a pipeline folder's ``model_index.json``, else its tensor key names
    (:func:`~s2l_plugin.formats.detect.lora_family`; a best guess: a UNet-only LoRA that shows no SDXL
    layer reads as ``sd``, a transformer LoRA that shows no Flux- or SD3-only layer as ``unknown``)."""
    from s2l_plugin.formats.detect import DIFFUSERS_PIPELINE

    if found.kind == DIFFUSERS_PIPELINE:
        from s2l_plugin.pipeline import PIPELINE_CLASSES

        index = _json_value((Path(found.path) / "model_index.json").read_text(encoding="utf-8", errors="replace"))
        name = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
        if name in PIPELINE_CLASSES:
            return PIPELINE_CLASSES[name]
        if "XL" in name:
            return "sdxl"
        return "sd" if name.startswith("StableDiffusion") else "unknown"
    for part in [found, *found.parts]:
        family = _family_from_metadata(part.metadata)
        if family is not None:
            return family
    shapes = found.extra.get("shapes") or {}
    if not shapes and isinstance(found.extra.get("object"), dict):
        obj = found.extra["object"]
        params = obj.get("string_to_param") if isinstance(obj.get("string_to_param"), dict) else obj.get("state_dict", obj)
        shapes = {str(k): tuple(getattr(v, "shape", ())) for k, v in params.items() if hasattr(v, "shape")}
    return _family_from_keys(found.keys, shapes)


@dataclasses.dataclass
class ScanRow:
    """One checkpoint of a batch scan: a file, or a folder loaded as one (a diffusers pipeline, a PEFT adapter).

    ``status`` is ``ok``, ``error`` (it could not be read; ``error`` says why, and a safetensors
    file whose header reads still has its metadata scanned) or ``skipped`` (a pickle without
    ``allow_pickle``). ``counts`` maps each severity to its number of findings.
    """

    file: str
    status: str
    format: str = ""
    base: str = "unknown"
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: {s: 0 for s in SEVERITIES})
    worst: str | None = None
    error: str = ""
    findings: list[MetadataFinding] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TreeScan:
    """The rows of :func:`scan_tree` and the most severe finding over all of them (None: no findings)."""

    root: str
    rows: list[ScanRow]
    worst: str | None

    def to_dict(self) -> dict[str, Any]:
        from s2l_plugin.result import to_dict

        return {"root": self.root, "worst": self.worst, "rows": to_dict(self.rows)}


#: the batch scan's CSV columns (one row per :class:`ScanRow`)
SCAN_CSV_COLUMNS = ("file", "status", "format", "base", *SEVERITIES, "worst", "error")


def _row(rel: str, status: str, found: Any = None, findings: list[MetadataFinding] | None = None, **kw: Any) -> ScanRow:
    findings = findings or []
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    fmt = kw.pop("format", "")
    if found is not None and not fmt:
        fmt = found.kind + (f" ({found.variant})" if found.variant else "")
    return ScanRow(file=rel, status=status, format=fmt, counts=counts, worst=worst_severity(findings),
                   findings=findings, **kw)


def _scan_one(path: Path, rel: str, allow_pickle: bool) -> ScanRow:
    from s2l_plugin.errors import FormatError
    from s2l_plugin.formats.detect import container_of, detect, read_safetensors_header

    try:
        container = container_of(path)
        if container == "pickle" and not allow_pickle:
            return _row(rel, "skipped", format="pickle", error="pickle (.pt/.ckpt/.bin): not read without --allow-pickle")
        found = detect(path, allow_pickle=allow_pickle)
        return _row(rel, "ok", found, scan_detected(found), base=base_family(found))
    except FormatError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one unreadable file is a row, never the end of the batch
        error = f"{type(exc).__name__}: {exc}"
    try:  # a valid safetensors file of a kind detection refuses: its metadata can still leak
        header = read_safetensors_header(path)
    except Exception:  # noqa: BLE001
        return _row(rel, "error", error=error)
    family = _family_from_metadata(header.metadata) or "unknown"
    return _row(rel, "error", findings=scan_metadata(header.metadata), format="safetensors (unrecognised)",
                base=family, error=error)


def scan_tree(root: str | Path, *, allow_pickle: bool = False) -> TreeScan:
    """Scan every checkpoint in the folder tree ``root``: one :class:`ScanRow` per checkpoint file
    (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``), or per folder that is loaded as one
    (a diffusers pipeline folder, with ``model_index.json``; a PEFT adapter folder, with
    ``adapter_config.json``), whose files are not listed again. Never raises for a file's content:
    an unreadable file is a row with its error. Symbolic links are not followed.
    """
    import os

    from s2l_plugin.formats.detect import CHECKPOINT_SUFFIXES

    root = Path(root)
    rows: list[ScanRow] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs.sort()
        rel_dir = here.relative_to(root).as_posix()
        if (here / "model_index.json").is_file() or (here / "adapter_config.json").is_file():
            dirs.clear()  # the folder is one checkpoint: its component files are part of it
            rows.append(_scan_one(here, rel_dir if rel_dir != "." else here.name, allow_pickle))
            continue
        for name in sorted(files):
            path = here / name
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES or path.is_symlink():
                continue
            rows.append(_scan_one(path, path.relative_to(root).as_posix(), allow_pickle))
    worst = worst_severity(f for row in rows for f in row.findings)
    return TreeScan(root=str(root), rows=rows, worst=worst)


def scan_tree_csv(scan: TreeScan) -> str:
    """The rows of a batch scan as CSV (:data:`SCAN_CSV_COLUMNS`)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SCAN_CSV_COLUMNS)
    for r in scan.rows:
        writer.writerow([r.file, r.status, r.format, r.base, *(r.counts[s] for s in SEVERITIES), r.worst or "", r.error])
    return buf.getvalue()
