"""Checkpoint format detection by content, and the only code that opens checkpoint bytes.

Nothing here trusts a file name: a ``.safetensors`` header is parsed and checked (header
length, JSON shape, dtypes, shapes, offsets that tile the data section exactly) before any
tensor is read; a pickle (``torch.save`` zip or legacy pickle) is refused unless the caller
opts in, and then read only with ``torch.load(weights_only=True)``, so no code from a
checkpoint ever runs. Every way a file can be malformed ends in one :class:`FormatError`.

The key patterns:

- diffusers LoRA: ``unet.<path>.lora.down.weight`` / ``lora_A`` (``text_encoder.`` too; ``transformer.`` for
  SD3 and Flux); XLabs' Flux layout (``double_blocks.0.processor.qkv_lora1.down.weight``) as variant ``xlabs``;
- kohya/A1111 LoRA: ``lora_unet_…`` / ``lora_te_…`` / ``lora_te1_…`` / ``lora_te2_…`` with
  ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``; LyCORIS variants keep the names and
  change the suffixes (``hada_*`` LoHa, ``lokr_*`` LoKr, ``lora_mid`` Tucker LoCon, ...); Flux's kohya LoRAs
  name the original BFL blocks (``lora_unet_double_blocks_0_img_attn_qkv``), :func:`lora_family` tells them apart;
  ComfyUI's Flux LoRAs (``diffusion_model.…lora_down.weight``, variant ``comfyui``) and kohya names of diffusers'
  Flux paths (``lora_transformer_…``) are kohya LoRAs too, converted by diffusers' Flux loader;
- single-file Stable Diffusion: ``model.diffusion_model.…`` (+ ``first_stage_model.``,
  ``cond_stage_model.``);
- Textual Inversion: one key = the token (diffusers), ``emb_params`` (kohya),
  ``string_to_param`` (A1111 ``.pt``), ``clip_l``/``clip_g`` (SDXL);
- A1111 hypernetwork: integer keys (context widths) → ``(k_state_dict, v_state_dict)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_plugin.errors import FormatError

# Format kinds (the values of DetectedFormat.kind).
DIFFUSERS_PIPELINE = "diffusers_pipeline"
PEFT_FOLDERS = "peft_folders"
SINGLE_FILE = "single_file_checkpoint"
DIFFUSERS_LORA = "diffusers_lora"
KOHYA_LORA = "kohya_lora"
TEXTUAL_INVERSION = "textual_inversion"
HYPERNETWORK = "hypernetwork"

KINDS = (DIFFUSERS_PIPELINE, PEFT_FOLDERS, SINGLE_FILE, DIFFUSERS_LORA, KOHYA_LORA, TEXTUAL_INVERSION, HYPERNETWORK)

#: bytes per element of every safetensors dtype this project reads
SAFETENSORS_DTYPES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E5M2": 1, "F8_E4M3": 1,
}
#: the safetensors library's own ceiling on the JSON header (100 MB)
MAX_HEADER_BYTES = 100_000_000

PICKLE_ZIP_MAGIC = b"PK\x03\x04"
# Legacy torch.save / plain pickle streams start with the PROTO opcode.
PICKLE_PROTO = 0x80

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
#: component prefixes of a diffusers-layout LoRA (``save_lora_weights``): UNet families, then the SD3 / Flux transformer
DIFFUSERS_LORA_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
#: a Flux LoRA in XLabs' layout (``double_blocks.0.processor.qkv_lora1.down.weight``), which diffusers' Flux loader converts
XLABS_FLUX_KEY = re.compile(r"(diffusion_model\.)?(double|single)_blocks\.\d+\.processor\.\w+\.(down|up)\.weight")
XLABS_VARIANT = "xlabs"
#: kohya names of Flux.1's original (BFL) blocks (sd-scripts ``networks/lora_flux.py``)
KOHYA_FLUX_MARKS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_img_in", "lora_unet_txt_in",
                    "lora_unet_time_in_", "lora_unet_vector_in_", "lora_unet_guidance_in_", "lora_unet_final_layer_")
#: kohya names of SD3's original (MMDiT) blocks (sd-scripts ``networks/lora_sd3.py``), which diffusers does not convert
KOHYA_SD3_MARKS = ("lora_unet_joint_blocks_",)
#: ComfyUI's Flux LoRA prefixes (kohya factor names under the model's own paths), which diffusers' Flux loader converts
COMFYUI_FLUX_PREFIXES = ("diffusion_model.", "text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer.")
#: kohya factor names under diffusers' Flux module paths (``lora_transformer_transformer_blocks_0_attn_to_q``), which
#: diffusers' Flux loader converts too
KOHYA_FLUX_DIFFUSERS_PREFIX = "lora_transformer_"
#: the full-size transformer widths (hidden size) of the flow families: Flux.1 3072; SD3 Medium 1536, SD3.5 Large 2432
_FLOW_WIDTHS = {3072: "flux", 1536: "sd3", 2432: "sd3"}
#: kohya/LyCORIS suffix → the variant it belongs to; plain LoRA/LoCon suffixes map to None
_PLAIN_LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
LOHA_VARIANT = "LyCORIS LoHa (hada_* keys)"
LOKR_VARIANT = "LyCORIS LoKr (lokr_* keys)"
DORA_VARIANT = "DoRA (dora_scale keys)"
#: the kohya-named variants the loaders apply (through peft's LoRA, DoRA, LoHa and LoKr layers); the
#: other LyCORIS algorithms below are detected and refused by name
LOADABLE_KOHYA_VARIANTS = ("kohya", LOHA_VARIANT, LOKR_VARIANT, DORA_VARIANT)
_LYCORIS_SUFFIX_VARIANTS: tuple[tuple[str, str], ...] = (
    ("hada_", LOHA_VARIANT),
    ("lokr_", LOKR_VARIANT),
    ("lora_mid.", "LyCORIS LoCon with Tucker decomposition (lora_mid keys)"),
    ("dora_scale", DORA_VARIANT),
    ("diff", "LyCORIS full fine-tune diff (diff/diff_b keys)"),
    ("oft_blocks", "LyCORIS OFT/BOFT (oft_blocks keys)"),
    ("oft_diag", "LyCORIS diag-OFT (oft_diag keys)"),
    ("rescale", "LyCORIS OFT/BOFT (rescale keys)"),
    ("a1.", "LyCORIS GLoRA (a1/a2/b1/b2 keys)"),
    ("a2.", "LyCORIS GLoRA (a1/a2/b1/b2 keys)"),
    ("b1.", "LyCORIS GLoRA (a1/a2/b1/b2 keys)"),
    ("b2.", "LyCORIS GLoRA (a1/a2/b1/b2 keys)"),
    ("on_input", "LyCORIS (IA)^3 (on_input keys)"),
    ("weight", "LyCORIS (IA)^3 (bare weight keys)"),
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header declares it (offsets relative to the data section)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class SafetensorsHeader:
    """A validated safetensors header: tensors by name and the str→str ``__metadata__``."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: int
    data_bytes: int


@dataclass
class DetectedFormat:
    """What a checkpoint path is, found from its content.

    ``container`` is ``"safetensors"``, ``"pickle"`` or ``"folder"``; ``keys`` the tensor keys
    (for folders: of the component files, prefixed by the component name); ``metadata`` the
    safetensors ``__metadata__`` (or the non-tensor entries of a pickle, as strings);
    ``components`` the sub-folders that carry weights (PEFT folders, pipeline folders);
    ``variant`` a format sub-type (``"diffusers"``, ``"a1111"``, ``"kohya"``, ``"peft"`` ...).

    A folder that holds several files to load together (a LoRA and Textual Inversion embeddings,
    as pivotal tuning publishes them) is detected as its LoRA file (or, without one, its first
    embedding), with the further files, each detected on its own, in ``parts``; files it saw and
    does not load are named in ``extra["ignored"]``. :func:`loaded_parts` lists all loaded files.
    """

    path: Path
    kind: str
    container: str
    keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    components: list[str] = field(default_factory=list)
    variant: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    parts: list[DetectedFormat] = field(default_factory=list)


# -- safetensors --------------------------------------------------------------------------------


def _fail(path: Path | str, what: str) -> FormatError:
    return FormatError(f"{str(path)!r} is not a valid checkpoint: {what}")


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header of safetensors file ``path`` without reading tensor data.

    Checks: the 8-byte little-endian header length fits in the file and under 100 MB; the
    header is a JSON object of ``name -> {dtype, shape, data_offsets}`` (plus an optional
    str→str ``__metadata__``); every dtype is known; each tensor's byte span equals
    ``prod(shape) * itemsize``; the spans tile the data section exactly, with no gap, overlap
    or byte past the end. Raises FormatError naming the first violation.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"file is {size} bytes; a safetensors file starts with an 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n < 2 or n > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {n} is outside 2..{MAX_HEADER_BYTES} bytes")
            if 8 + n > size:
                raise _fail(path, f"header length {n} runs past the end of the {size}-byte file (truncated?)")
            raw = fh.read(n)
    except OSError as exc:
        raise FormatError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"safetensors header is not UTF-8 JSON ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise _fail(path, f"safetensors header is a JSON {type(header).__name__}, expected an object")

    metadata: dict[str, str] = {}
    raw_meta = header.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()):
            raise _fail(path, "__metadata__ must map strings to strings")
        metadata = dict(raw_meta)

    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"tensor {name!r} entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise _fail(path, f"tensor {name!r} has dtype {dtype!r}; expected one of {', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(path, f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _fail(path, f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise _fail(
                path,
                f"tensor {name!r} declares shape {shape} {dtype} ({expected} bytes) but spans "
                f"{offsets[1] - offsets[0]} bytes",
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])

    cursor = 0
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if t.begin != cursor:
            what = "overlaps the previous tensor" if t.begin < cursor else f"leaves a gap at byte {cursor}"
            raise _fail(path, f"tensor {name!r} at data offset {t.begin} {what}")
        cursor = t.end
    if cursor != data_bytes:
        raise _fail(
            path,
            f"tensors cover {cursor} bytes but the data section has {data_bytes} "
            f"({'truncated file' if cursor > data_bytes else 'trailing bytes'})",
        )
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata, header_bytes=n, data_bytes=data_bytes)


def load_safetensors(path: str | Path, *, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """All tensors (or only ``keys``) of safetensors file ``path``, on CPU, after validating its header."""
    header = read_safetensors_header(path)
    from safetensors import SafetensorError, safe_open

    wanted = list(header.tensors) if keys is None else list(keys)
    out: dict[str, Any] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in wanted:
                out[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise _fail(path, f"safetensors could not read it ({exc})") from exc
    return out


# -- pickles ------------------------------------------------------------------------------------


def container_of(path: str | Path) -> str:
    """``"folder"``, ``"safetensors"`` or ``"pickle"`` from the first bytes (never the name); FormatError otherwise."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise FormatError(f"{str(path)!r} does not exist; expected a checkpoint file or folder")
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise FormatError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    # safetensors first: a header length of 128..255 bytes starts with 0x80, the pickle PROTO byte.
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(PICKLE_ZIP_MAGIC) or (head[:1] and head[0] == PICKLE_PROTO):
        return "pickle"
    raise _fail(path, "neither a safetensors file nor a torch.save/pickle file (unrecognised first bytes)")


def load_pickle(path: str | Path, *, allow_pickle: bool = False) -> dict[Any, Any]:
    """The dict stored in a ``torch.save`` file, read with ``torch.load(weights_only=True)``.

    Refused (FormatError) unless ``allow_pickle``: even the weights-only unpickler is attack
    surface, so the user opts in per call. A pickle holding anything but a dict, or one the
    weights-only unpickler rejects (it would need code to run), is a FormatError too.
    """
    path = Path(path)
    if not allow_pickle:
        raise FormatError(
            f"{str(path)!r} is a pickle (torch.save) file; pickles are refused by default -- pass "
            "--allow-pickle (allow_pickle=True) to read it with torch.load(weights_only=True), or convert it to safetensors"
        )
    import pickle
    import zipfile

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(path, f"the weights-only unpickler refused it ({first[:200]})") from exc
    except (RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError, OSError,
            zipfile.BadZipFile, UnicodeDecodeError, OverflowError, MemoryError, struct.error, AssertionError) as exc:
        # torch surfaces corrupt zips/pickles through many exception types; all mean "malformed".
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _fail(path, f"torch.load(weights_only=True) failed ({type(exc).__name__}: {msg[:200]})") from exc
    if not isinstance(obj, dict):
        raise _fail(path, f"the pickle holds a {type(obj).__name__}; expected a dict of tensors")
    return obj


# -- classification -----------------------------------------------------------------------------


def lycoris_variant(keys: Iterable[str]) -> str | None:
    """The non-plain-LoRA LyCORIS/DoRA variant a kohya-named key set uses, or None for plain LoRA/LoCon.

    Plain = only ``lora_down.weight``, ``lora_up.weight`` and ``alpha`` suffixes (LoCon conv
    layers use those too). Raises FormatError for a suffix no known variant uses.
    """
    for key in keys:
        if not key.startswith(KOHYA_PREFIXES):
            continue
        module, _, suffix = key.partition(".")
        if suffix in _PLAIN_LORA_SUFFIXES:
            continue
        for start, variant in _LYCORIS_SUFFIX_VARIANTS:
            if suffix.startswith(start):
                return variant
        raise FormatError(f"kohya-style key {key!r} has suffix {suffix!r}; expected lora_down.weight, lora_up.weight or alpha")
    return None


def lora_family(keys: Iterable[str], shapes: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """The model family a LoRA's tensor keys belong to: ``"flux"``, ``"sd3"``, ``"flow"`` (an SD3 or Flux
    transformer, the keys do not tell which), ``"sdxl"`` or ``"sd"``; None when the keys name no LoRA layout.

    Flux: kohya's BFL block names (``lora_unet_double_blocks_0_img_attn_qkv``), ComfyUI's
    (``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``), kohya names of diffusers' paths
    (``lora_transformer_…``), XLabs' layout, or diffusers keys with Flux-only modules (``transformer.single_transformer_blocks.``, ``x_embedder``, the guidance
    embedder). SD3: kohya's MMDiT names (``lora_unet_joint_blocks_``), or ``transformer.`` keys beside a
    second CLIP (``text_encoder_2.``) or SD3.5's second attention (``.attn2.``). Other ``transformer.``
    keys are told apart by the width of the layers they patch when it is a full-size model's (Flux.1
    3072, SD3 1536 / 2432), else ``"flow"``. UNet keys: ``"sdxl"`` for SDXL's second text encoder or SGM
    block names, else ``"sd"``. Text-encoder keys alone: None (the base decides).
    """
    keys = list(keys)
    shapes = shapes or {}
    comfy_flux = ("diffusion_model.double_blocks.", "diffusion_model.single_blocks.")
    if any(k.startswith(KOHYA_FLUX_MARKS + comfy_flux + (KOHYA_FLUX_DIFFUSERS_PREFIX,)) for k in keys) or (
        keys and all(XLABS_FLUX_KEY.fullmatch(k) for k in keys)
    ):
        return "flux"
    if any(k.startswith(KOHYA_SD3_MARKS) for k in keys):
        return "sd3"
    if any(k.startswith("transformer.") for k in keys):
        if any(k.startswith("transformer.") and (".single_transformer_blocks." in f".{k[12:]}" or ".x_embedder." in f".{k[12:]}"
               or ".guidance_embedder." in k) for k in keys):
            return "flux"
        if any(k.startswith("text_encoder_2.") or (k.startswith("transformer.") and ".attn2." in k) for k in keys):
            return "sd3"
        widths = {shapes[k][1] for k in keys if k in shapes and len(shapes[k]) == 2
                  and re.search(r"\.attn\.to_q\.(lora_A|lora\.down|lora_linear_layer\.down)\.weight$", k)}
        found = {_FLOW_WIDTHS[w] for w in widths if w in _FLOW_WIDTHS}
        return found.pop() if len(found) == 1 else "flow"
    if any(k.startswith(("lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for k in keys):
        return "sdxl"
    if any(k.startswith("unet.") for k in keys):
        return "sdxl" if any(k.startswith("text_encoder_2.") for k in keys) else "sd"
    if any(k.startswith("lora_unet_") for k in keys):
        return "sd"
    return None  # text-encoder layers alone (CLIP-L is in SD, SDXL, SD3 and Flux): the base decides


def _is_ti_tensor_dict(shapes: dict[str, tuple[int, ...]]) -> bool:
    if set(shapes) <= {"clip_l", "clip_g"} and shapes:
        return all(len(s) in (1, 2) for s in shapes.values())
    return len(shapes) == 1 and all(len(s) in (1, 2) for s in shapes.values())


def classify_keys(keys: Iterable[str], shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[str, str]:
    """``(kind, variant)`` for a flat tensor-key set (safetensors or a flattened pickle).

    Raises FormatError when the keys match no supported format.
    """
    keys = list(keys)
    shapes = shapes or {}
    if not keys:
        raise FormatError("checkpoint holds no tensors; expected LoRA, embedding, hypernetwork or model weights")
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return SINGLE_FILE, "ldm"
    if any(k.endswith(".lora_down.weight") for k in keys):
        if all(k.startswith(COMFYUI_FLUX_PREFIXES) for k in keys) and any(k.startswith("diffusion_model.") for k in keys):
            return KOHYA_LORA, "comfyui"
        if all(k.startswith(KOHYA_PREFIXES + (KOHYA_FLUX_DIFFUSERS_PREFIX,)) for k in keys) and any(
            k.startswith(KOHYA_FLUX_DIFFUSERS_PREFIX) for k in keys
        ):
            return KOHYA_LORA, lycoris_variant(keys) or "kohya"
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        # The variant names a LyCORIS algorithm that is not plain LoRA/LoCon (LOADABLE_KOHYA_VARIANTS are loaded).
        return KOHYA_LORA, lycoris_variant(keys) or "kohya"
    lora_markers = (".lora.down.", ".lora.up.", ".lora_A.", ".lora_B.", ".lora_linear_layer.")
    if all(k.startswith(DIFFUSERS_LORA_PREFIXES) for k in keys) and any(
        m in k for k in keys for m in lora_markers
    ):
        return DIFFUSERS_LORA, "diffusers"
    if all(XLABS_FLUX_KEY.fullmatch(k) for k in keys):
        return DIFFUSERS_LORA, XLABS_VARIANT
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        stray = next(k for k in keys if not k.startswith(KOHYA_PREFIXES))
        raise FormatError(f"kohya LoRA keys mixed with a non-kohya key {stray!r}; expected only lora_unet_/lora_te_ keys")
    if keys == ["emb_params"]:
        return TEXTUAL_INVERSION, "kohya"
    if shapes and _is_ti_tensor_dict({k: shapes[k] for k in keys}):
        return TEXTUAL_INVERSION, "sdxl" if set(keys) <= {"clip_l", "clip_g"} else "diffusers"
    if all(re.fullmatch(r"\d+\.(k|v)\.(linear\.\d+|linear[12])\.(weight|bias)", k) for k in keys):
        return HYPERNETWORK, "safetensors"
    sample = ", ".join(repr(k) for k in keys[:3])
    raise FormatError(
        f"unrecognised checkpoint keys ({sample}{', ...' if len(keys) > 3 else ''}); expected a diffusers or kohya LoRA, "
        "a single-file Stable Diffusion checkpoint, a Textual Inversion embedding or a hypernetwork"
    )


def classify_pickle(obj: dict[Any, Any]) -> tuple[str, str]:
    """``(kind, variant)`` for the dict a ``torch.save`` file holds (A1111 layouts or a plain state dict)."""
    import torch

    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, dict) or not params or not all(isinstance(v, torch.Tensor) for v in params.values()):
            raise FormatError("A1111 embedding: string_to_param must map token strings to tensors")
        return TEXTUAL_INVERSION, "a1111"
    int_keys = [k for k in obj if isinstance(k, int)]
    if int_keys:
        return HYPERNETWORK, "a1111"
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise FormatError(f"checkpoint 'state_dict' is a {type(state).__name__}; expected a dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return classify_keys(tensors, {k: tuple(v.shape) for k, v in tensors.items()})


def pickle_metadata(obj: dict[Any, Any]) -> dict[str, str]:
    """The non-tensor, non-weight entries of a pickled checkpoint as strings (for the metadata scan)."""
    import torch

    out: dict[str, str] = {}
    for k, v in obj.items():
        if isinstance(k, int) or isinstance(v, torch.Tensor) or k in ("state_dict", "string_to_param"):
            continue
        if k == "string_to_token" and isinstance(v, dict):
            out[str(k)] = json.dumps(sorted(str(t) for t in v))
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[str(k)] = "" if v is None else str(v)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[str(k)] = json.dumps(list(v))
    return out


def check_inside(root: Path, path: Path) -> Path:
    """``path`` resolved, or FormatError when it (through symlinks or ``..``) leaves folder ``root``."""
    try:
        root_r = root.resolve()
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a dangling link on some systems
        raise FormatError(f"{str(path)!r} cannot be resolved ({exc}); expected a regular file inside {str(root)!r}") from exc
    if real != root_r and root_r not in real.parents:
        raise FormatError(f"{str(path)!r} resolves to {str(real)!r}, outside the given folder {str(root)!r}")
    return real


PEFT_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "vae")
DIFFUSERS_LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
TI_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
LORA_KINDS = (DIFFUSERS_LORA, KOHYA_LORA)
#: Top-level files of a LoRA/embedding folder that are opened to find what they hold (by content
#: then); anything else there (README, images, json) is not a checkpoint and is left alone.
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def embedding_token(found: DetectedFormat) -> str | None:
    """The token a detected Textual Inversion file adds (None for other kinds). Same rule as
    :func:`~s2l_plugin.formats.embeddings.read_embedding`: diffusers = its one key, kohya and SDXL
    ``clip_l``/``clip_g`` = the file name's stem (as AUTOMATIC1111 and ComfyUI name them), A1111 = its ``name``."""
    if found.kind != TEXTUAL_INVERSION:
        return None
    if found.variant == "diffusers":
        return found.keys[0] if found.keys else None
    if found.variant in ("kohya", "sdxl"):
        from s2l_plugin.formats.embeddings import file_token

        return file_token(found.path)
    if found.variant == "a1111":
        return found.metadata.get("name") or None
    return None


def loaded_parts(found: DetectedFormat) -> list[dict[str, str | None]]:
    """What loading ``found`` applies: one ``{"file", "kind", "variant", "token"}`` per file, ``found`` first
    (the LoRA of a LoRA + embeddings folder), then ``found.parts`` (the loader adds the tokens before the LoRA).

    ``file`` is relative to the detected folder (the path as given for a single file); ``token``
    is the Textual Inversion token a file adds (None for other kinds). This is what ``s2l audit``
    reports as ``config["loaded"]``.
    """
    out: list[dict[str, str | None]] = []
    for part in [found, *found.parts]:
        folder = part.extra.get("folder")
        name = str(part.path)
        if folder is not None and Path(part.path).parent == Path(folder):
            name = Path(part.path).name
        out.append({"file": name, "kind": part.kind, "variant": part.variant, "token": embedding_token(part)})
    return out


def _names(files: Iterable[DetectedFormat | Path]) -> str:
    return ", ".join(repr((f.path if isinstance(f, DetectedFormat) else f).name) for f in files)


def _scan_top_level(
    path: Path, allow_pickle: bool, *, skip: tuple[str, ...] = (), tolerant: bool = False
) -> tuple[list[DetectedFormat], list[DetectedFormat], list[DetectedFormat], list[str]]:
    """``(loras, embeddings, others, ignored)``: the top-level checkpoint files of ``path``, detected by content.

    Of ``pytorch_lora_weights.*`` and ``learned_embeds.*`` only the first name present (``.safetensors``
    before ``.bin``) is read; the other is named in ``ignored``. A file that cannot be read (a
    pickle without ``allow_pickle``, malformed content) is a FormatError naming it, or, when
    ``tolerant``, a line in ``ignored`` saying why.
    """
    files = sorted(
        (p for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.name not in skip and p.is_file()),
        key=lambda p: p.name,
    )
    chosen = [next((path / n for n in names if (path / n).is_file()), None) for names in (DIFFUSERS_LORA_FILES, TI_FILES)]
    loras: list[DetectedFormat] = []
    embeddings: list[DetectedFormat] = []
    others: list[DetectedFormat] = []
    ignored: list[str] = []
    safetensors_stems = {f.stem for f in files if f.suffix.lower() == ".safetensors"}
    for file in files:
        if file.name in DIFFUSERS_LORA_FILES + TI_FILES and file not in chosen:
            used = chosen[0] if file.name in DIFFUSERS_LORA_FILES else chosen[1]
            ignored.append(f"{file.name} ({used.name} is used instead)")
            continue
        if file.suffix.lower() != ".safetensors" and file.stem in safetensors_stems:
            # Trainers publish a safetensors file and a pickled copy of it under one name (this package's
            # hypernetwork adapter writes <name>.safetensors and A1111's <name>.pt): the safe one is read.
            ignored.append(f"{file.name} ({file.stem}.safetensors is used instead)")
            continue
        check_inside(path, file)
        try:
            found = detect(file, allow_pickle=allow_pickle)
        except FormatError as exc:
            if tolerant:
                ignored.append(f"{file.name} (not read: {exc})")
                continue
            if file.name in str(exc):
                raise
            raise FormatError(f"{str(file)!r}: {exc}") from exc  # key-level messages do not name their file
        found.extra["folder"] = str(path)
        (loras if found.kind in LORA_KINDS else embeddings if found.kind == TEXTUAL_INVERSION else others).append(found)
    return loras, embeddings, others, ignored


def _ordered_embeddings(path: Path, embeddings: list[DetectedFormat]) -> list[DetectedFormat]:
    """``learned_embeds.*`` first, then by file name; FormatError when two files define the same token."""
    ordered = sorted(embeddings, key=lambda f: (f.path.name not in TI_FILES, f.path.name))
    tokens: dict[str, DetectedFormat] = {}
    for emb in ordered:
        token = embedding_token(emb)
        if token is None:
            continue
        if token in tokens:
            raise FormatError(
                f"folder {str(path)!r}: token {token!r} is defined by both {_names([tokens[token], emb])}; "
                "expected each embedding to add its own token"
            )
        tokens[token] = emb
    return ordered


def _detect_loras_and_embeddings(path: Path, allow_pickle: bool) -> DetectedFormat | None:
    """A folder of LoRA and Textual Inversion files, read by content: all its embeddings, and one LoRA;
    or a folder whose one checkpoint is a hypernetwork (returned as that file).

    ``pytorch_lora_weights.*`` / ``learned_embeds.*`` (the diffusers names, ``.safetensors`` before
    ``.bin``) keep their precedence: another LoRA file beside ``pytorch_lora_weights`` (the kohya
    export of the same weights) is ignored, and named in ``extra["ignored"]``. Without that file,
    two LoRA files are ambiguous (FormatError naming them), as is a token two embeddings both
    define, or a hypernetwork / model file beside them. A pickle is refused unless ``allow_pickle``.
    None when the folder has no checkpoint file.
    """
    loras, embeddings, others, ignored = _scan_top_level(path, allow_pickle)
    if not (loras or embeddings or others):
        return None
    if len(others) == 1 and not (loras or embeddings) and others[0].kind == HYPERNETWORK:
        # A hypernetwork's own folder (the file, maybe with its pickled twin and a training log).
        others[0].extra["ignored"] = ignored
        return others[0]
    if others:
        what = ", ".join(f"{f.path.name!r} ({f.kind})" for f in others)
        raise FormatError(
            f"folder {str(path)!r} holds {what} beside its other checkpoint files; expected only LoRA and Textual "
            "Inversion files in a folder (pass a hypernetwork or model file by itself)"
        )
    known = next((f for f in loras if f.path.name in DIFFUSERS_LORA_FILES), None)
    if known is not None:
        ignored += [f"{f.path.name} (a second LoRA file; {known.path.name} is used)" for f in loras if f is not known]
        loras = [known]
    if len(loras) > 1:
        raise FormatError(
            f"folder {str(path)!r} holds {len(loras)} LoRA files ({_names(loras)}); expected one LoRA "
            "(pass the file to audit itself)"
        )
    ordered = loras + _ordered_embeddings(path, embeddings)
    primary = ordered[0]
    primary.parts = ordered[1:]
    primary.extra["ignored"] = ignored
    return primary


def _detect_folder(path: Path, allow_pickle: bool) -> DetectedFormat:
    if (path / "model_index.json").is_file():
        check_inside(path, path / "model_index.json")
        comps = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
        return DetectedFormat(path=path, kind=DIFFUSERS_PIPELINE, container="folder", components=comps, variant="diffusers")
    peft = [c for c in PEFT_COMPONENTS if (path / c / "adapter_config.json").is_file()]
    if (path / "adapter_config.json").is_file():
        peft = ["."] + peft
    if peft:
        keys: list[str] = []
        metadata: dict[str, str] = {}
        for comp in peft:
            weights = path / comp / "adapter_model.safetensors"
            if not weights.is_file():
                raise FormatError(f"PEFT folder {str(path / comp)!r} has adapter_config.json but no adapter_model.safetensors")
            check_inside(path, weights)
            check_inside(path, path / comp / "adapter_config.json")
            header = read_safetensors_header(weights)
            keys += [f"{comp}/{k}" for k in header.tensors]
            metadata.update({f"{comp}/{k}": v for k, v in header.metadata.items()})
        found = DetectedFormat(path=path, kind=PEFT_FOLDERS, container="folder", keys=keys, metadata=metadata,
                               components=peft, variant="peft")
        # Embeddings beside the adapter folders are loaded with them (pivotal tuning saved with peft). Anything
        # else there stays unread, as before, but is named (trainers leave e.g. a pickled training_args.bin).
        loras, embeddings, others, ignored = _scan_top_level(
            path, allow_pickle, skip=("adapter_model.safetensors",) if "." in peft else (), tolerant=True)
        ignored += [f"{f.path.name} ({f.kind}; the PEFT adapter folders are loaded)" for f in loras + others]
        found.parts = _ordered_embeddings(path, embeddings)
        found.extra["ignored"] = ignored
        return found
    found = _detect_loras_and_embeddings(path, allow_pickle)
    if found is not None:
        return found
    raise FormatError(
        f"folder {str(path)!r} holds no model_index.json, adapter_config.json or LoRA / embedding file "
        f"({', '.join(CHECKPOINT_SUFFIXES)}); expected a diffusers pipeline, a PEFT adapter folder or a LoRA/embedding folder"
    )


def detect(path: str | Path, *, allow_pickle: bool = False) -> DetectedFormat:
    """Detect the checkpoint format of a file or folder from its content; FormatError when unsupported.

    Safetensors files are classified from their validated header alone (no tensor data read).
    Pickles are refused unless ``allow_pickle`` (then read weights-only).
    """
    path = Path(path)
    container = container_of(path)
    if container == "folder":
        return _detect_folder(path, allow_pickle)
    if container == "safetensors":
        header = read_safetensors_header(path)
        shapes = {k: t.shape for k, t in header.tensors.items()}
        kind, variant = classify_keys(header.tensors, shapes)
        return DetectedFormat(path=path, kind=kind, container=container, keys=list(header.tensors),
                              metadata=header.metadata, variant=variant, extra={"shapes": shapes})
    obj = load_pickle(path, allow_pickle=allow_pickle)
    kind, variant = classify_pickle(obj)
    keys = [str(k) for k in obj if not isinstance(k, int)] if kind in (TEXTUAL_INVERSION, HYPERNETWORK) else [
        k for k in obj.get("state_dict", obj) if isinstance(k, str)
    ]
    return DetectedFormat(path=path, kind=kind, container=container, keys=keys, metadata=pickle_metadata(obj),
                          variant=variant, extra={"object": obj})


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, or of a folder's files in sorted relative-path order."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            digest.update(os.fsencode(f.relative_to(path).as_posix()) + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()
