"""Loading the base text-to-image pipeline every stage works on, from local files only.

``load_pipeline(None)`` (or ``"testbed"``) is the shipped demo testbed; a folder is a diffusers
StableDiffusionPipeline folder. Nothing here reaches a model hub.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s2l_plugin.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionPipeline

#: The name that means "the embedded testbed" wherever a model is asked for.
TESTBED_MODEL = "testbed"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def resolve_model_dir(model: str | Path | None = None) -> Path:
    """The pipeline folder ``model`` names: None / "testbed" = the shipped demo testbed's pipeline folder.

    Raises InputError when the folder is missing or is not a diffusers pipeline folder.
    """
    if model is None or (isinstance(model, str) and model == TESTBED_MODEL):
        from s2l_plugin.testbed.layout import Testbed

        return Testbed.load().pipeline_dir
    path = Path(model)
    if not path.exists():
        raise InputError(
            f"model {str(model)!r} does not exist; expected a local diffusers pipeline folder or {TESTBED_MODEL!r} (no hub downloads)"
        )
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise InputError(f"model {str(model)!r} is not a diffusers pipeline folder; expected a folder with model_index.json")
    return path


def load_pipeline(
    model: str | Path | None = None, *, device: str | None = None, dtype: Any = None
) -> StableDiffusionPipeline:
    """Load a StableDiffusionPipeline from local files, without a safety checker.

    ``model``: None or "testbed" (the shipped demo testbed) or a diffusers pipeline folder.
    ``device`` (e.g. "cpu", "cuda"), ``dtype`` (a torch dtype) are applied after loading.
    """
    path = resolve_model_dir(model)
    from diffusers import StableDiffusionPipeline

    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False, "local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"model {str(model)!r} could not be loaded as a StableDiffusionPipeline: {exc}") from exc
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def pipeline_hash(path: str | Path) -> str:
    """A stable 16-hex-digit SHA-256 over the weight files under ``path`` (relative names + bytes).

    Configs are left out (they carry library versions), so the hash names the weights only.
    A single weight file is hashed on its own.
    """
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    else:
        raise InputError(f"cannot hash {str(path)!r}: no such file or folder")
    if not files:
        raise InputError(f"cannot hash {str(path)!r}: it holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for f in files:
        digest.update((f.name if f == root else f.relative_to(root).as_posix()).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
