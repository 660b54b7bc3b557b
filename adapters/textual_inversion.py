"""Textual Inversion: learn new token embeddings; nothing else in the model changes.

As diffusers' ``examples/textual_inversion/textual_inversion.py``: placeholder tokens ``tok``,
``tok_1``, … (``num_vectors`` of them) are added to the tokenizer, their embedding rows start as a
copy of the initializer token's row, the whole token-embedding matrix is handed to the optimizer
and every other row is restored after each optimizer step (the script's ``index_no_updates``),
so only the new rows change. Captions come from the object or style templates with the
placeholder filled in (one template per image, drawn from the config seed).

Artifact: ``learned_embeds.safetensors`` (one key = the token, ``[num_vectors, dim]``), which
``pipe.load_textual_inversion(folder)`` loads, plus exports in the A1111 ``.pt`` layout
(``a1111/<name>.pt``) and the kohya ``emb_params`` layout (``kohya/<name>.safetensors``), named
so that both tools take the file stem as the trigger word.

The initializer must be *one* token of the base tokenizer. With a character-level tokenizer (the
testbed's), that means one character: ``"7"`` is the single token ``7</w>`` while ``"seven"`` is
five tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2l_plugin.hooks import hookimpl

from s2l_plugin.config import check_choice, check_positive
from s2l_plugin.data import list_image_folder
from s2l_plugin.errors import ConfigError, FormatError
from s2l_plugin.formats.embeddings import (
    A1111,
    DIFFUSERS_WEIGHT_NAME,
    DIFFUSERS_WEIGHT_NAME_BIN,
    KOHYA,
    Embedding,
    check_embedding_width,
    read_embedding,
    write_embedding,
)

from .base import (
    Adapter,
    Artifact,
    TrainConfig,
    check_output_dir,
    list_files,
    publish,
    resolve_base,
    staging_dir,
)
from .dreambooth import write_training_record

# The caption templates of diffusers' textual_inversion.py ("{}" = the placeholder).
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
)
LEARNABLE_PROPERTIES = ("object", "style")
EXPORT_FORMATS = (A1111, KOHYA)
DIFFUSERS_SCRIPT = "textual_inversion"  # the script kind: examples/textual_inversion/textual_inversion.py

TI_OPTIONS: dict[str, Any] = {
    "placeholder_token": "<s2l>",
    "initializer_token": "*",  # A1111's default initialisation text
    "num_vectors": 1,
    "learnable_property": "object",
    "templates": None,  # a list of strings with "{}" overrides the property's templates
    "export": [A1111, KOHYA],
}


# -- token set-up, row restoring, captions (shared with the combinations) ---------------------------


def restore_dtypes(pipe: Any, dtypes: dict[str, Any]) -> None:
    """Cast ``pipe``'s components back to ``dtypes`` (``{"unet": torch.float32, ...}``, read before training).

    The training loop runs frozen components in the mixed-precision dtype and leaves them so; a
    pipeline with a bf16 UNet and an fp32 text encoder cannot generate. The round trip through bf16
    is lossy for those frozen weights (the artifact itself is unaffected).
    """
    for name, dtype in dtypes.items():
        module = getattr(pipe, name)
        if module.dtype != dtype:
            module.to(dtype=dtype)


def component_dtypes(pipe: Any) -> dict[str, Any]:
    """The dtypes of ``pipe``'s UNet, text encoder and VAE, for :func:`restore_dtypes`."""
    return {name: getattr(pipe, name).dtype for name in ("unet", "text_encoder", "vae")}


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """``[tok, tok_1, …, tok_{n-1}]``: the tokens diffusers uses for an ``n``-vector embedding."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def check_ti_options(options: dict[str, Any]) -> None:
    """ConfigError naming the first invalid Textual Inversion option."""
    token = options["placeholder_token"]
    if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token):
        raise ConfigError(f"placeholder_token={token!r} is not valid; expected a non-empty string without spaces, e.g. '<s2l>'")
    init = options["initializer_token"]
    if isinstance(init, int) and not isinstance(init, bool) and init >= 0:
        # `--option initializer_token=7` arrives JSON-decoded as a number; its digits are the token meant
        init = options["initializer_token"] = str(init)
    if not isinstance(init, str) or not init.strip():
        raise ConfigError(f"initializer_token={init!r} is not valid; expected one token of the base tokenizer")
    check_positive("num_vectors", options["num_vectors"], integer=True)
    check_choice("learnable_property", options["learnable_property"], LEARNABLE_PROPERTIES)
    templates = options["templates"]
    if templates is not None and (
        not isinstance(templates, (list, tuple)) or not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates)
    ):
        raise ConfigError(f"templates={templates!r} is not valid; expected a non-empty list of strings, each with one '{{}}'")
    export = options["export"]
    if not isinstance(export, (list, tuple)) or any(e not in EXPORT_FORMATS for e in export):
        raise ConfigError(f"export={export!r} is not valid; expected a list with some of: {', '.join(EXPORT_FORMATS)}")


def initializer_id(tokenizer: Any, initializer: str) -> int:
    """The id of ``initializer``; ConfigError listing the pieces when it is not exactly one token."""
    ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        hint = " (this tokenizer is character-level: use a single character such as '7' or '*')" if _char_level(tokenizer) else ""
        raise ConfigError(
            f"initializer_token={initializer!r} is {len(ids)} tokens {pieces} in the base tokenizer; expected exactly one token{hint}"
        )
    return int(ids[0])


def _char_level(tokenizer: Any) -> bool:
    vocab = tokenizer.get_vocab()
    return all(len(t.removesuffix("</w>")) <= 1 for t in list(vocab)[:600] if not t.startswith("<|"))


@dataclass
class EmbeddingRows:
    """The placeholder rows of a text encoder's token-embedding matrix, and the frozen rest.

    ``restore()`` writes the saved values back into every other row (call it after each
    optimizer step); ``vectors()`` is the learned ``[num_vectors, dim]`` block.
    """

    text_encoder: Any
    tokens: list[str]
    ids: list[int]
    original: Any  # the full matrix before training (CPU copy)
    frozen: Any  # bool mask [vocab]: True = restore

    @property
    def weight(self) -> Any:
        return self.text_encoder.get_input_embeddings().weight

    def restore(self, _step: int = 0) -> None:
        import torch

        with torch.no_grad():
            w = self.weight
            if self.original.device != w.device or self.original.dtype != w.dtype:
                # moved once (the loop puts the text encoder on its device), not copied every step
                self.original = self.original.to(w.device, w.dtype)
                self.frozen = self.frozen.to(w.device)
            w[self.frozen] = self.original[self.frozen]

    def vectors(self) -> Any:
        return self.weight.detach()[self.ids].float().cpu().clone()


def add_placeholder_tokens(pipe: Any, placeholder: str, num_vectors: int, initializer: str) -> EmbeddingRows:
    """Add ``placeholder`` (and ``_1``… for more vectors) to ``pipe``'s tokenizer, grow the text encoder,
    and start each new row as a copy of the initializer's row. ConfigError when a token already exists."""
    import torch

    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    tokens = placeholder_tokens(placeholder, num_vectors)
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab]
    if taken:
        raise ConfigError(f"placeholder_token={placeholder!r}: token {taken[0]!r} is already in the tokenizer; expected a new token")
    init_id = initializer_id(tokenizer, initializer)
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise ConfigError(f"placeholder_token={placeholder!r}: the tokenizer added {added} of {len(tokens)} tokens; expected all new")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are overwritten below
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i in ids:
            weight[i] = weight[init_id].clone()
    frozen = torch.ones(weight.shape[0], dtype=torch.bool)
    frozen[ids] = False
    return EmbeddingRows(text_encoder, tokens, list(ids), weight.detach().cpu().clone(), frozen)


def ti_captions(pipe: Any, n: int, placeholder_text: str, ids: Sequence[int], templates: Sequence[str], seed: int) -> list[str]:
    """One caption per image: a template drawn with ``random.Random(seed)``, ``{}`` = ``placeholder_text``.

    ConfigError when truncation to the tokenizer's length would cut a placeholder token off.
    """
    rng = random.Random(seed)
    captions = [rng.choice(list(templates)).format(placeholder_text) for _ in range(n)]
    tok = pipe.tokenizer
    for caption in sorted(set(captions)):
        kept = tok(caption, truncation=True, max_length=tok.model_max_length).input_ids
        if not set(ids) <= set(kept):
            raise ConfigError(
                f"caption {caption!r} is longer than the tokenizer's {tok.model_max_length} tokens and loses the placeholder; "
                "expected shorter templates (or fewer num_vectors)"
            )
    return captions


def templates_for(options: dict[str, Any]) -> list[str]:
    if options["templates"] is not None:
        return list(options["templates"])
    return list(OBJECT_TEMPLATES if options["learnable_property"] == "object" else STYLE_TEMPLATES)


def file_stem(token: str) -> str:
    """A file-name-safe stem for ``token`` (A1111 and kohya use the stem as the trigger word)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "", token).strip(".")
    return stem or "embedding"


def save_embedding(rows: EmbeddingRows, placeholder: str, output_dir: Path, *, step: int, export: Sequence[str]) -> list[str]:
    """Write ``learned_embeds.safetensors`` (+ the requested exports) into ``output_dir``; returns the relative file names."""
    emb = Embedding(token=placeholder, vectors=rows.vectors(), step=step)
    write_embedding(emb, output_dir / DIFFUSERS_WEIGHT_NAME)
    files = [DIFFUSERS_WEIGHT_NAME]
    stem = file_stem(placeholder)
    if A1111 in export:
        write_embedding(emb, output_dir / "a1111" / f"{stem}.pt", A1111)
        files.append(f"a1111/{stem}.pt")
    if KOHYA in export:
        write_embedding(emb, output_dir / "kohya" / f"{stem}.safetensors", KOHYA)
        files.append(f"kohya/{stem}.safetensors")
    return files


def embedding_file(folder: Path) -> Path | None:
    for name in (DIFFUSERS_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME_BIN):
        if (folder / name).is_file():
            return folder / name
    return None


def load_embedding(pipe: Any, path: str | Path, *, token: str | None = None, allow_pickle: bool = False) -> str:
    """Load an embedding file (any of the three layouts) or a folder with ``learned_embeds.*`` into ``pipe``
    through ``pipe.load_textual_inversion``; returns the token. FormatError naming both widths when
    the embedding does not fit the text encoder; ConfigError when the token already exists. An SDXL
    file (``clip_l`` + ``clip_g``) goes into both text encoders under the file's stem
    (:func:`s2l_plugin.formats.embeddings.load_sdxl_embedding`)."""
    from s2l_plugin.formats.detect import detect

    if Path(path).is_file() and detect(path, allow_pickle=allow_pickle).variant == "sdxl":
        from s2l_plugin.formats.embeddings import load_sdxl_embedding

        return load_sdxl_embedding(pipe, path, allow_pickle=allow_pickle)
    emb, _fmt = read_embedding(path, token=token, allow_pickle=allow_pickle)
    width = int(pipe.text_encoder.get_input_embeddings().weight.shape[1])
    check_embedding_width(emb, width, source=str(path))
    vocab = pipe.tokenizer.get_vocab()
    clash = [t for t in placeholder_tokens(emb.token, emb.num_vectors) if t in vocab]
    if clash:
        raise ConfigError(f"token {clash[0]!r} of embedding {str(path)!r} is already in the tokenizer; expected a new token (pass token=...)")
    # The validated tensor, not the path: the file was read once, safely, above.
    pipe.load_textual_inversion({emb.token: emb.vectors.to(pipe.text_encoder.dtype)}, token=emb.token)
    return emb.token


# -- the adapter -------------------------------------------------------------------------------------


class TextualInversionAdapter(Adapter):
    """``textual_inversion``: learn ``num_vectors`` new token embeddings; UNet, VAE and every other row stay as they are."""

    name = "textual_inversion"
    default_options: dict[str, Any] = dict(TI_OPTIONS)
    script_kinds: tuple[str, ...] = (DIFFUSERS_SCRIPT,)
    #: what `s2l finetune` uses without --lr (the rate diffusers' TI README trains with)
    default_learning_rate = 5e-4

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options merged over the defaults; ConfigError for an unknown key or a bad value."""
        opts = self.validate_options(options)
        check_ti_options(opts)
        return opts

    def train(self, base: Any, dataset_dir: Path, config: TrainConfig, output_dir: Path) -> Artifact:
        """Train on ``base`` (a pipeline, changed in place: it ends with the trained tokens) and write the artifact."""
        from .training import Trainable, train_loop

        options = self.check_options(config.options)
        if config.caption_from_data:
            raise ConfigError("caption_from_data=True is not valid for textual_inversion; expected template captions (option 'templates')")
        pipe, base_path = resolve_base(base)
        output_dir = check_output_dir(output_dir)
        records = list_image_folder(dataset_dir)
        placeholder = options["placeholder_token"]
        rows = add_placeholder_tokens(pipe, placeholder, options["num_vectors"], options["initializer_token"])
        captions = ti_captions(pipe, len(records), " ".join(rows.tokens), rows.ids, templates_for(options), config.seed)
        pipe.text_encoder.requires_grad_(False)  # only the embedding matrix gets gradients
        dtypes = component_dtypes(pipe)
        try:
            result = train_loop(
                pipe, records, config,
                Trainable(parameters=[rows.weight], after_optimizer_step=rows.restore, trained_modules=("text_encoder",)),
                output_dir=output_dir, prompts=captions, fingerprint_extra={"method": self.name, "options": options},
            )
        finally:
            restore_dtypes(pipe, dtypes)
        pipe.text_encoder.requires_grad_(False)
        pipe.text_encoder.eval()
        staging = staging_dir(output_dir)
        save_embedding(rows, placeholder, staging, step=result.global_step, export=options["export"])
        write_training_record(staging, self.name, config, options, result, base_path)
        names = publish(staging, output_dir)
        return Artifact(
            method=self.name, path=output_dir, files=list_files(output_dir, names), base=base_path,
            metadata={"placeholder_token": placeholder, "num_vectors": options["num_vectors"],
                      "initializer_token": options["initializer_token"], "global_step": result.global_step,
                      "resumed_from": str(result.resumed_from) if result.resumed_from else None,
                      "losses": result.losses, "options": options},
        )

    def script_args(self, script_kind: str, data_dir: Path, prompt: str, output_dir: Path,
                    *, options: dict[str, Any] | None = None) -> dict[str, str | None]:
        """Arguments of diffusers' ``textual_inversion.py`` (``prompt`` is unused: the script captions from templates)."""
        check_choice("script_kind", script_kind, self.script_kinds)
        opts = self.check_options(options or {})
        if opts["templates"] is not None:
            raise ConfigError("option templates is not valid with textual_inversion.py; expected learnable_property object or style")
        return {
            "--train_data_dir": str(data_dir),
            "--placeholder_token": opts["placeholder_token"],
            "--initializer_token": opts["initializer_token"],
            "--learnable_property": opts["learnable_property"],
            "--num_vectors": str(opts["num_vectors"]),
            "--output_dir": str(output_dir),
        }

    def load(self, base_pipeline: Any, artifact: Artifact, *, allow_pickle: bool = False) -> Any:
        """Add the artifact's token(s) to ``base_pipeline`` (in place) via ``load_textual_inversion``; returns it."""
        path = Path(artifact.path)
        file = path if path.is_file() else embedding_file(path)
        if file is None:
            raise FormatError(f"no {DIFFUSERS_WEIGHT_NAME} or {DIFFUSERS_WEIGHT_NAME_BIN} in {str(path)!r}")
        load_embedding(base_pipeline, file, token=artifact.metadata.get("placeholder_token"), allow_pickle=allow_pickle)
        return base_pipeline

    def unload(self, pipeline: Any, artifact: Artifact) -> Any:
        """Remove the artifact's token(s) again (``unload_textual_inversion``)."""
        token = artifact.metadata.get("placeholder_token")
        if token is None:
            emb, _ = read_embedding(Path(artifact.path))
            token = emb.token
        vocab = pipeline.tokenizer.get_vocab()
        tokens = [t for t in placeholder_tokens(token, 1 + sum(1 for t in vocab if t.startswith(f"{token}_"))) if t in vocab]
        pipeline.unload_textual_inversion(tokens)
        return pipeline

    def detect(self, output_dir: Path) -> Artifact | None:
        """``learned_embeds.safetensors`` (or ``.bin``) in a textual_inversion.py output folder."""
        output_dir = Path(output_dir)
        file = embedding_file(output_dir) if output_dir.is_dir() else None
        if file is None:
            return None
        metadata: dict[str, Any] = {}
        if file.suffix == ".safetensors":
            emb, _ = read_embedding(file)
            metadata = {"placeholder_token": emb.token, "num_vectors": emb.num_vectors}
        return Artifact(method=self.name, path=output_dir, files=[file.name], metadata=metadata)


@hookimpl
def register_adapters(register: Any) -> None:
    register(TextualInversionAdapter())
