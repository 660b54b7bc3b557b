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
    "ss_epoch": "epochs",
    "ss_steps": "steps",
}
_INFO_KEYS = {
    "ss_sd_model_name": "base model the network was trained on",
    "ss_sd_model_hash": "base model hash",
    "ss_new_sd_model_hash": "base model hash",
    "ss_vae_name": "VAE used in training",
    "ss_base_model_version": "base model family",
    "ss_network_module": "network module",
    "ss_output_name": "output name chosen by the trainer",
    "sshs_model_hash": "additional-networks model hash",
    "modelspec.title": "model title",
    "modelspec.author": "model author",
    "modelspec.description": "model description",
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
