"""Textual Inversion combined with DreamBooth or LoRA (pivotal tuning): one run, one artifact folder.

Both combinations add placeholder tokens exactly as ``textual_inversion`` does (initializer copy,
template captions, every other embedding row restored after each step) and train those rows
*together* with the second method's parameters, in one optimizer (the embedding rows may use
their own learning rate, option ``embedding_learning_rate``):

- ``textual_inversion+lora``: peft LoRA on the UNet attention projections (and, with
  ``train_text_encoder``, on CLIP's projections), as ``lora``. The folder holds
  ``learned_embeds.safetensors`` (+ A1111/kohya embedding exports) and
  ``pytorch_lora_weights.safetensors`` (+ the kohya LoRA export).
- ``textual_inversion+dreambooth``: the whole UNet (and, with ``train_text_encoder``, the text
  encoder's layers; its other embedding rows are still restored), as ``dreambooth``, prior
  preservation optional. The folder is a self-contained diffusers pipeline (its tokenizer knows
  the new tokens) plus ``learned_embeds.safetensors`` and the exports.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from s2l_plugin.hooks import hookimpl

from s2l_plugin.config import check_positive
from s2l_plugin.data import list_image_folder
from s2l_plugin.errors import ConfigError, FormatError

from .base import Artifact, TrainConfig, check_output_dir, list_files, publish, resolve_base, staging_dir
from .dreambooth import PRIOR_OPTIONS, DreamBoothAdapter, prepare_prior, write_training_record
from .lora import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, LoraAdapter, add_lora, save_lora
from .textual_inversion import (
    TI_OPTIONS,
    TextualInversionAdapter,
    add_placeholder_tokens,
    check_ti_options,
    component_dtypes,
    embedding_file,
    restore_dtypes,
    save_embedding,
    templates_for,
    ti_captions,
)

COMBINATION_OPTIONS: dict[str, Any] = {
    # Embeddings learn at Textual Inversion's rate while LoRA / the UNet use config.learning_rate;
    # None: config.learning_rate for the embedding rows too.
    "embedding_learning_rate": 5e-4,
}


def _check_ti_part(opts: dict[str, Any]) -> dict[str, Any]:
    check_ti_options(opts)
    if opts["embedding_learning_rate"] is not None:
        check_positive("embedding_learning_rate", opts["embedding_learning_rate"])
    return opts


def _check_combination(opts: dict[str, Any], config: TrainConfig) -> None:
    if config.caption_from_data:
        raise ConfigError("caption_from_data=True is not valid with Textual Inversion; expected template captions (option 'templates')")


def _param_groups(embedding_weight: Any, others: list[Any], opts: dict[str, Any], config: TrainConfig) -> list[dict[str, Any]]:
    """Two AdamW groups: the token-embedding matrix (its own learning rate) and the second method's parameters."""
    lr = opts["embedding_learning_rate"] if opts["embedding_learning_rate"] is not None else config.learning_rate
    others = [p for p in others if p is not embedding_weight]
    return [{"params": [embedding_weight], "lr": float(lr)}, {"params": others}]


def _run_metadata(result: Any) -> dict[str, Any]:
    return {"global_step": result.global_step, "resumed_from": str(result.resumed_from) if result.resumed_from else None,
            "losses": result.losses}


def _ti_metadata(opts: dict[str, Any]) -> dict[str, Any]:
    return {"placeholder_token": opts["placeholder_token"], "num_vectors": opts["num_vectors"],
            "initializer_token": opts["initializer_token"]}


class TextualInversionLoraAdapter(LoraAdapter):
    """``textual_inversion+lora``: pivotal tuning, new token embeddings and LoRA layers trained together."""

    name = "textual_inversion+lora"
    families = ("sd",)  # Textual Inversion trains token rows of one text encoder
    default_options: dict[str, Any] = {**LoraAdapter.default_options, **TI_OPTIONS, **COMBINATION_OPTIONS}
    script_kinds: tuple[str, ...] = ()
    default_learning_rate = 1e-4  # LoRA's; the embeddings use embedding_learning_rate

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return _check_ti_part(super().check_options(options))

    def train(self, base: Any, dataset_dir: Path, config: TrainConfig, output_dir: Path) -> Artifact:
        """Train embeddings + LoRA on ``base`` (a pipeline is changed in place: new tokens and LoRA
        layers); write both into ``output_dir``."""
        from .training import Trainable, train_loop

        opts = self.check_options(config.options)
        _check_combination(opts, config)
        records = list_image_folder(dataset_dir)
        output_dir = check_output_dir(output_dir)
        pipe, base_ref = resolve_base(base)
        rows = add_placeholder_tokens(pipe, opts["placeholder_token"], opts["num_vectors"], opts["initializer_token"])
        captions = ti_captions(pipe, len(records), " ".join(rows.tokens), rows.ids, templates_for(opts), config.seed)
        lora_params, unet_cfg, te_cfg = add_lora(pipe, opts, config.seed)  # freezes everything else
        trainable = Trainable(_param_groups(rows.weight, lora_params, opts, config), after_optimizer_step=rows.restore,
                              trained_modules=("unet", "text_encoder"))
        dtypes = component_dtypes(pipe)
        result = train_loop(pipe, records, config, trainable, output_dir=output_dir, prompts=captions,
                            fingerprint_extra={"method": self.name, **opts})
        restore_dtypes(pipe, dtypes)
        pipe.text_encoder.requires_grad_(False)
        staging = staging_dir(output_dir)
        save_lora(pipe, staging, unet_cfg, te_cfg, kohya=opts["kohya_export"])
        save_embedding(rows, opts["placeholder_token"], staging, step=result.global_step, export=opts["export"])
        write_training_record(staging, self.name, config, opts, result, base_ref)
        names = publish(staging, output_dir)
        return Artifact(
            method=self.name, path=output_dir, files=list_files(output_dir, names), base=base_ref,
            metadata={"weight_name": DIFFUSERS_WEIGHT_NAME, "kohya_weight_name": KOHYA_WEIGHT_NAME if opts["kohya_export"] else None,
                      **_ti_metadata(opts), **_run_metadata(result), "options": opts},
        )

    def script_args(self, script_kind: str, data_dir: Path, prompt: str, output_dir: Path) -> dict[str, str | None]:
        raise ConfigError(f"script kind {script_kind!r} is not valid for method {self.name!r}; use the built-in trainer")

    def load(self, base_pipeline: Any, artifact: Artifact) -> Any:
        """Add the embedding's tokens, then load the LoRA (adapter name "s2l") onto ``base_pipeline``; returns it."""
        TextualInversionAdapter().load(base_pipeline, artifact)
        return super().load(base_pipeline, artifact)

    def unload(self, pipeline: Any, artifact: Artifact) -> Any:
        """Unload the LoRA and remove the tokens: the pipeline computes the base model again."""
        super().unload(pipeline, artifact)
        return TextualInversionAdapter().unload(pipeline, artifact)

    def detect(self, output_dir: Path) -> Artifact | None:
        """A folder holding both ``learned_embeds.*`` and a LoRA file (None otherwise)."""
        lora = super().detect(output_dir)
        ti = TextualInversionAdapter().detect(output_dir)
        if lora is None or ti is None:
            return None
        return Artifact(method=self.name, path=Path(output_dir), files=sorted(set(lora.files) | set(ti.files)),
                        metadata={**lora.metadata, **ti.metadata})


class TextualInversionDreamBoothAdapter(DreamBoothAdapter):
    """``textual_inversion+dreambooth``: new token embeddings and the whole UNet trained together."""

    name = "textual_inversion+dreambooth"
    families = ("sd",)  # Textual Inversion trains token rows of one text encoder
    default_options: dict[str, Any] = {"train_text_encoder": False, **PRIOR_OPTIONS, **TI_OPTIONS, **COMBINATION_OPTIONS}
    script_kinds: tuple[str, ...] = ()
    default_learning_rate = 1e-5  # DreamBooth's; the embeddings use embedding_learning_rate

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return _check_ti_part(super().check_options(options))

    def __init__(self) -> None:
        super().__init__()
        # Tokenizers replaced by load(), per pipeline, so unload() can put the base one back.
        self._tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def train(self, base: Any, dataset_dir: Path, config: TrainConfig, output_dir: Path) -> Artifact:
        """Train embeddings + UNet (+ text-encoder layers) on ``base`` (a pipeline is changed in place);
        write a pipeline folder with ``learned_embeds.safetensors`` into ``output_dir``."""
        from .training import Trainable, train_loop

        opts = self.check_options(config.options)
        _check_combination(opts, config)
        records = list_image_folder(dataset_dir)
        output_dir = check_output_dir(output_dir)
        pipe, base_ref = resolve_base(base)
        prior = prepare_prior(pipe, opts, config, output_dir)  # with the base model, before any token exists
        rows = add_placeholder_tokens(pipe, opts["placeholder_token"], opts["num_vectors"], opts["initializer_token"])
        captions = ti_captions(pipe, len(records), " ".join(rows.tokens), rows.ids, templates_for(opts), config.seed)
        pipe.text_encoder.requires_grad_(False)
        others = list(pipe.unet.parameters())
        if opts["train_text_encoder"]:
            others += list(pipe.text_encoder.parameters())
        trainable = Trainable(_param_groups(rows.weight, others, opts, config), after_optimizer_step=rows.restore,
                              trained_modules=("unet", "text_encoder"))
        dtypes = component_dtypes(pipe)
        result = train_loop(pipe, records, config, trainable, output_dir=output_dir, prior=prior, prompts=captions,
                            fingerprint_extra={"method": self.name, **opts})
        restore_dtypes(pipe, dtypes)
        pipe.text_encoder.requires_grad_(False)
        pipe.text_encoder.eval()
        pipe.unet.eval()
        staging = staging_dir(output_dir)
        pipe.save_pretrained(staging, safe_serialization=True)
        save_embedding(rows, opts["placeholder_token"], staging, step=result.global_step, export=opts["export"])
        write_training_record(staging, self.name, config, opts, result, base_ref)
        names = publish(staging, output_dir)
        return Artifact(
            method=self.name, path=output_dir, files=list_files(output_dir, names), base=base_ref,
            metadata={**_ti_metadata(opts), **_run_metadata(result), "options": opts},
        )

    def script_args(self, script_kind: str, data_dir: Path, prompt: str, output_dir: Path) -> dict[str, str | None]:
        raise ConfigError(f"script kind {script_kind!r} is not valid for method {self.name!r}; use the built-in trainer")

    def load(self, base_pipeline: Any, artifact: Artifact) -> Any:
        """Swap in the artifact's UNet, text encoder (holding the new rows) and tokenizer (knowing the new
        tokens); returns ``base_pipeline``. :meth:`unload` puts the base components back."""
        folder = Path(artifact.path)
        if not (folder / "tokenizer").is_dir() or embedding_file(folder) is None:
            raise FormatError(f"artifact {str(folder)!r} is not a textual_inversion+dreambooth folder; expected tokenizer/ and learned_embeds.safetensors")
        try:
            tokenizer = type(base_pipeline.tokenizer).from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FormatError(f"artifact tokenizer {str(folder / 'tokenizer')!r} could not be loaded: {exc}") from exc
        super().load(base_pipeline, artifact)
        self._tokenizers.setdefault(base_pipeline, base_pipeline.tokenizer)
        base_pipeline.register_modules(tokenizer=tokenizer)
        return base_pipeline

    def unload(self, pipeline: Any, artifact: Artifact) -> Any:
        tokenizer = self._tokenizers.pop(pipeline, None)
        if tokenizer is not None:
            pipeline.register_modules(tokenizer=tokenizer)
        return super().unload(pipeline, artifact)

    def detect(self, output_dir: Path) -> Artifact | None:
        """A pipeline folder that also holds ``learned_embeds.*`` (None otherwise)."""
        found = super().detect(output_dir)
        file = embedding_file(Path(output_dir)) if found is not None else None
        if found is None or file is None:
            return None
        return Artifact(method=self.name, path=found.path, files=sorted(set(found.files) | {file.name}), metadata=found.metadata)


@hookimpl
def register_adapters(register: Any) -> None:
    register(TextualInversionLoraAdapter())
    register(TextualInversionDreamBoothAdapter())
