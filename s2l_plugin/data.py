"""Reading image folders the way the trainers and auditors need them.

One reader for every layout this project writes or reads: a plain folder of images
(DreamBooth / Textual Inversion), an imagefolder with ``metadata.jsonl`` (``file_name`` plus a
caption column), sidecar ``.txt`` captions, and kohya ``<repeats>_<name>/`` subfolders.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2l_plugin.errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_COLUMNS = ("text", "caption", "prompt")
# Files that may sit beside images without being images.
SIDECARS = ("metadata.jsonl", ".txt", ".caption", ".json", ".toml")


@dataclass(frozen=True)
class ImageRecord:
    """One image on disk and its caption (None when the folder gives none)."""

    path: Path
    caption: str | None = None


def _metadata_captions(folder: Path) -> dict[str, str]:
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        return {}
    captions: dict[str, str] = {}
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{meta}:{lineno}: not valid JSON ({exc.msg}); expected one JSON object per line") from exc
        if "file_name" not in row:
            raise InputError(f"{meta}:{lineno}: no 'file_name' key; expected file_name and a caption column")
        for col in CAPTION_COLUMNS:
            if col in row:
                captions[str(row["file_name"])] = str(row[col])
                break
    return captions


def list_image_folder(folder: str | Path, *, caption: str | None = None, recursive: bool = False) -> list[ImageRecord]:
    """Images in ``folder`` (sorted by path) with their captions.

    Caption precedence: ``metadata.jsonl`` row, then a sidecar ``<stem>.txt``, then ``caption``.
    ``recursive`` also reads subfolders (the kohya ``<repeats>_<name>/`` layout).
    Raises InputError when the folder is missing or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {str(folder)!r} does not exist or is not a folder")
    dirs = sorted([folder, *[p for p in folder.rglob("*") if p.is_dir()]]) if recursive else [folder]
    records: list[ImageRecord] = []
    for d in dirs:
        meta = _metadata_captions(d)
        for path in sorted(d.iterdir()):
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            text = meta.get(path.name)
            if text is None:
                side = path.with_suffix(".txt")
                text = side.read_text(encoding="utf-8").strip() if side.exists() else caption
            records.append(ImageRecord(path=path, caption=text))
    if not records:
        raise InputError(f"image folder {str(folder)!r} holds no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return records


def open_image(path: Path) -> Any:
    """Open an image as RGB; InputError naming the file when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{str(path)!r} is not a readable image ({exc})") from exc


def image_to_tensor(image: Any, resolution: int, *, center_crop: bool = True) -> Any:
    """A PIL image as a float tensor [3, resolution, resolution] in [-1, 1] (resize shorter side, then crop)."""
    import numpy as np
    import torch
    from PIL import Image

    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left = (w - resolution) // 2 if center_crop else 0
        top = (h - resolution) // 2 if center_crop else 0
        image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_images(records: Sequence[ImageRecord], resolution: int, *, center_crop: bool = True) -> Any:
    """All images as one tensor [N, 3, R, R] in [-1, 1]; logs one note when any image was resized."""
    import torch

    return torch.stack(list(_tensors(records, resolution, center_crop)))


def _tensors(records: Sequence[ImageRecord], resolution: int, center_crop: bool) -> Iterator[Any]:
    noted = False
    for rec in records:
        image = open_image(rec.path)
        if image.size != (resolution, resolution) and not noted:
            log.warning("resizing images to %dx%d (first: %s is %dx%d)", resolution, resolution, rec.path, *image.size)
            noted = True
        yield image_to_tensor(image, resolution, center_crop=center_crop)


def iter_image_batches(
    records: Sequence[ImageRecord], batch_size: int, resolution: int, *, center_crop: bool = True
) -> Iterator[tuple[Any, list[str | None]]]:
    """Stream ``(images [B,3,R,R] in [-1,1], captions)`` batches; memory does not grow with len(records)."""
    import torch

    gen = _tensors(records, resolution, center_crop)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        yield torch.stack([next(gen) for _ in chunk]), [r.caption for r in chunk]
