"""S2L in an existing training workflow: the three-call API and the default event hooks.

For an in-house training script::

    parser = argparse.ArgumentParser(); ...; s2l_plugin.add_arguments(parser)
    args = parser.parse_args()
    s2l_plugin.before_training(args)   # generates the synthetic set, points the data arguments at it
    train(args)                         # unchanged
    s2l_plugin.after_training(args)    # finds the artifact in args.output_dir, audits, writes the report

The same hooks serve ``s2l launch`` (wrapped diffusers / kohya scripts) and ``s2l run``. This
module is a built-in plugin: its hook implementations are the defaults, and they run last, so a
third-party plugin can act before them or replace what they read on ``run``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from s2l_plugin.config import DEFAULT_ATTACKS_WITH_BASE
from s2l_plugin.context import AuditSpec, Run
from s2l_plugin.defaults import GENERATE_GUIDANCE_SCALE, GENERATE_NUM_IMAGES, GENERATE_NUM_INFERENCE_STEPS
from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.hooks import hookimpl

log = logging.getLogger(__name__)

#: The generation layout each training-script kind reads.
SCRIPT_LAYOUTS = {
    "train_dreambooth": "dreambooth",
    "train_dreambooth_lora": "dreambooth",
    "textual_inversion": "textual_inversion",
    "train_text_to_image_lora": "imagefolder",
    "train_network": "kohya",
    "s2l": "imagefolder",
}
#: The attribute of an argparse namespace that holds the training output folder, per convention.
OUTPUT_DIR_ARG = "output_dir"
BASE_MODEL_ARG = "pretrained_model_name_or_path"


# -- options --------------------------------------------------------------------------------


def _parse_audit_spec(value: str) -> dict[str, str]:
    """``members=DIR,nonmembers=DIR[,prompts=FILE][,references=DIR]`` as a dict."""
    allowed = {"members", "nonmembers", "prompts", "references"}
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        key, sep, val = part.partition("=")
        if not sep or key not in allowed or not val:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not valid; expected KEY=VALUE with KEY one of {', '.join(sorted(allowed))}"
            )
        out[key] = val
    if ("members" in out) != ("nonmembers" in out):
        raise argparse.ArgumentTypeError(f"{value!r}: members= and nonmembers= go together")
    return out


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@hookimpl
def s2l_add_arguments(parser: Any) -> None:
    """The built-in S2L options (all prefixed ``--s2l-`` so they never clash with a script's own)."""
    group = parser.add_argument_group("S2L") if hasattr(parser, "add_argument_group") else parser
    group.add_argument("--s2l-domain", help="target domain: generate the synthetic private set for it before training")
    group.add_argument("--s2l-prompt", help="prompt template for the synthetic set (default: the reference templates)")
    group.add_argument("--s2l-num-images", type=int, default=GENERATE_NUM_IMAGES,
                       help=f"synthetic images to generate (default {GENERATE_NUM_IMAGES})")
    group.add_argument("--s2l-guidance", type=float, default=GENERATE_GUIDANCE_SCALE,
                       help=f"guidance scale of the synthetic set (default {GENERATE_GUIDANCE_SCALE})")
    group.add_argument("--s2l-steps", type=int, default=GENERATE_NUM_INFERENCE_STEPS,
                       help=f"sampling steps of the synthetic set (default {GENERATE_NUM_INFERENCE_STEPS})")
    group.add_argument("--s2l-seed", type=int, default=0, help="seed of generation and audit noise (default 0)")
    group.add_argument("--s2l-data-dir", help="where the synthetic set goes (default OUTPUT_DIR/s2l-private-set)")
    group.add_argument(
        "--s2l-audit", type=_parse_audit_spec, help="audit after training: members=DIR,nonmembers=DIR[,prompts=FILE]"
    )
    group.add_argument("--s2l-attacks", type=_csv, default=list(DEFAULT_ATTACKS_WITH_BASE),
                       help=f"MIA attacks (default {','.join(DEFAULT_ATTACKS_WITH_BASE)})")
    group.add_argument("--s2l-extraction", type=int, default=0, help="generations per prompt for extraction (0 = off)")
    group.add_argument("--s2l-report", type=_csv, default=["html", "markdown", "console"], help="report formats")
    group.add_argument("--s2l-report-dir", help="where the report goes (default OUTPUT_DIR/s2l-report)")
    group.add_argument("--s2l-model-card", action="store_true",
                       help="write the audit as a 'Privacy audit' section into the artifact folder's README.md")
    group.add_argument("--s2l-allow-pickle", action="store_true",
                       help="read a base model whose weights are only pickles (weights-only); refused by default")
    group.add_argument("--s2l-base-config", metavar="DIR",
                       help="when the base model is a single-file checkpoint: a local diffusers pipeline folder of the same "
                       "model family to convert it with (nothing is downloaded)")
    group.add_argument("--s2l-fail-on", metavar="EXPR",
                       help="privacy gate on the trained model's audit: exit 3 and write verdict.json when it meets a "
                       "condition, e.g. 'loss.auc.lower>0.55,extracted>0' (see docs/cli.md)")


def _namespace_layout(args: Any) -> str:
    """The generation layout an in-house script's data argument suggests (DreamBooth folders hold images only)."""
    if hasattr(args, "instance_data_dir"):
        return "dreambooth"
    if hasattr(args, "placeholder_token"):
        return "textual_inversion"
    return "imagefolder"


def _options(args: Any) -> dict[str, Any]:
    return {k[len("s2l_") :]: v for k, v in vars(args).items() if k.startswith("s2l_")}


def run_from_args(args: Any, *, adapter: str | None = None, script_kind: str = "s2l", pm: Any = None) -> Run:
    """A Run from a parsed namespace that has the S2L options (and the usual training arguments)."""
    opts = _options(args)
    if opts.get("fail_on") is not None:
        from s2l_plugin.gate import parse

        parse(opts["fail_on"], source="--s2l-fail-on")  # before anything is generated or trained
    base = getattr(args, BASE_MODEL_ARG, None)
    output_dir = getattr(args, OUTPUT_DIR_ARG, None)
    if output_dir is None:
        raise ConfigError(f"--{OUTPUT_DIR_ARG.replace('_', '-')} is required to place the synthetic set and the report")
    run = Run(
        base_model=str(base) if base is not None else None,
        domain=opts.get("domain"),
        prompt=opts.get("prompt"),
        adapter=adapter,
        output_dir=Path(output_dir),
        data_dir=Path(opts["data_dir"]) if opts.get("data_dir") else None,
        options={
            "generate": {
                "num_images": opts.get("num_images", GENERATE_NUM_IMAGES),
                "guidance_scale": opts.get("guidance", GENERATE_GUIDANCE_SCALE),
                "num_inference_steps": opts.get("steps", GENERATE_NUM_INFERENCE_STEPS),
                "seed": opts.get("seed", 0),
                "layout": SCRIPT_LAYOUTS[script_kind] if script_kind != "s2l" else _namespace_layout(args),
            },
            "report": opts.get("report", ["html", "markdown", "console"]),
            "report_dir": opts.get("report_dir"),
            "script_kind": script_kind,
            "allow_pickle": bool(opts.get("allow_pickle", False)),
            "base_config": opts.get("base_config"),
            "model_card": bool(opts.get("model_card", False)),
            "fail_on": opts.get("fail_on"),
        },
        pm=pm,
    )
    spec = opts.get("audit")
    if opts.get("model_card") and spec is None:
        raise ConfigError("--s2l-model-card needs --s2l-audit: the card reports the audit's numbers")
    if spec is not None:
        prompts: list[str] = []
        if "prompts" in spec:
            path = Path(spec["prompts"])
            if not path.is_file():
                raise InputError(f"--s2l-audit prompts={str(path)!r} does not exist; expected a text file, one prompt per line")
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        run.audit = AuditSpec(
            members=spec.get("members"),
            nonmembers=spec.get("nonmembers"),
            references=spec.get("references"),
            attacks=list(opts.get("attacks") or DEFAULT_ATTACKS_WITH_BASE),
            prompts=prompts,
            extraction=int(opts.get("extraction") or 0),
            seed=int(opts.get("seed", 0)),
        )
        from s2l_plugin.hooks.manager import get

        for name in run.audit.attacks:  # a name the audit would refuse fails now, before generating or training
            get("attacks", name, _pm(run))
    return run


def _pm(run: Run) -> Any:
    if run.pm is None:
        from s2l_plugin.hooks.manager import get_plugin_manager

        run.pm = get_plugin_manager()
    return run.pm


#: Arguments that name the training data: S2L always points them at the synthetic set.
DATA_ARGS = frozenset({"--instance_data_dir", "--train_data_dir", "--data_dir", "--dataset_config"})


def _find(argv: list[str], flag: str) -> int | None:
    for i, tok in enumerate(argv):
        if tok == flag or tok.startswith(flag + "="):
            return i
    return None


def apply_script_args(argv: list[str], updates: dict[str, str | None]) -> list[str]:
    """Point ``argv`` at the synthetic set: data arguments (:data:`DATA_ARGS`) are replaced,
    every other update is only added when the user did not give that argument.

    ``None`` as a value means a flag. Handles ``--name value`` and ``--name=value``; arguments
    not named in ``updates`` are left untouched.
    """
    out = list(argv)
    for flag, value in updates.items():
        i = _find(out, flag)
        if i is None:
            out.extend([flag] if value is None else [flag, value])
        elif flag in DATA_ARGS and value is not None:
            if out[i] == flag and i + 1 < len(out):
                out[i + 1] = value
            else:
                out[i] = f"{flag}={value}"
    return out


# -- default event hooks ----------------------------------------------------------------------


def _adapter_for(run: Run) -> Any:
    from s2l_plugin.hooks.manager import get

    if run.adapter is None:
        raise ConfigError("run.adapter=None: name the fine-tuning method (--adapter) so the data arguments can be set")
    adapter = get("adapters", run.adapter, _pm(run))
    kind = run.options.get("script_kind", "s2l")
    if kind != "s2l" and kind not in getattr(adapter, "script_kinds", ()):
        raise ConfigError(
            f"method {run.adapter!r} does not know training script kind {kind!r}; "
            f"it knows: {', '.join(getattr(adapter, 'script_kinds', ())) or '(none)'}"
        )
    return adapter


def point_data_arguments(run: Run, generated: Any) -> None:
    """Point ``run.script_args`` at a generated set (what the adapter says the script kind reads).

    Records the updates in ``run.state["script_arg_updates"]`` and the instance prompt in
    ``run.state["instance_prompt"]``; every other argument is left untouched.
    """
    adapter = _adapter_for(run)
    kind = run.options.get("script_kind", "s2l")
    run.data_dir = Path(generated.image_dir)
    # The prompt the set was generated with (when all images share one) is the instance prompt,
    # as in the reference code ("photo of <domain>" for both).
    prompt = generated.prompt or (run.prompt or "photo of {domain}").replace("{domain}", run.domain or "")
    if kind != "s2l":
        updates = adapter.script_args(kind, run.data_dir, prompt, run.output_dir)
        if run.state.get("kohya_dataset_config"):
            updates = {**updates, "--dataset_config": str(_rewrite_kohya_dataset_config(run, generated))}
        run.script_args = apply_script_args(run.script_args, updates)
        run.state["script_arg_updates"] = updates
    run.state["instance_prompt"] = prompt


def _rewrite_kohya_dataset_config(run: Run, generated: Any) -> Path:
    """A kohya ``--dataset_config`` takes precedence over ``--train_data_dir``: write the copy that trains
    on the synthetic set (:func:`s2l_plugin.kohya.rewrite_dataset_config`) into the output folder,
    atomically; returns its path. Every process writes the same bytes."""
    from s2l_plugin import kohya
    from s2l_plugin._io import atomic_write_text

    subsets = sorted(p for p in Path(generated.image_dir).iterdir() if p.is_dir())
    if len(subsets) != 1:
        raise InputError(f"synthetic set {str(generated.image_dir)!r} holds {len(subsets)} <repeats>_<name> folders; expected one")
    repeats = int(subsets[0].name.split("_", 1)[0])
    config = kohya.read_dataset_config(run.state["kohya_dataset_config"])
    text = kohya.dumps_toml(kohya.rewrite_dataset_config(
        config, subsets[0], repeats, run.state.get("kohya_caption_extension") or kohya.caption_extension(run.script_args)
    ))
    path = Path(run.output_dir) / kohya.DATASET_CONFIG_NAME
    atomic_write_text(path, text)
    return path


@hookimpl(trylast=True)
def s2l_before_training(run: Run) -> None:
    """Generate the synthetic private set for ``run.domain`` and point the data arguments at it.

    Does nothing without a domain, or when the set is already in ``run.state["private_set"]``
    (``s2l run`` generates it in a stage of its own).
    """
    if not run.domain or run.state.get("private_set") is not None:
        return
    _adapter_for(run)  # fail on a wrong method / script pairing before generating anything
    pipeline = load_run_base(run)
    generated = _pm(run).hook.s2l_generate_private_set(run=run, pipeline=pipeline)
    if generated is None:
        raise ConfigError("no plugin generated the synthetic private set (every s2l_generate_private_set returned None)")
    point_data_arguments(run, generated)


def load_run_base(run: Run) -> Any:
    """A fresh copy of the run's base model through the one loader: ``run.base_model`` (a folder, a
    single-file checkpoint with ``options["base_config"]``, or None = the testbed), with the run's
    ``allow_pickle`` opt-in."""
    from s2l_plugin.pipeline import load_pipeline

    return load_pipeline(run.base_model, allow_pickle=bool(run.options.get("allow_pickle", False)),
                         config=run.options.get("base_config"))


def report_dir(run: Run) -> Path:
    """Where a run's result and report go: ``options["report_dir"]``, else ``OUTPUT_DIR/s2l-report``."""
    return Path(run.options.get("report_dir") or (Path(run.output_dir) / "s2l-report"))


def _scannable_file(artifact: Any) -> Path | None:
    """The artifact's top-level weights file (not a pipeline folder's components), if it has one;
    a ``.safetensors`` file before a pickled copy of the same weights."""
    root = Path(artifact.path)
    if root.is_file():
        return root
    for name in sorted(artifact.files, key=lambda n: not n.endswith(".safetensors")):
        path = root / name
        if "/" not in name and path.suffix in (".safetensors", ".pt", ".bin") and path.is_file():
            return path
    return None


def audit_artifact(run: Run, artifact: Any) -> Any:
    """Audit the base and the fine-tuned ``artifact`` on the same data and noise (:func:`s2l_plugin.flow.audit_pair`);
    return the RunResult with their paired comparisons (:func:`s2l_plugin.flow.assemble_result`).

    ``s2l run`` audits the base once for all methods and hands that audit over in
    ``run.state["base_audit"]``; otherwise the base is audited here, first.
    """
    from s2l_plugin.flow import assemble_result, audit_pair, with_state
    from s2l_plugin.hooks.manager import get

    pm = _pm(run)
    adapter = get("adapters", artifact.method, pm)
    base = load_run_base(run)
    # The base is audited beside the target (as its reference), so the two must not share a module
    # the adapter changes. A method that only swaps whole components starts from a pipeline sharing
    # the base's modules; the others change modules in place (LoRA layers, new token rows,
    # attention processors) and get a base of their own.
    if getattr(adapter, "load_replaces_components", False):
        fresh = type(base).from_pipe(base)
    else:
        fresh = load_run_base(run)
    target = adapter.load(fresh, artifact)
    out_dir = str(report_dir(run))
    target_state = {**run.state, "label": artifact.method, "method": artifact.method,
                    "model_path": str(artifact.path), "out_dir": out_dir}
    weights = _scannable_file(artifact)
    if weights is not None:  # LoRA / embedding / hypernetwork files carry metadata worth scanning
        target_state["target_path"] = str(weights)
    before, after = audit_pair(
        with_state(run, label="base", out_dir=out_dir), replace(run, state=target_state), base, target,
        before=run.state.get("base_audit"),
    )
    spec = run.audit or AuditSpec()
    return assemble_result(
        run.options.get("kind", "launch"), [before, after], pairs=[(before, after, artifact.method)], spec=spec,
        config={"base_model": run.base_model, "domain": run.domain, "adapter": artifact.method,
                "report": run.options.get("report", ["html", "markdown", "console"]),
                "artifact": artifact.to_dict(), "script": run.script, "script_args": run.script_args},
        seeds={"audit": spec.seed, "generate": run.options.get("generate", {}).get("seed")},
    )


@hookimpl(trylast=True)
def s2l_after_training(run: Run, artifact: Any) -> None:
    """Audit the trained artifact against its base and write the report (when ``run.audit`` is set)."""
    if run.audit is None:
        return
    from s2l_plugin.flow import publish

    result = audit_artifact(run, artifact)
    run.state["result"] = result
    # report [] = save the result only (s2l run reports once, at the end); a tripped gate raises GateFailed
    try:
        path = publish(result, report_dir(run), _pm(run), reports=bool(run.options.get("report", True)),
                       fail_on=run.options.get("fail_on"))
    finally:  # a tripped gate still gets its card, with the verdict
        if run.options.get("model_card"):
            from s2l_plugin.model_card import write_for_run

            write_for_run(run, artifact)
    run.state["result_path"] = path


# -- the three-call API ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, *, pm: Any = None) -> argparse.ArgumentParser:
    """Add the S2L options (built-in and plugins') to ``parser``; returns it."""
    if pm is None:
        from s2l_plugin.hooks.manager import get_plugin_manager

        pm = get_plugin_manager()
    pm.hook.s2l_add_arguments.call_historic(kwargs={"parser": parser})
    return parser


def before_training(args: Any, *, adapter: str | None = None, script_kind: str = "s2l", pm: Any = None) -> Run:
    """Run the before-training hooks for a parsed namespace; the data arguments on ``args`` are updated.

    ``adapter`` names the fine-tuning method (needed with ``--s2l-domain``); the Run is kept on
    ``args`` for :func:`after_training`. ``script_kind`` says whose data layout ``args`` reads:
    "s2l" (the default) tells it from the namespace's data argument; "train_network" is a kohya
    namespace (:class:`s2l_plugin.kohya.S2LNetworkTrainerMixin`): the set is written as
    ``<repeats>_<name>/`` with captions in ``args.caption_extension``, ``args.dataset_config`` is
    replaced by a copy that trains on the set, and the artifact is looked for as kohya names it.
    """
    run = run_from_args(args, adapter=adapter, script_kind=script_kind, pm=pm)
    if script_kind == "train_network":
        from s2l_plugin import kohya

        run.state.update(kohya.namespace_state(args))
        run.options["generate"]["caption_extension"] = run.state["kohya_caption_extension"]
    _pm(run).hook.s2l_before_training(run=run)
    if run.data_dir is not None:
        for name in ("instance_data_dir", "train_data_dir", "data_dir"):
            if hasattr(args, name):
                setattr(args, name, str(run.data_dir))
        if hasattr(args, "instance_prompt") and run.state.get("instance_prompt"):
            args.instance_prompt = run.state["instance_prompt"]
        config = (run.state.get("script_arg_updates") or {}).get("--dataset_config")
        if config is not None and hasattr(args, "dataset_config"):
            args.dataset_config = type(args.dataset_config)(config) if args.dataset_config is not None else config
    args._s2l_run = run
    return run


def detect_artifact(run: Run) -> Any:
    """The artifact training left in ``run.output_dir``, found by the run's adapter (or any adapter)."""
    from s2l_plugin.hooks.manager import collect

    adapters = collect("adapters", _pm(run))
    expected = run.state.get("expected_artifact")
    if expected:  # a trainer whose artifact's file name is known (kohya's {output_name or "last"}.safetensors)
        from s2l_plugin import kohya

        if not (Path(run.output_dir) / expected).is_file():
            raise InputError(kohya.no_artifact_message(run.script or "the kohya trainer", run.output_dir, expected))
        import inspect

        adapter = adapters.get(run.adapter)
        found = None
        if adapter is not None:
            named = "weight_name" in inspect.signature(adapter.detect).parameters
            found = adapter.detect(Path(run.output_dir), weight_name=expected) if named else adapter.detect(Path(run.output_dir))
        if found is None:
            raise InputError(f"{str(Path(run.output_dir) / expected)!r} is not a LoRA {run.adapter or 'S2L'} can read; "
                             "expected a kohya .safetensors with lora_unet_/lora_te_ keys")
        found.base = found.base or run.base_model
        return found
    order = [adapters[run.adapter]] if run.adapter in adapters else list(adapters.values())
    for adapter in order:
        artifact = adapter.detect(Path(run.output_dir))
        if artifact is not None:
            artifact.base = artifact.base or run.base_model
            return artifact
    raise InputError(
        f"no trained artifact found in {str(run.output_dir)!r}; expected what "
        f"{run.adapter or 'a known method'} writes (a pipeline folder, pytorch_lora_weights.safetensors, "
        "learned_embeds.safetensors, a kohya .safetensors or a hypernetwork)"
    )


def after_training(args: Any, *, run: Run | None = None, fail_on: str | None = None, pm: Any = None) -> Any:
    """Find the artifact in ``args.output_dir``, run the after-training hooks; returns the saved result (or None).

    ``fail_on`` (else ``--s2l-fail-on``): a privacy-gate expression (:mod:`s2l_plugin.gate`); when the
    trained model's audit meets it, ``verdict.json`` says fail and :class:`~s2l_plugin.gate.GateFailed`
    is raised (its ``exit_code`` is 3; ``sys.exit(exc.exit_code)`` hands it to CI).
    """
    run = run or getattr(args, "_s2l_run", None) or run_from_args(args, pm=pm)
    if fail_on is not None:
        from s2l_plugin.gate import parse

        parse(fail_on, source="fail_on")
        run.options["fail_on"] = fail_on
    artifact = detect_artifact(run)
    _pm(run).hook.s2l_after_training(run=run, artifact=artifact)
    return run.state.get("result")


@contextmanager
def s2l_training(args: Any, *, adapter: str | None = None, pm: Any = None) -> Iterator[Run]:
    """``with s2l_training(args, adapter="lora"): train(args)`` — before and after in one statement."""
    run = before_training(args, adapter=adapter, pm=pm)
    yield run
    after_training(args, run=run)
