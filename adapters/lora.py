"""LoRA and LoRA+DreamBooth fine-tuning (peft adapters on the UNet and optionally the text encoder).

LoRA goes on the UNet attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) through
``unet.add_adapter(LoraConfig(...))``, and with ``train_text_encoder`` on CLIP's ``q_proj``,
``k_proj``, ``v_proj``, ``out_proj``. The artifact is what diffusers' LoRA scripts write,
``pytorch_lora_weights.safetensors`` from ``StableDiffusionPipeline.save_lora_weights`` (with
the LoraConfig as adapter metadata, so an alpha other than the rank survives), plus a kohya
export (``lora_unet_…``/``lora_te_…``, ``lora_down``/``lora_up``, ``.alpha``) that diffusers'
own kohya converter reads through ``load_lora_weights``. Both give the same model.

``lora_dreambooth`` is S2L's "LoRA+DB": LoRA on the UNet and the text encoder, trained on the
instance prompt, prior preservation optional.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from s2l_plugin.hooks import hookimpl

from s2l_plugin.config import check_choice, check_positive, check_range
from s2l_plugin.data import list_image_folder
from s2l_plugin.errors import FormatError

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
from .dreambooth import PRIOR_OPTIONS, check_prior_options, prepare_prior, write_training_record

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: The transformer layers LoRA goes on for SD3 and Flux: the image and text streams' attention projections
#: (the target list of diffusers' train_dreambooth_lora_sd3.py; peft matches the names as suffixes).
TRANSFORMER_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                       "attn.add_v_proj", "attn.to_add_out")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_NAME = "s2l"


def lora_configs(opts: dict[str, Any], transformer: bool = False) -> tuple[Any, Any | None]:
    """The peft LoraConfigs for the denoiser (UNet, or an SD3/Flux ``transformer``) and (when trained)
    the text encoder, from checked options."""
    from peft import LoraConfig

    alpha = opts["alpha"] if opts["alpha"] is not None else opts["rank"]
    common = {"r": opts["rank"], "lora_alpha": alpha, "lora_dropout": opts["dropout"], "init_lora_weights": "gaussian"}
    unet_cfg = LoraConfig(target_modules=list(TRANSFORMER_TARGETS if transformer else UNET_TARGETS), **common)
    te_cfg = LoraConfig(target_modules=list(TEXT_ENCODER_TARGETS), **common) if opts["train_text_encoder"] else None
    return unet_cfg, te_cfg


def add_lora(pipeline: Any, opts: dict[str, Any], seed: int) -> tuple[list[Any], Any, Any]:
    """Freeze the pipeline and inject LoRA layers; returns (trainable parameters, denoiser config, text-encoder config)."""
    import torch
    from peft import inject_adapter_in_model

    from s2l_plugin.conditioning import denoiser

    net = denoiser(pipeline)
    unet_cfg, te_cfg = lora_configs(opts, transformer=net is not getattr(pipeline, "unet", None))
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(pipeline, name, None)
        if module is not None:
            module.requires_grad_(False)
    # The "gaussian" init of lora_A draws from the global RNG: seed it so a run reproduces.
    torch.manual_seed(seed)
    net.add_adapter(unet_cfg)
    params = [p for p in net.parameters() if p.requires_grad]
    if te_cfg is not None:
        # transformers' own add_adapter insists on a newer peft than diffusers needs; inject_adapter_in_model
        # is what it calls underneath.
        inject_adapter_in_model(te_cfg, pipeline.text_encoder)
        params += [p for n, p in pipeline.text_encoder.named_parameters() if "lora_" in n]
    return params, unet_cfg, te_cfg


def save_lora(pipeline: Any, folder: Path, unet_cfg: Any, te_cfg: Any | None, *, kohya: bool) -> list[str]:
    """Write ``pytorch_lora_weights.safetensors`` (and the kohya export) for the pipeline's peft LoRA into ``folder``.

    On SD3/Flux the file is what their pipeline's ``save_lora_weights`` writes (``transformer.…`` keys,
    the LoraConfig as adapter metadata), as diffusers' Flux/SD3 LoRA scripts save it; no kohya export
    is written for them (``kohya`` is ignored): the kohya converter here writes SD/SDXL names only."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from s2l_plugin.conditioning import FLOW_FAMILIES, pipeline_family
    from s2l_plugin.formats.lora_convert import convert_diffusers_to_kohya

    family = pipeline_family(pipeline)
    if family in FLOW_FAMILIES:
        import diffusers

        getattr(diffusers, FLOW_FAMILIES[family]).save_lora_weights(
            save_directory=str(folder), transformer_lora_layers=get_peft_model_state_dict(pipeline.transformer),
            transformer_lora_adapter_metadata=unet_cfg.to_dict(), weight_name=DIFFUSERS_WEIGHT_NAME, safe_serialization=True,
        )
        return [DIFFUSERS_WEIGHT_NAME]
    unet_sd = get_peft_model_state_dict(pipeline.unet)
    te_sd = get_peft_model_state_dict(pipeline.text_encoder) if te_cfg is not None else None
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder), unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict() if te_cfg is not None else None,
        weight_name=DIFFUSERS_WEIGHT_NAME, safe_serialization=True,
    )
    names = [DIFFUSERS_WEIGHT_NAME]
    if kohya:
        alphas = {"unet": float(unet_cfg.lora_alpha)}
        if te_cfg is not None:
            alphas["text_encoder"] = float(te_cfg.lora_alpha)
        kohya_sd = convert_diffusers_to_kohya(load_file(str(folder / DIFFUSERS_WEIGHT_NAME)), alphas)
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(unet_cfg.r),
            "ss_network_alpha": str(unet_cfg.lora_alpha),
            "ss_base_model_version": "sd_v1",
            "ss_network_args": "{}",
        }
        save_file({k: v.contiguous() for k, v in kohya_sd.items()}, str(folder / KOHYA_WEIGHT_NAME), metadata=metadata)
        names.append(KOHYA_WEIGHT_NAME)
    return names


def is_kohya_lora(path: Path) -> bool:
    """True when ``path`` is a safetensors file whose keys are all kohya LoRA keys, SD 1.x or SDXL
    (``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``; reads the header only)."""
    from safetensors import safe_open

    from s2l_plugin.formats.detect import KOHYA_PREFIXES

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # not a safetensors file at all: simply not ours
        return False
    return bool(keys) and all(k.startswith(KOHYA_PREFIXES) for k in keys)


class LoraAdapter(Adapter):
    """peft LoRA on the UNet attention projections (and optionally the text encoder)."""

    name = "lora"
    families = ("sd", "sdxl", "sd3", "flux")
    default_options: dict[str, Any] = {
        "rank": 4,
        "alpha": None,  # None: alpha = rank (scale 1, what diffusers' scripts use)
        "dropout": 0.0,
        "train_text_encoder": False,
        "kohya_export": True,
    }
    script_kinds: tuple[str, ...] = ("train_text_to_image_lora", "train_dreambooth_lora", "train_network")
    default_learning_rate = 1e-4  # what diffusers' LoRA scripts use

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options merged over the defaults; ConfigError for an unknown key or a bad value (rank ≤ 0, ...)."""
        opts = self.validate_options(options)
        check_positive("rank", opts["rank"], integer=True)
        if opts["alpha"] is not None:
            check_positive("alpha", opts["alpha"])
        check_range("dropout", opts["dropout"], 0.0, 0.999)
        check_choice("train_text_encoder", opts["train_text_encoder"], (True, False))
        check_choice("kohya_export", opts["kohya_export"], (True, False))
        if "with_prior_preservation" in opts:
            check_prior_options(opts)
        return opts

    def train(self, base: Any, dataset_dir: Path, config: TrainConfig, output_dir: Path) -> Artifact:
        """Train LoRA layers on the images in ``dataset_dir``; write ``pytorch_lora_weights.safetensors``
        (+ ``lora_kohya.safetensors``) to ``output_dir``. A pipeline passed as ``base`` gets the
        trained adapter injected in place (adapter name "default")."""
        from .training import Trainable, train_loop

        opts = self.check_options(config.options)
        records = list_image_folder(dataset_dir, caption=config.prompt)
        output_dir = check_output_dir(output_dir)
        pipe, base_ref = resolve_base(base)
        prior = prepare_prior(pipe, opts, config, output_dir) if "with_prior_preservation" in opts else None
        params, unet_cfg, te_cfg = add_lora(pipe, opts, config.seed)
        result = train_loop(pipe, records, config, Trainable(params), output_dir=output_dir, prior=prior,
                            fingerprint_extra={"method": self.name, **opts})
        staging = staging_dir(output_dir)
        save_lora(pipe, staging, unet_cfg, te_cfg, kohya=opts["kohya_export"])
        write_training_record(staging, self.name, config, opts, result, base_ref)
        names = publish(staging, output_dir)
        return Artifact(
            method=self.name, path=output_dir, files=list_files(output_dir, names), base=base_ref,
            metadata={"weight_name": DIFFUSERS_WEIGHT_NAME, "kohya_weight_name": KOHYA_WEIGHT_NAME if opts["kohya_export"] else None,
                      "global_step": result.global_step, "losses": result.losses,
                      "resumed_from": str(result.resumed_from) if result.resumed_from else None, "options": opts},
        )

    def script_args(self, script_kind: str, data_dir: Path, prompt: str, output_dir: Path) -> dict[str, str | None]:
        """Arguments for ``train_dreambooth_lora`` (instance folder + prompt), ``train_text_to_image_lora``
        (imagefolder with metadata.jsonl, caption column "text"; ``prompt`` becomes the validation
        prompt) or kohya ``train_network`` (``data_dir`` in the ``<repeats>_<name>/`` layout; its captions are written in
        the extension the run reads, so ``--caption_extension`` is left as given)."""
        check_choice("script_kind", script_kind, self.script_kinds)
        if script_kind == "train_dreambooth_lora":
            args: dict[str, str | None] = {"--instance_data_dir": str(data_dir), "--instance_prompt": prompt, "--output_dir": str(output_dir)}
            if self.name == "lora_dreambooth":
                args["--train_text_encoder"] = None
            return args
        if script_kind == "train_text_to_image_lora":
            return {"--train_data_dir": str(data_dir), "--caption_column": "text", "--validation_prompt": prompt,
                    "--output_dir": str(output_dir)}
        return {
            "--train_data_dir": str(data_dir),
            "--output_dir": str(output_dir),
            "--network_module": "networks.lora",
            "--save_model_as": "safetensors",
        }

    def _weight_file(self, artifact: Artifact) -> Path:
        path = Path(artifact.path)
        if path.is_file():
            return path
        for name in (artifact.metadata.get("weight_name"), DIFFUSERS_WEIGHT_NAME, artifact.metadata.get("kohya_weight_name"), KOHYA_WEIGHT_NAME):
            if name and (path / name).is_file():
                return path / name
        found = self.detect(path)
        if found is None:
            raise FormatError(f"artifact {str(path)!r} holds no LoRA weights; expected {DIFFUSERS_WEIGHT_NAME} or a kohya .safetensors")
        return Path(found.path) / found.metadata["weight_name"]

    def load(self, base_pipeline: Any, artifact: Artifact) -> Any:
        """``base_pipeline.load_lora_weights`` with the artifact's file (diffusers or kohya), adapter name "s2l".

        FormatError when the file is not a LoRA diffusers can load."""
        weight = self._weight_file(artifact)
        try:
            base_pipeline.load_lora_weights(str(weight.parent), weight_name=weight.name, adapter_name=ADAPTER_NAME)
        except (ValueError, KeyError, OSError) as exc:
            raise FormatError(f"LoRA file {str(weight)!r} could not be loaded onto the base pipeline: {exc}") from exc
        return base_pipeline

    def unload(self, pipeline: Any, artifact: Artifact) -> Any:
        """``unload_lora_weights``: the pipeline computes exactly the base model again."""
        pipeline.unload_lora_weights()
        return pipeline

    def detect(self, output_dir: Path, weight_name: str | None = None) -> Artifact | None:
        """``pytorch_lora_weights.safetensors`` in ``output_dir``, else a top-level kohya ``*.safetensors``
        (every key ``lora_unet_``/``lora_te_``); None when neither is there. With ``weight_name``
        (e.g. kohya's ``{output_name or "last"}.safetensors``), only that file, when it is a kohya LoRA."""
        folder = Path(output_dir)
        if weight_name is not None:
            path = folder / weight_name
            if path.is_file() and is_kohya_lora(path):
                return Artifact(method=self.name, path=folder, files=[path.name], metadata={"weight_name": path.name, "format": "kohya"})
            return None
        if (folder / DIFFUSERS_WEIGHT_NAME).is_file():
            return Artifact(method=self.name, path=folder, files=[DIFFUSERS_WEIGHT_NAME],
                            metadata={"weight_name": DIFFUSERS_WEIGHT_NAME, "format": "diffusers"})
        if folder.is_dir():
            for path in sorted(folder.glob("*.safetensors")):
                if is_kohya_lora(path):
                    return Artifact(method=self.name, path=folder, files=[path.name], metadata={"weight_name": path.name, "format": "kohya"})
        return None


class LoraDreamBoothAdapter(LoraAdapter):
    """S2L's LoRA+DB: LoRA on the UNet and the text encoder, instance prompt, optional prior preservation."""

    name = "lora_dreambooth"
    default_options: dict[str, Any] = {**LoraAdapter.default_options, "train_text_encoder": True, **PRIOR_OPTIONS}
    script_kinds: tuple[str, ...] = ("train_dreambooth_lora", "train_network")


@hookimpl
def register_adapters(register: Any) -> None:
    register(LoraAdapter())
    register(LoraDreamBoothAdapter())
