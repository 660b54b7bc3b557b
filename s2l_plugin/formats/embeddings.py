"""Textual Inversion embedding files: diffusers ``learned_embeds`` ⇄ AUTOMATIC1111 ``.pt`` ⇄ kohya ``emb_params``.

The three layouts hold the same thing, a ``[num_vectors, dim]`` tensor for one trigger token:

- diffusers (``textual_inversion.py``): ``{token: tensor}`` in ``learned_embeds.safetensors``
  (or ``.bin``), safetensors metadata ``{"format": "pt"}``;
- AUTOMATIC1111: a ``torch.save`` dict ``{"string_to_token": {"*": 265}, "string_to_param":
  {"*": tensor}, "name": token, "step": int, "sd_checkpoint": ..., "sd_checkpoint_name": ...}``;
- kohya-ss ``train_textual_inversion.py``: ``{"emb_params": tensor}`` in a safetensors file (the
  token is the file name there, so reading one needs ``token=`` or falls back to the file stem).

The ``_convert_*`` functions are pure (dict in, dict out); :func:`read_embedding` /
:func:`write_embedding` add safe file I/O: ``.pt``/``.bin`` files are only read with
``torch.load(weights_only=True)`` and every write goes to a temporary file that is then renamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2l_plugin._io import atomic_path
from s2l_plugin.errors import FormatError, InputError

DIFFUSERS = "diffusers"
A1111 = "a1111"
KOHYA = "kohya"
EMBEDDING_FORMATS = (DIFFUSERS, A1111, KOHYA)

DIFFUSERS_WEIGHT_NAME = "learned_embeds.safetensors"
DIFFUSERS_WEIGHT_NAME_BIN = "learned_embeds.bin"
KOHYA_KEY = "emb_params"
#: A1111 writes this constant (CLIP's id of "*") in every file; it carries no information.
A1111_STAR_TOKEN_ID = 265
#: The keys A1111's ``Embedding.save`` writes.
A1111_KEYS = ("string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name")
#: Keys of SDXL embeddings: the vectors for the first (CLIP ViT-L) and the second (OpenCLIP bigG) text encoder.
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass
class Embedding:
    """One learned trigger token: ``vectors`` is a float tensor ``[num_vectors, dim]``.

    ``step`` is the training step it was saved at, when the file records one.
    """

    token: str
    vectors: Any
    step: int | None = None

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _as_matrix(tensor: Any, where: str) -> Any:
    """A detached, contiguous float copy shaped ``[n, dim]`` (1-D vectors become one row)."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise FormatError(f"{where}: expected a tensor, got {type(tensor).__name__}")
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] < 1:
        raise FormatError(f"{where}: expected an embedding of shape [num_vectors, dim], got {list(tensor.shape)}")
    if not tensor.is_floating_point():
        raise FormatError(f"{where}: expected a floating-point embedding, got dtype {tensor.dtype}")
    # clone(): a row slice of a text encoder's embedding matrix would otherwise save the whole matrix.
    return tensor.detach().to("cpu").clone().contiguous()


def detect_embedding_format(state: dict[str, Any]) -> str:
    """Which layout a loaded state dict has: ``"a1111"``, ``"kohya"`` or ``"diffusers"``; FormatError otherwise."""
    if not isinstance(state, dict):
        raise FormatError(f"an embedding file holds a dict; this one holds a {type(state).__name__}")
    if "string_to_param" in state:
        return A1111
    if set(state) == {"clip_l"}:
        # diffusers' advanced (pivotal-tuning) SD1.5 scripts: the vectors of several tokens whose names
        # (<s0>, <s1>, ...) the file does not store, so there is nothing to add them to the tokenizer as.
        raise FormatError(
            "embedding with the single key 'clip_l' (the diffusers advanced pivotal-tuning layout) stores no token "
            "names; expected one key per token "
            f"(diffusers), '{KOHYA_KEY}' (kohya) or 'string_to_param' (AUTOMATIC1111)"
        )
    if set(state) & set(SDXL_KEYS):
        raise FormatError(
            f"SDXL embedding (keys {sorted(set(state) & set(SDXL_KEYS))}) needs two text encoders; "
            "expected a single-text-encoder (SD1/SD2-style) embedding"
        )
    if list(state) == [KOHYA_KEY]:
        return KOHYA
    if len(state) == 1:
        return DIFFUSERS
    raise FormatError(
        f"unrecognised embedding layout with keys {sorted(map(str, state))[:8]}; expected one token key (diffusers), "
        f"'string_to_param' (AUTOMATIC1111) or '{KOHYA_KEY}' (kohya)"
    )


def _convert_diffusers_to_a1111(state: dict[str, Any], *, step: int = 0) -> dict[str, Any]:
    """``{token: [n, dim]}`` → the A1111 ``.pt`` dict (``name`` = the token)."""
    if len(state) != 1:
        raise FormatError(f"a diffusers embedding has exactly one key; got {len(state)}: {sorted(state)[:8]}")
    token, tensor = next(iter(state.items()))
    return {
        "string_to_token": {"*": A1111_STAR_TOKEN_ID},
        "string_to_param": {"*": _as_matrix(tensor, f"embedding {token!r}")},
        "name": str(token),
        "step": int(step),
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }


def _convert_a1111_to_diffusers(data: dict[str, Any], *, token: str | None = None) -> dict[str, Any]:
    """The A1111 ``.pt`` dict → ``{token: [n, dim]}``; ``token`` overrides the file's ``name``."""
    params = data.get("string_to_param")
    if not isinstance(params, dict) or len(params) != 1:
        raise FormatError(
            f"A1111 embedding: 'string_to_param' must map one placeholder to a tensor; got "
            f"{type(params).__name__} with {len(params) if isinstance(params, dict) else 0} entries"
        )
    name = token if token is not None else data.get("name")
    if not isinstance(name, str) or not name:
        raise FormatError(f"A1111 embedding has no usable 'name' ({name!r}); pass token=... to name it")
    return {name: _as_matrix(next(iter(params.values())), f"A1111 embedding {name!r}")}


def _convert_diffusers_to_kohya(state: dict[str, Any]) -> dict[str, Any]:
    """``{token: [n, dim]}`` → ``{"emb_params": [n, dim]}`` (kohya keeps the token in the file name)."""
    if len(state) != 1:
        raise FormatError(f"a diffusers embedding has exactly one key; got {len(state)}: {sorted(state)[:8]}")
    token, tensor = next(iter(state.items()))
    return {KOHYA_KEY: _as_matrix(tensor, f"embedding {token!r}")}


def _convert_kohya_to_diffusers(state: dict[str, Any], *, token: str) -> dict[str, Any]:
    """``{"emb_params": [n, dim]}`` → ``{token: [n, dim]}``."""
    if KOHYA_KEY not in state:
        raise FormatError(f"kohya embedding has no '{KOHYA_KEY}' key; keys are {sorted(state)[:8]}")
    return {token: _as_matrix(state[KOHYA_KEY], f"kohya embedding {token!r}")}


def _read_state(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """Tensors of a safetensors file, or the dict of a pickle (weights-only, only with ``allow_pickle``)."""
    from s2l_plugin.formats.detect import container_of, load_pickle, load_safetensors

    if not path.is_file():
        raise InputError(f"embedding file {str(path)!r} does not exist")
    if container_of(path) == "safetensors":
        return load_safetensors(path)
    return load_pickle(path, allow_pickle=allow_pickle)


def file_token(path: str | Path) -> str:
    """The trigger word a kohya/A1111 user types for embedding file ``path``: its name up to the first dot."""
    return Path(path).name.split(".")[0]


def resolve_embedding_file(path: str | Path) -> Path:
    """A file as is; a folder → its ``learned_embeds.safetensors`` (else ``.bin``); InputError when neither."""
    path = Path(path)
    if path.is_dir():
        for name in (DIFFUSERS_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME_BIN):
            if (path / name).is_file():
                return path / name
        raise InputError(f"folder {str(path)!r} holds no {DIFFUSERS_WEIGHT_NAME} or {DIFFUSERS_WEIGHT_NAME_BIN}")
    return path


def read_embedding(path: str | Path, *, token: str | None = None, allow_pickle: bool = False) -> tuple[Embedding, str]:
    """Read any of the three layouts; returns ``(embedding, format_name)``.

    A pickle (A1111 ``.pt``, ``learned_embeds.bin``) is refused unless ``allow_pickle``, and then
    read with ``torch.load(weights_only=True)`` only.
    ``token`` overrides the name stored in the file; a kohya file without ``token`` is named after
    its file stem (as kohya and A1111 do). ``path`` may be a folder holding ``learned_embeds.*``.
    """
    file = resolve_embedding_file(path)
    state = _read_state(file, allow_pickle)
    fmt = detect_embedding_format(state)
    step = None
    if fmt == A1111:
        converted = _convert_a1111_to_diffusers(state, token=token)
        step = state.get("step") if isinstance(state.get("step"), int) else None
    elif fmt == KOHYA:
        converted = _convert_kohya_to_diffusers(state, token=token or file_token(file))
    else:
        stored, tensor = next(iter(state.items()))
        converted = {token or stored: _as_matrix(tensor, f"embedding {stored!r} in {str(file)!r}")}
    name, vectors = next(iter(converted.items()))
    return Embedding(token=name, vectors=vectors, step=step), fmt


def embedding_state(embedding: Embedding, fmt: str) -> dict[str, Any]:
    """The state dict ``fmt`` stores for ``embedding`` (pure; see the module docstring for layouts)."""
    diffusers_state = {embedding.token: _as_matrix(embedding.vectors, f"embedding {embedding.token!r}")}
    if fmt == DIFFUSERS:
        return diffusers_state
    if fmt == A1111:
        return _convert_diffusers_to_a1111(diffusers_state, step=embedding.step or 0)
    if fmt == KOHYA:
        return _convert_diffusers_to_kohya(diffusers_state)
    raise FormatError(f"embedding format {fmt!r} is not known; expected one of: {', '.join(EMBEDDING_FORMATS)}")


def write_embedding(embedding: Embedding, path: str | Path, fmt: str = DIFFUSERS) -> Path:
    """Write ``embedding`` to ``path`` in layout ``fmt`` (atomically); returns ``path``.

    diffusers and kohya layouts are safetensors (diffusers' header gets ``{"format": "pt"}``);
    the A1111 layout is a ``torch.save`` ``.pt`` that loads with ``weights_only=True``.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    state = embedding_state(embedding, fmt)
    with atomic_path(path) as tmp:
        if fmt == A1111:
            torch.save(state, tmp)
        else:
            save_file(state, str(tmp), metadata={"format": "pt"})
    return path


def load_sdxl_embedding(pipe: Any, path: str | Path, *, allow_pickle: bool = False) -> str:
    """Add an SDXL embedding (``clip_l`` + ``clip_g``) to both text encoders of ``pipe``; returns the token.

    The token is the file name's stem, the word AUTOMATIC1111 and ComfyUI users type. As diffusers
    documents for SDXL, two ``load_textual_inversion`` calls: ``clip_l`` into ``text_encoder`` /
    ``tokenizer``, ``clip_g`` into ``text_encoder_2`` / ``tokenizer_2``. Both are checked first (keys,
    widths, a token not yet in either tokenizer), so a misfit is one FormatError and nothing is added.
    """
    path = Path(path)
    state = _read_state(path, allow_pickle)
    if set(state) != set(SDXL_KEYS):
        if set(state) == {"clip_l"}:
            detect_embedding_format(state)  # the pivotal-tuning layout: refused with its reason
        raise FormatError(f"SDXL embedding {str(path)!r} has keys {sorted(state)}; expected both 'clip_l' and 'clip_g'")
    if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
        raise FormatError(f"{str(path)!r} is an SDXL embedding (clip_l + clip_g); expected a base with two text encoders (SDXL)")
    token = file_token(path)
    pairs = ((state["clip_l"], pipe.text_encoder, pipe.tokenizer), (state["clip_g"], pipe.text_encoder_2, pipe.tokenizer_2))
    vectors = []
    for (tensor, encoder, tokenizer), key in zip(pairs, SDXL_KEYS, strict=True):
        emb = Embedding(token=token, vectors=_as_matrix(tensor, f"{str(path)!r} {key!r}"))
        check_embedding_width(emb, int(encoder.get_input_embeddings().weight.shape[1]), source=f"{str(path)} ({key})")
        vocab = tokenizer.get_vocab()
        if token in vocab or f"{token}_1" in vocab:
            raise FormatError(f"token {token!r} of embedding {str(path)!r} is already in the tokenizer; expected a new token (rename the file)")
        vectors.append(emb.vectors)
    if vectors[0].shape[0] != vectors[1].shape[0]:
        raise FormatError(f"SDXL embedding {str(path)!r} has {vectors[0].shape[0]} clip_l and {vectors[1].shape[0]} clip_g vectors; expected as many of each")
    for emb_vectors, (_, encoder, tokenizer) in zip(vectors, pairs, strict=True):
        pipe.load_textual_inversion(emb_vectors.to(encoder.dtype), token=token, text_encoder=encoder, tokenizer=tokenizer)
    return token


def check_embedding_width(embedding: Embedding, expected_dim: int, *, source: str = "embedding") -> None:
    """FormatError naming both widths when ``embedding`` does not fit a text encoder of width ``expected_dim``."""
    if embedding.dim != expected_dim:
        raise FormatError(
            f"{source}: embedding width {embedding.dim} does not match the base text encoder's "
            f"token-embedding width {expected_dim}"
        )
