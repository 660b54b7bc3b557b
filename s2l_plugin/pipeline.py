"""Loading the base text-to-image pipeline every stage works on, from local files only.

``load_pipeline(None)`` (or ``"testbed"``) is the shipped demo testbed; a folder is a diffusers
Stable Diffusion (1.x / 2.x), Stable Diffusion XL, Stable Diffusion 3 or Flux pipeline folder. Nothing here reaches a model hub.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s2l_plugin.errors import FormatError, InputError

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


#: The pipeline classes a folder's model_index.json may name (``_class_name``), and the model family of each.
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
#: The families of :data:`PIPELINE_CLASSES` in words, for messages.
FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL", "sd3": "Stable Diffusion 3", "flux": "Flux"}


def model_family(model: Any = None) -> str:
    """``"sd"`` (Stable Diffusion 1.x/2.x), ``"sdxl"``, ``"sd3"`` or ``"flux"`` for a loaded pipeline, a
    pipeline folder, a single-file checkpoint or None / "testbed", read without loading any weights
    (a folder's model_index.json ``_class_name``; a file's key names, :func:`single_file_family`)."""
    if model is not None and not isinstance(model, (str, Path)):
        from s2l_plugin.conditioning import pipeline_family

        return pipeline_family(model)
    if model is not None and model != TESTBED_MODEL and Path(model).is_file():
        return single_file_family(model)
    return folder_family(resolve_model_dir(model)) or "sd"


def folder_family(folder: str | Path) -> str | None:
    """The model family a pipeline folder's model_index.json names (:data:`PIPELINE_CLASSES`), or None
    when it has none, cannot be read, or names another class."""
    try:
        cls = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return PIPELINE_CLASSES.get(cls)


#: The libraries a pipeline folder's components may name: any other would import code from the checkpoint.
ALLOWED_LIBRARIES = {"diffusers", "transformers", None}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def check_pipeline_folder(folder: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Validate a diffusers pipeline folder before diffusers opens it; returns its model_index.json.

    No component may name a library other than diffusers/transformers (a custom library or
    ``custom_pipeline`` code would run), no file may be Python code or resolve outside the folder,
    and the weights must be safetensors unless ``allow_pickle``. FormatError (exit 2) otherwise.
    """
    from s2l_plugin.formats.detect import check_inside, read_safetensors_header

    index_path = folder / "model_index.json"
    check_inside(folder, index_path)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{str(index_path)!r} is not valid JSON ({exc})") from exc
    if not isinstance(index, dict):
        raise FormatError(f"{str(index_path)!r} holds a {type(index).__name__}; expected a JSON object")
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise FormatError(
            f"pipeline folder {str(folder)!r} holds a {cls!r}; expected one of {', '.join(PIPELINE_CLASSES)} (model_index.json _class_name)"
        )
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and value[0] not in ALLOWED_LIBRARIES:
            raise FormatError(
                f"pipeline component {name!r} names library {value[0]!r}; expected diffusers or transformers "
                "(other libraries could run code from the checkpoint)"
            )
    files = [f for f in folder.rglob("*")]
    for file in files:
        check_inside(folder, file)
        if file.suffix == ".py":
            raise FormatError(f"pipeline folder {str(folder)!r} contains code ({file.name}); code from a checkpoint is never run")
    # A component diffusers loads (one named in model_index.json) whose weights are only pickles, as
    # diffusers writes them with safe_serialization=False. Other folders are never opened by the loader.
    components = {folder / name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)}
    safe = {f.parent for f in files if f.suffix == ".safetensors" and f.is_file()}
    pickled = sorted({f.parent for f in files if f.suffix in PICKLE_SUFFIXES and f.is_file() and f.parent in components} - safe)
    if pickled and not allow_pickle:
        names = ", ".join(p.relative_to(folder).as_posix() or "." for p in pickled)
        raise FormatError(
            f"pipeline folder {str(folder)!r} holds only pickled weights for {names}; pass --allow-pickle to read them weights-only"
        )
    for file in files:
        if file.suffix == ".safetensors":
            read_safetensors_header(file)  # a lying header fails here, with the file's name
    return index


#: The key prefix of SDXL's text encoders in the original (SGM) single-file layout; SD 1.x/2.x use ``cond_stage_model.``.
SDXL_SINGLE_FILE_PREFIX = "conditioner.embedders."


def _single_file_keys(path: Path, allow_pickle: bool) -> tuple[list[str], dict[str, Any] | None]:
    """A single-file checkpoint's tensor names, and for a pickle its weights-only tensors (None for safetensors)."""
    from s2l_plugin.formats.detect import container_of, load_pickle, read_safetensors_header

    if container_of(path) == "safetensors":
        return list(read_safetensors_header(path).tensors), None
    obj = load_pickle(path, allow_pickle=allow_pickle)
    state = obj.get("state_dict", obj)
    import torch

    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return list(tensors), tensors


#: key prefixes of the flow families' original single-file layouts: SD3's MMDiT (``model.diffusion_model.joint_blocks.``)
#: and Flux.1's BFL transformer (``double_blocks.``, bare or under ``model.diffusion_model.``)
FLOW_SINGLE_FILE_PREFIXES = {"sd3": ("model.diffusion_model.joint_blocks.",),
                             "flux": ("double_blocks.", "model.diffusion_model.double_blocks.")}


def _keys_family(keys: list[str]) -> str:
    for family, prefixes in FLOW_SINGLE_FILE_PREFIXES.items():
        if any(k.startswith(prefixes) for k in keys):
            return family
    return "sdxl" if any(k.startswith(SDXL_SINGLE_FILE_PREFIX) for k in keys) else "sd"


def single_file_family(path: str | Path, *, allow_pickle: bool = False) -> str:
    """``"sd3"`` / ``"flux"`` for a single file in SD3's / Flux.1's original layout (:data:`FLOW_SINGLE_FILE_PREFIXES`),
    ``"sdxl"`` when it holds SDXL's text encoders (``conditioner.embedders.*``), else ``"sd"``."""
    keys, _ = _single_file_keys(Path(path), allow_pickle)
    return _keys_family(keys)


def check_single_file(path: str | Path, config: str | Path | None, *, allow_pickle: bool = False) -> tuple[Path, str, dict[str, Any] | None]:
    """What :func:`load_single_file` checks before converting, cheap enough to run before any work:
    a config folder is given and safe (:func:`check_pipeline_folder`), and it is of the file's family.
    Returns ``(config folder, pipeline class name, a pickle's tensors or None)``."""
    path = Path(path)
    if config is None:
        raise InputError(
            f"model {str(path)!r} is a single-file checkpoint; expected a config folder with it (--base-config / "
            "--model-config DIR, base_config in a run config): a local diffusers pipeline folder of the same model family"
        )
    folder = resolve_model_dir(config)
    index = check_pipeline_folder(folder, allow_pickle)
    cls_name = index["_class_name"]
    keys, tensors = _single_file_keys(path, allow_pickle)
    family = _keys_family(keys)
    if family in ("sd3", "flux"):
        # diffusers converts these (from_single_file), but only from the original layout: no tiny file of it can be
        # written by diffusers' own code to test the conversion against, so they are not taken yet.
        raise FormatError(
            f"{str(path)!r} is a single-file {FAMILY_NAMES[family]} checkpoint (original layout); single-file SD3 and Flux "
            "bases are not supported yet -- expected a diffusers pipeline folder (e.g. from FluxPipeline / "
            "StableDiffusion3Pipeline.from_single_file(...).save_pretrained(DIR))"
        )
    if family != PIPELINE_CLASSES[cls_name]:
        raise FormatError(
            f"{str(path)!r} is a{'n SDXL' if family == 'sdxl' else ' Stable Diffusion 1.x/2.x'} single-file checkpoint but "
            f"config folder {str(folder)!r} holds a {cls_name}; expected a config folder of the same model family"
        )
    return folder, cls_name, tensors


def load_single_file(path: str | Path, config: str | Path | None, *, allow_pickle: bool = False, dtype: Any = None) -> Any:
    """A single-file checkpoint in the original layout (as AUTOMATIC1111, ComfyUI and kohya share them),
    converted by diffusers' ``from_single_file`` with a local config folder; nothing is downloaded.

    ``config``: a diffusers pipeline folder of the same model family (checked as
    :func:`check_pipeline_folder` checks a base); its ``_class_name`` picks the pipeline class and
    its component configs and tokenizers are read. A pickle (``.ckpt``) needs ``allow_pickle`` and
    is read weights-only, then handed to diffusers as safetensors. InputError without a config;
    FormatError for a family mismatch, a file diffusers cannot convert, or one that leaves any
    weight of the pipeline unset.
    """
    import tempfile

    path = Path(path)
    folder, cls_name, tensors = check_single_file(path, config, allow_pickle=allow_pickle)
    import diffusers

    kwargs: dict[str, Any] = {"config": str(folder), "local_files_only": True}
    if cls_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    with tempfile.TemporaryDirectory(prefix="s2l-single-") as tmp:
        source = path
        if tensors is not None:
            # The weights-only tensors re-saved as safetensors, so diffusers never unpickles the file itself.
            from safetensors.torch import save_file

            source = Path(tmp) / "checkpoint.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(source))
        try:
            pipe = getattr(diffusers, cls_name).from_single_file(str(source), **kwargs)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FormatError(f"{str(path)!r} could not be converted as a single-file {cls_name} checkpoint: {msg[:300]}") from exc
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        unset = [k for k, v in (module.state_dict().items() if module is not None else ()) if v.is_meta]
        if unset:
            raise FormatError(f"{str(path)!r} does not hold every weight of the {cls_name}: {name}.{unset[0]} is not in the file")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(
    model: str | Path | None = None, *, device: str | None = None, dtype: Any = None, allow_pickle: bool = False,
    config: str | Path | None = None,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion (1.x/2.x, XL, 3) or Flux pipeline from local files, without a safety
    checker: the one loader of every base model a command opens.

    The class is the folder's ``_class_name`` (:data:`PIPELINE_CLASSES`: StableDiffusionPipeline,
    StableDiffusionXLPipeline, StableDiffusion3Pipeline or FluxPipeline); others are refused. A single-file checkpoint ``model`` is converted
    with ``config`` as its config folder (:func:`load_single_file`).

    ``model``: None or "testbed" (the shipped demo testbed) or a diffusers pipeline folder, checked
    by :func:`check_pipeline_folder` first (no custom code; safetensors weights unless
    ``allow_pickle``, then pickled weights are read weights-only). ``device`` (e.g. "cpu", "cuda")
    and ``dtype`` (a torch dtype) are applied after loading. InputError for a missing folder,
    FormatError for an unsafe or unreadable one.
    """
    if model is not None and model != TESTBED_MODEL and Path(model).is_file():
        pipe = load_single_file(model, config, allow_pickle=allow_pickle, dtype=dtype)
        return pipe.to(device) if device is not None else pipe
    path = resolve_model_dir(model)
    index = check_pipeline_folder(path, allow_pickle)
    import diffusers

    cls_name = index["_class_name"]
    # Without the opt-in only safetensors are read; with it diffusers takes safetensors where a component has
    # them and reads the other components' pickles weights-only.
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": None if allow_pickle else True}
    if cls_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        pipe = getattr(diffusers, cls_name).from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FormatError(f"model {str(model)!r} could not be loaded as a {cls_name}: {msg[:300]}") from exc
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
