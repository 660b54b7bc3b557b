"""DreamBooth (full UNet, optionally the text encoder) and End2End (also the VAE) fine-tuning.

The artifact is what diffusers' ``train_dreambooth.py`` writes: a whole pipeline folder
(``model_index.json``, ``unet/``, ``text_encoder/``, ``vae/``, ``tokenizer/``, ``scheduler/``),
made with ``save_pretrained``. S2L's reference "DB" trains the UNet and the text encoder on one
fixed prompt without prior preservation; "End2End" adds the VAE (the S2L code's ``--train_vae``,
whose gradient reaches the VAE through ``encode``).

Prior preservation (DreamBooth's class images) is optional here and shared with LoRA+DreamBooth:
missing class images are generated with the base model before training, as the script does.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

from s2l_plugin.hooks import hookimpl

from s2l_plugin._io import atomic_path
from s2l_plugin.config import check_choice, check_positive, to_json_dict
from s2l_plugin.data import list_image_folder
from s2l_plugin.errors import ConfigError, FormatError

from .base import (
    TRAINING_RECORD,
    Adapter,
    Artifact,
    TrainConfig,
    check_output_dir,
    list_files,
    publish,
    resolve_base,
    staging_dir,
)

#: Pipeline components a full fine-tune may change, in the order they are swapped in by ``load``.
PIPELINE_COMPONENTS = ("unet", "text_encoder", "vae")
PRIOR_OPTIONS: dict[str, Any] = {
    "with_prior_preservation": False,
    "class_prompt": None,
    "class_data_dir": None,  # None: <output_dir>/class_images
    "num_class_images": 100,
    "prior_loss_weight": 1.0,
    "class_inference_steps": 25,
    "class_guidance_scale": 7.5,
}


def check_prior_options(opts: dict[str, Any]) -> None:
    """ConfigError naming the first invalid prior-preservation option."""
    check_choice("with_prior_preservation", opts["with_prior_preservation"], (True, False))
    check_positive("num_class_images", opts["num_class_images"], integer=True)
    check_positive("prior_loss_weight", opts["prior_loss_weight"], allow_zero=True)
    check_positive("class_inference_steps", opts["class_inference_steps"], integer=True)
    check_positive("class_guidance_scale", opts["class_guidance_scale"], allow_zero=True)
    if opts["with_prior_preservation"] and not (isinstance(opts["class_prompt"], str) and opts["class_prompt"].strip()):
        raise ConfigError(f"class_prompt={opts['class_prompt']!r} is not valid with prior preservation; expected a non-empty string")


def prepare_prior(pipeline: Any, opts: dict[str, Any], config: TrainConfig, output_dir: Path) -> Any:
    """A :class:`~s2l_plugin.adapters.training.PriorPreservation` (None when off), after generating
    the missing class images with ``pipeline`` (the base model) into ``class_data_dir``.

    Images are saved as ``<index>-<sha1>.png`` like ``train_dreambooth.py``; image ``i`` is drawn
    from seed ``config.seed + i``, so a partly filled folder is completed with the same images.
    """
    if not opts["with_prior_preservation"]:
        return None
    import torch

    from s2l_plugin.progress import no_sampler_bar, progress_bar

    from .training import PriorPreservation, resolution_for

    class_dir = Path(opts["class_data_dir"]) if opts["class_data_dir"] else output_dir / "class_images"
    class_dir.mkdir(parents=True, exist_ok=True)
    have = len([p for p in class_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp")])
    size = resolution_for(pipeline, config)
    with no_sampler_bar(pipeline):  # the class-images bar counts the images
        for i in progress_bar(range(have, opts["num_class_images"]), desc="class images", unit="img"):
            gen = torch.Generator(device="cpu").manual_seed(config.seed + i)
            image = pipeline(
                opts["class_prompt"], num_inference_steps=opts["class_inference_steps"], guidance_scale=opts["class_guidance_scale"],
                height=size, width=size, generator=gen,
            ).images[0]
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            # The temporary name must not end in an image suffix: one left by a crash would be counted
            # (and trained on) as a class image by the next run.
            with atomic_path(class_dir / f"{i}-{digest}.png") as tmp:
                image.save(tmp, format="PNG")
    records = list_image_folder(class_dir)[: opts["num_class_images"]]
    return PriorPreservation(records=records, prompt=opts["class_prompt"], weight=float(opts["prior_loss_weight"]))


def write_training_record(staging: Path, method: str, config: TrainConfig, opts: dict[str, Any], result: Any, base: str | None) -> None:
    """The JSON record of a built-in run (config with library versions, options, per-step losses)."""
    record = {
        "method": method,
        "base": base,
        "config": to_json_dict(config),
        "options": opts,
        "global_step": result.global_step,
        "losses": result.losses,
    }
    (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")


class DreamBoothAdapter(Adapter):
    """Full fine-tuning of the UNet (and the text encoder unless ``train_text_encoder`` is False)."""

    name = "dreambooth"
    families = ("sd", "sdxl")
    load_replaces_components = True  # load() swaps unet/text_encoder/vae; the base's modules stay untouched
    train_vae = False
    default_options: dict[str, Any] = {"train_text_encoder": True, **PRIOR_OPTIONS}
    script_kinds: tuple[str, ...] = ("train_dreambooth",)

    def __init__(self) -> None:
        # Components replaced by load(), per pipeline, so unload() can put the base back.
        self._originals: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options merged over the defaults; ConfigError for an unknown key or a bad value."""
        opts = self.validate_options(options)
        check_choice("train_text_encoder", opts["train_text_encoder"], (True, False))
        check_prior_options(opts)
        return opts

    def train(self, base: Any, dataset_dir: Path, config: TrainConfig, output_dir: Path) -> Artifact:
        """Fine-tune the whole UNet (+ text encoder, + VAE for end2end) on the images in ``dataset_dir``
        with ``config.prompt``; write a diffusers pipeline folder to ``output_dir``.

        A pipeline passed as ``base`` is trained in place. Everything is validated (options, images,
        base model) before anything is written; the folder appears file by file via renames.
        """
        from .training import Trainable, train_loop

        opts = self.check_options(config.options)
        records = list_image_folder(dataset_dir, caption=config.prompt)
        output_dir = check_output_dir(output_dir)
        pipe, base_ref = resolve_base(base)
        prior = prepare_prior(pipe, opts, config, output_dir)
        params = list(pipe.unet.parameters())
        if opts["train_text_encoder"]:
            params += list(pipe.text_encoder.parameters())
        if self.train_vae:
            params += list(pipe.vae.parameters())
        result = train_loop(pipe, records, config, Trainable(params), output_dir=output_dir, prior=prior,
                            fingerprint_extra={"method": self.name, **opts})
        staging = staging_dir(output_dir)
        pipe.save_pretrained(staging, safe_serialization=True)
        write_training_record(staging, self.name, config, opts, result, base_ref)
        names = publish(staging, output_dir)
        return Artifact(
            method=self.name, path=output_dir, files=list_files(output_dir, names), base=base_ref,
            metadata={"global_step": result.global_step, "losses": result.losses,
                      "resumed_from": str(result.resumed_from) if result.resumed_from else None, "options": opts},
        )

    def script_args(self, script_kind: str, data_dir: Path, prompt: str, output_dir: Path) -> dict[str, str | None]:
        """``train_dreambooth.py`` arguments: instance folder and prompt, output folder, and
        ``--train_text_encoder`` (S2L's DB trains it)."""
        if not self.script_kinds:
            raise ConfigError(f"method {self.name!r} has no matching diffusers training script; use the built-in trainer")
        check_choice("script_kind", script_kind, self.script_kinds)
        return {
            "--instance_data_dir": str(data_dir),
            "--instance_prompt": prompt,
            "--output_dir": str(output_dir),
            "--train_text_encoder": None,
        }

    def load(self, base_pipeline: Any, artifact: Artifact) -> Any:
        """Swap the artifact's UNet, text encoder and VAE into ``base_pipeline`` (same device and
        dtype) and return it; :meth:`unload` puts the base components back."""
        folder = Path(artifact.path)
        if not (folder / "model_index.json").is_file():
            raise FormatError(f"artifact {str(folder)!r} is not a diffusers pipeline folder; expected model_index.json")
        saved = self._originals.setdefault(base_pipeline, {})
        for name in PIPELINE_COMPONENTS:
            if not (folder / name).is_dir():
                continue
            current = getattr(base_pipeline, name)
            try:
                new = type(current).from_pretrained(str(folder / name), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise FormatError(f"artifact component {str(folder / name)!r} could not be loaded: {exc}") from exc
            new = new.to(device=current.device, dtype=current.dtype).eval()
            saved.setdefault(name, current)
            base_pipeline.register_modules(**{name: new})
        return base_pipeline

    def unload(self, pipeline: Any, artifact: Artifact) -> Any:
        """Put back the base components :meth:`load` replaced; returns the base pipeline."""
        saved = self._originals.pop(pipeline, {})
        if saved:
            pipeline.register_modules(**saved)
        return pipeline

    def detect(self, output_dir: Path) -> Artifact | None:
        """A diffusers pipeline folder in ``output_dir`` (``model_index.json`` + ``unet/``), or None."""
        folder = Path(output_dir)
        if not ((folder / "model_index.json").is_file() and (folder / "unet").is_dir()):
            return None
        names = [p.name for p in folder.iterdir() if p.name == "model_index.json" or (p.is_dir() and (p / "config.json").exists())
                 or (p.is_dir() and p.name in ("tokenizer", "scheduler"))]
        return Artifact(method=self.name, path=folder, files=list_files(folder, sorted(names)))


class End2EndAdapter(DreamBoothAdapter):
    """DreamBooth plus the VAE (S2L's "End2End"); no diffusers script trains the VAE."""

    name = "end2end"
    train_vae = True
    script_kinds: tuple[str, ...] = ()


@hookimpl
def register_adapters(register: Any) -> None:
    register(DreamBoothAdapter())
    register(End2EndAdapter())
