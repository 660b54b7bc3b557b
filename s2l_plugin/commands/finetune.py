"""``s2l finetune``: fine-tune a base model on an image folder with a built-in (or plugin) trainer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from s2l_plugin.errors import ConfigError

# CLI flag -> adapter option, passed only when the user gave the flag (so a method that does not
# know the option refuses it by name instead of silently ignoring it).
_OPTION_FLAGS = {
    "rank": "rank",
    "alpha": "alpha",
    "dropout": "dropout",
    "train_text_encoder": "train_text_encoder",
    "kohya_export": "kohya_export",
    "prior_preservation": "with_prior_preservation",
    "class_prompt": "class_prompt",
    "class_data_dir": "class_data_dir",
    "num_class_images": "num_class_images",
    "prior_loss_weight": "prior_loss_weight",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on an image folder (dreambooth, end2end, lora, lora_dreambooth, ...)",
        description=(
            "Train with a built-in trainer (accelerate; CPU or `accelerate launch` for several GPUs) and write the "
            "method's standard artifact to --out. Checkpoints go to OUT/checkpoints/; a rerun resumes from the newest."
        ),
    )
    p.add_argument("--method", required=True, help="fine-tuning method (see `s2l plugins`): dreambooth, end2end, lora, lora_dreambooth, ...")
    p.add_argument("--model", default="testbed", help="diffusers pipeline folder, single-file checkpoint (with --model-config), "
                   "or 'testbed' (default: the shipped testbed)")
    p.add_argument("--model-config", default=None, metavar="DIR",
                   help="with a single-file --model: a local diffusers pipeline folder of the same model family (its configs and "
                   "tokenizers are read; nothing is downloaded)")
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="folder of training images")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder for the artifact")
    p.add_argument("--prompt", default=None, help="instance prompt for every image (default: the TrainConfig default)")
    p.add_argument("--caption-from-data", action="store_true", help="use each image's caption (metadata.jsonl / .txt) instead of --prompt")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-5 full fine-tuning, 1e-4 LoRA)")
    p.add_argument("--batch-size", type=int, default=None, help="images per micro-batch per process (default 16)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed of every random draw (default 0)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution in pixels (default: the model's)")
    p.add_argument("--prediction-type", default=None, help="epsilon or v_prediction (default: the model scheduler's)")
    p.add_argument("--mixed-precision", default=None, help="no, fp16 or bf16 (default no)")
    p.add_argument("--checkpointing-steps", type=int, default=None, help="save a resumable checkpoint every N steps (default 0: none)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None, help="resume from OUT/checkpoints (default on)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 4)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default 0)")
    p.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the text encoder (default: on for dreambooth/end2end/lora_dreambooth, off for lora)")
    p.add_argument("--kohya-export", action=argparse.BooleanOptionalAction, default=None, help="LoRA: also write the kohya file (default on)")
    p.add_argument("--prior-preservation", action=argparse.BooleanOptionalAction, default=None, help="DreamBooth prior preservation (default off)")
    p.add_argument("--class-prompt", default=None, help="prompt of the class images (prior preservation)")
    p.add_argument("--class-data-dir", default=None, help="class images folder; missing images are generated (default OUT/class_images)")
    p.add_argument("--num-class-images", type=int, default=None, help="class images to use (default 100)")
    p.add_argument("--prior-loss-weight", type=float, default=None, help="weight of the prior loss (default 1.0)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                   help="any other method option, value as JSON (e.g. --option rank=8); repeatable")
    p.add_argument("--json", action="store_true", help="print the artifact as JSON")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a model folder whose weights are only pickles (weights-only); refused by default")
    p.set_defaults(func=run)


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--option {text!r} is not valid; expected KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as a prompt
    return key.strip(), value


def build_config(args: argparse.Namespace, adapter: Any) -> Any:
    """The TrainConfig the flags describe (defaults from TrainConfig and the adapter); ConfigError on a bad value."""
    from s2l_plugin.adapters.base import TrainConfig, check_adapter_options

    options: dict[str, Any] = dict(_parse_option(o) for o in args.option)
    for flag, key in _OPTION_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            options[key] = value
    fields: dict[str, Any] = {
        "prompt": args.prompt,
        "max_train_steps": args.steps,
        "learning_rate": args.lr if args.lr is not None else getattr(adapter, "default_learning_rate", None),
        "train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "seed": args.seed,
        "resolution": args.resolution,
        "prediction_type": args.prediction_type,
        "mixed_precision": args.mixed_precision,
        "checkpointing_steps": args.checkpointing_steps,
        "resume": args.resume,
    }
    config = TrainConfig(**{k: v for k, v in fields.items() if v is not None}, caption_from_data=args.caption_from_data, options=options)
    # Validate options now (unknown keys, rank <= 0, ...), before any model is loaded or file written.
    check_adapter_options(adapter, options)
    return config


def run(args: argparse.Namespace) -> int:
    from s2l_plugin.adapters.base import check_output_dir
    from s2l_plugin.data import list_image_folder
    from s2l_plugin.hooks.manager import get
    from s2l_plugin.pipeline import resolve_model_dir

    adapter = get("adapters", args.method)
    config = build_config(args, adapter)
    list_image_folder(args.data)  # InputError for a missing, empty or image-less folder
    check_output_dir(args.out)
    from s2l_plugin.adapters.base import check_adapter_family
    from s2l_plugin.pipeline import TESTBED_MODEL, model_family

    single = args.model != TESTBED_MODEL and Path(args.model).is_file()
    model_dir = Path(args.model) if single else resolve_model_dir(None if args.model == TESTBED_MODEL else args.model)
    check_adapter_family(adapter, config.options, model_family(model_dir))
    # The one loader, with its safety rules; the adapter trains the loaded pipeline (its folder is the base).
    from s2l_plugin.pipeline import load_pipeline

    base = load_pipeline(model_dir, allow_pickle=args.allow_pickle, config=args.model_config)
    artifact = adapter.train(base, args.data, config, args.out)
    if args.json:
        print(json.dumps(artifact.to_dict(), indent=2, default=str))
        return 0
    losses = artifact.metadata.get("losses") or []
    last = f", last loss {losses[-1]:.4f}" if losses else ""
    print(f"{artifact.method}: {artifact.path} ({len(artifact.files)} files{last})")
    for name in artifact.files:
        print(f"  {name}")
    return 0
