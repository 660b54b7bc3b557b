"""``s2l generate``: write the S2L synthetic private set of one or more target domains."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from s2l_plugin.defaults import GENERATE_GUIDANCE_SCALE, GENERATE_NUM_INFERENCE_STEPS
from s2l_plugin.errors import ConfigError, InputError


def register(sub: argparse._SubParsersAction) -> None:
    from s2l_plugin.generate import LAYOUTS, SCHEDULERS, TEMPLATE_CHOICES

    p = sub.add_parser(
        "generate",
        help="generate the S2L synthetic private set of a target domain",
        description=(
            "Prompt the pretrained model with the target domain and keep its generations (S2L step 1). "
            "Rerunning with the same arguments finishes an interrupted set; other arguments into a "
            "non-empty folder are refused unless --overwrite."
        ),
    )
    p.add_argument("--model", default="testbed", help="diffusers pipeline folder, single-file checkpoint (with --model-config), "
                   "or 'testbed' (default)")
    p.add_argument("--model-config", default=None, metavar="DIR",
                   help="with a single-file --model: a local diffusers pipeline folder of the same model family (its configs and "
                   "tokenizers are read; nothing is downloaded)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--domain", help='target domain, e.g. "the digit seven" or "Joe Biden"')
    target.add_argument(
        "--domains", type=Path, metavar="FILE.json",
        help="JSON list of domain names (or an object whose keys are names); each goes to OUT/<slug>/",
    )
    p.add_argument("--num-images", type=int, required=True, metavar="N", help="images per domain")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (manifest.json + images/)")
    # No argparse `choices` where the config validates: its error is one line naming the choices.
    p.add_argument("--layout", default="dreambooth", help=f"folder layout for the trainer: {', '.join(LAYOUTS)} (default dreambooth)")
    p.add_argument("--kohya-repeats", type=int, default=10, help="repeats in the kohya folder name <repeats>_<name> (default 10)")
    p.add_argument("--steps", type=int, default=GENERATE_NUM_INFERENCE_STEPS,
                   help=f"inference steps (default {GENERATE_NUM_INFERENCE_STEPS})")
    p.add_argument("--guidance", type=float, default=GENERATE_GUIDANCE_SCALE,
                   help=f"classifier-free guidance scale (default {GENERATE_GUIDANCE_SCALE})")
    p.add_argument("--scheduler", default="ddim", help=f"sampler: {', '.join(SCHEDULERS)} (default ddim)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="base seed; per-image seeds derive from it (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--template", action="append", metavar="TEXT",
                   help='prompt template with {domain}; repeat for several (default "photo of {domain}", "face of {domain}")')
    p.add_argument("--template-weights", type=float, nargs="+", metavar="W", help="probability weight of each template")
    p.add_argument("--template-choice", default="per_domain",
                   help=f"{' or '.join(TEMPLATE_CHOICES)}: one template per domain (the reference's rule, default) or per image")
    p.add_argument("--quality-suffix", help="text appended to every prompt")
    p.add_argument("--negative-prompt", help="negative prompt (default none)")
    p.add_argument("--reference-style", action="store_true",
                   help="use the reference sp_gen.py quality suffix and negative prompt (unless given explicitly)")
    p.add_argument("--drop-blank", type=float, default=0.01, metavar="STD",
                   help="drop images whose pixel std (in [0,1]) is below STD; 0 = keep all (default 0.01)")
    p.add_argument("--dedup", type=float, metavar="DIST", help="drop images within normalized l2 DIST of an earlier one (default off)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16: cast the model (default: as loaded)")
    p.add_argument("--device", help="torch device (default: accelerate's, CUDA when present)")
    p.add_argument("--safety-checker", action="store_true", help="keep the model's safety checker on (default off)")
    p.add_argument("--overwrite", action="store_true", help="replace a different set already in --out")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a model folder whose weights are only pickles (weights-only); refused by default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def read_domains(path: Path) -> list[str]:
    """Domain names from a JSON file: a list of names, or an object whose keys are the names."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"domains file {str(path)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"domains file {str(path)!r} is not readable JSON ({exc})") from exc
    names = list(data) if isinstance(data, (list, dict)) else None
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise InputError(f"domains file {str(path)!r} is not valid; expected a non-empty JSON list of domain names")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"domains file {str(path)!r} names {dup!r} twice; expected distinct domains")
    return names


def run(args: argparse.Namespace) -> int:
    from s2l_plugin.generate import (
        REFERENCE_NEGATIVE_PROMPT,
        REFERENCE_QUALITY_SUFFIX,
        GenerationConfig,
        generate_private_set,
        slugify,
    )

    domains = read_domains(args.domains) if args.domains else [args.domain]
    options: dict[str, Any] = dict(
        num_images=args.num_images,
        template_choice=args.template_choice,
        quality_suffix=args.quality_suffix,
        negative_prompt=args.negative_prompt,
        scheduler=args.scheduler,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        seed=args.seed,
        batch_size=args.batch_size,
        layout=args.layout,
        kohya_repeats=args.kohya_repeats,
        safety_checker=args.safety_checker,
        drop_blank=args.drop_blank or None,
        dedup=args.dedup,
        dtype=args.dtype,
        device=args.device,
    )
    if args.template:
        options["templates"] = args.template
    if args.template_weights:
        options["template_weights"] = args.template_weights
    if args.reference_style:
        if options["quality_suffix"] is None:
            options["quality_suffix"] = REFERENCE_QUALITY_SUFFIX
        if options["negative_prompt"] is None:
            options["negative_prompt"] = REFERENCE_NEGATIVE_PROMPT
    # Every config is validated, and the folders told apart, before the model loads or a file is written.
    configs = [GenerationConfig(domain=d, **options) for d in domains]
    if args.domains:
        slugs = [slugify(d) for d in domains]
        clash = next((s for s in slugs if slugs.count(s) > 1), None)
        if clash:
            raise ConfigError(f"domains {[d for d in domains if slugify(d) == clash]!r} share the folder name {clash!r}")
        outs = [args.out / s for s in slugs]
    else:
        outs = [args.out]

    from s2l_plugin.generate import _check_writable, _load_model

    for out in outs:
        _check_writable(out)
    pipe = _load_model(args.model, safety_checker=args.safety_checker, allow_pickle=args.allow_pickle, config=args.model_config)
    for config, out in zip(configs, outs, strict=True):
        result = generate_private_set(pipe, config, out, overwrite=args.overwrite, progress=not args.no_progress)
        dropped = ", ".join(f"{v} {k}" for k, v in result.dropped.items() if v) or "none"
        print(f"{config.domain}: {result.count} images in {result.image_dir} (dropped: {dropped}); manifest {result.manifest_path}")
    return 0
