"""``s2l launch``: wrap an existing training script with S2L generation and auditing.

    s2l launch --s2l-domain "…" --s2l-audit members=DIR,nonmembers=DIR -- train_dreambooth_lora.py <its args>
    s2l launch --python /path/to/kohya/venv/bin/python --s2l-domain "…" -- train_network.py <its args>
    s2l launch --python /path/to/kohya/venv/bin/python … -- accelerate launch train_network.py <its args>
    accelerate launch -m s2l_plugin.launch --s2l-domain "…" -- train_dreambooth_lora.py <its args>

The script runs unchanged — in this process (``runpy``, with ``sys.argv`` set, so ``accelerate
launch`` multi-process runs work) or as a child process: with ``--subprocess``, with ``--python
INTERPRETER`` (the trainer's own environment, e.g. kohya's venv, which need not be able to import
this package) or when the command after ``--`` starts with a launcher (``accelerate launch …``).
Before it, the ``s2l_before_training`` hooks generate the synthetic private set and point the
script's data argument at it; after it, ``s2l_after_training`` finds the artifact in
``--output_dir`` and audits it against the base. The hooks always run in this process. In a
multi-process run the hooks run on the main process while the others wait: nothing is generated
or audited twice.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2l_plugin import kohya
from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.kohya import KOHYA_KINDS, arg_value, kohya_kind

#: diffusers training-script kinds, recognised by the options a script defines (all must be present),
#: most specific first: each SDXL script before its SD 1.x twin (the SDXL scripts alone define
#: ``--pretrained_vae_model_name_or_path``). Facts from the scripts' argparse definitions. kohya's
#: scripts define their options in ``library/`` and are recognised by their structure instead
#: (:func:`s2l_plugin.kohya.kohya_kind`).
SCRIPT_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("textual_inversion", frozenset({"--placeholder_token", "--initializer_token", "--train_data_dir"})),
    # The flow-matching LoRA scripts: Flux's alone defines the distilled --guidance_scale with the
    # --weighting_scheme both have; SD3's alone --precondition_outputs.
    ("train_dreambooth_lora_flux",
     frozenset({"--instance_data_dir", "--instance_prompt", "--rank", "--weighting_scheme", "--guidance_scale"})),
    ("train_dreambooth_lora_sd3",
     frozenset({"--instance_data_dir", "--instance_prompt", "--rank", "--weighting_scheme", "--precondition_outputs"})),
    ("train_dreambooth_lora_sdxl",
     frozenset({"--instance_data_dir", "--instance_prompt", "--rank", "--pretrained_vae_model_name_or_path"})),
    ("train_dreambooth_lora", frozenset({"--instance_data_dir", "--instance_prompt", "--rank"})),
    ("train_dreambooth", frozenset({"--instance_data_dir", "--instance_prompt"})),
    ("train_text_to_image_lora_sdxl",
     frozenset({"--train_data_dir", "--caption_column", "--rank", "--pretrained_vae_model_name_or_path"})),
    ("train_text_to_image_lora", frozenset({"--train_data_dir", "--caption_column", "--rank"})),
)
#: Every script kind S2L recognises: the diffusers ones above, then kohya's.
SCRIPT_KINDS: tuple[str, ...] = tuple(k for k, _ in SCRIPT_SIGNATURES) + tuple(KOHYA_KINDS)
#: Script kinds also recognised by file name, when neither the options nor the structure tell.
SCRIPT_NAMES = {f"{kind}.py": kind for kind in SCRIPT_KINDS}
#: An SDXL (or Flux) script reads its data through the same arguments, in the same layout, as its
#: SD 1.x twin and writes the same kind of artifact; the adapters' script arguments are the twin's.
SDXL_TWINS = {
    "sdxl_train_network": "train_network",
    "train_dreambooth_lora_sdxl": "train_dreambooth_lora",
    "train_text_to_image_lora_sdxl": "train_text_to_image_lora",
}
#: The same for the flow-matching DreamBooth LoRA scripts: instance folder and prompt, ``pytorch_lora_weights.safetensors``.
FLOW_TWINS = {
    "train_dreambooth_lora_flux": "train_dreambooth_lora",
    "train_dreambooth_lora_sd3": "train_dreambooth_lora",
}
#: The model family each script kind trains (:data:`s2l_plugin.pipeline.PIPELINE_CLASSES`); every other kind trains "sd".
SCRIPT_FAMILIES = {**{kind: "sdxl" for kind in SDXL_TWINS}, "train_dreambooth_lora_flux": "flux", "train_dreambooth_lora_sd3": "sd3"}
DATA_TWINS = {**SDXL_TWINS, **FLOW_TWINS, "flux_train_network": "train_network"}
#: Recognised kinds whose data S2L cannot generate or whose base it cannot load, and why.
NO_S2L_DATA = {
    "fine_tune": "kohya's fine_tune.py reads its captions from an --in_json metadata file, which S2L does not write",
    "sdxl_train": "S2L does not yet audit the full SDXL checkpoint kohya's sdxl_train.py writes",
    "flux_train_network": (
        "kohya's flux_train_network.py takes a single-file Flux transformer (BFL layout), which S2L cannot load as a base yet; "
        "audit the LoRA it writes with s2l audit --base <a diffusers FluxPipeline folder> --lora FILE"
    ),
}
#: The default method for each script kind (``--adapter`` overrides).
DEFAULT_ADAPTERS = {
    "train_network": "lora",
    "textual_inversion": "textual_inversion",
    "train_dreambooth_lora": "lora_dreambooth",
    "train_dreambooth": "dreambooth",
    "train_text_to_image_lora": "lora",
    "flux_train_network": "lora",
    "fine_tune": "dreambooth",
    "sdxl_train": "dreambooth",
}
DEFAULT_ADAPTERS.update({sdxl: DEFAULT_ADAPTERS[twin] for sdxl, twin in SDXL_TWINS.items()})
# The Flux/SD3 scripts train the transformer only unless --train_text_encoder is given: plain LoRA.
DEFAULT_ADAPTERS.update({kind: "lora" for kind in FLOW_TWINS})
#: Kinds of kohya's network trainers, whose artifact is ``{output_name or "last"}.safetensors``.
KOHYA_NETWORK_KINDS = ("train_network", "sdxl_train_network", "flux_train_network")
_OPTION_RE = re.compile(r"""["'](--[A-Za-z0-9_\-]+)["']""")


def script_options(script: Path) -> set[str]:
    """The ``--options`` a script's source names (argparse definitions; read, never executed)."""
    return set(_OPTION_RE.findall(_read_source(script)))


def _read_source(script: Path) -> str:
    try:
        return script.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"training script {str(script)!r} cannot be read ({exc})") from exc


def recognise_script(script: Path) -> str | None:
    """The script kind of ``script``, read from its source (never executed): the diffusers kind whose
    options it defines, else the kohya kind its structure is (:func:`s2l_plugin.kohya.kohya_kind`),
    else the kind its file name is, else None."""
    source = _read_source(script)
    options = set(_OPTION_RE.findall(source))
    for kind, needed in SCRIPT_SIGNATURES:
        if needed <= options:
            return kind
    return kohya_kind(source, Path(script).name) or SCRIPT_NAMES.get(Path(script).name)


def unknown_script_message(script: Path) -> str:
    """The one-line error for a script S2L cannot recognise: what is recognised and how to say the kind."""
    return (
        f"cannot tell which trainer {str(script)!r} is; recognised: diffusers {', '.join(k + '.py' for k, _ in SCRIPT_SIGNATURES)} "
        "(by the options they define) and kohya sd-scripts train_network.py / NetworkTrainer subclasses, "
        "sdxl_train_network.py, flux_train_network.py, fine_tune.py, sdxl_train.py (by their imports and classes); "
        f"say which with --s2l-script-kind KIND (one of {', '.join(SCRIPT_KINDS)}) or name the method with --adapter"
    )


def data_contract(kind: str | None) -> str | None:
    """The script kind whose data arguments and layout ``kind`` shares (an SDXL, SD3 or Flux script's SD 1.x twin)."""
    return DATA_TWINS.get(kind, kind) if kind is not None else None


def check_base_family(script: Path, kind: str | None, base: str | None) -> None:
    """ConfigError, before anything is generated, when a recognised script and its base pipeline
    folder are of different model families (an SDXL script on an SD 1.x/2.x base, a Flux script on an
    SD3 base, or the reverse).

    Read from the folder's model_index.json (:func:`s2l_plugin.pipeline.folder_family`); a single-file
    checkpoint, a hub name or an unreadable folder is not checked here (the loader or the script reports it)."""
    if kind is None or base is None or kind == "textual_inversion" or kind in NO_S2L_DATA:
        return  # diffusers has TI scripts for both families; S2L neither generates nor audits NO_S2L_DATA kinds
    from s2l_plugin.pipeline import FAMILY_NAMES, PIPELINE_CLASSES, folder_family

    family = folder_family(base)
    wants = SCRIPT_FAMILIES.get(kind, "sd")
    if family is not None and family != wants:
        # The script of the base's family that reads the same data, when there is one.
        contract = data_contract(kind)
        twin = next((k for k, c in {**SDXL_TWINS, **FLOW_TWINS}.items() if c == contract and SCRIPT_FAMILIES[k] == family), None)
        if twin is None and family == "sd" and contract != kind:
            twin = contract
        cls = {v: k for k, v in PIPELINE_CLASSES.items()}
        fix = f"use {twin}.py for this base" if twin else f"expected a {cls[wants]} folder"
        raise ConfigError(
            f"training script {str(script)!r} is {kind}, which trains {FAMILY_NAMES[wants]}, "
            f"but --pretrained_model_name_or_path {base!r} is a {cls[family]}; {fix}"
        )


_arg_value = arg_value


def build_parser(pm: Any = None) -> argparse.ArgumentParser:
    from s2l_plugin.integration import add_arguments

    parser = argparse.ArgumentParser(
        prog="s2l launch",
        description="Run a training script unchanged, with S2L generation before it and an audit after it.",
        usage="s2l launch [S2L OPTIONS] -- [LAUNCHER …] SCRIPT.py [SCRIPT ARGS]",
    )
    parser.add_argument("--adapter", help="fine-tuning method of the script (default: recognised from its options)")
    parser.add_argument("--subprocess", action="store_true", help="run the script in a subprocess instead of in-process")
    parser.add_argument("--python", metavar="INTERPRETER",
                        help="run the script with this Python (the trainer's own environment, e.g. kohya's venv/bin/python); "
                        "a launcher after -- (accelerate launch …) is looked for beside it first")
    parser.add_argument("--s2l-script-kind", choices=SCRIPT_KINDS, metavar="KIND",
                        help=f"what the training script is, when it cannot be recognised: one of {', '.join(SCRIPT_KINDS)}")
    add_arguments(parser, pm=pm)
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """S2L options before ``--``, the script and its arguments after it."""
    argv = list(argv)
    if "--" not in argv:
        raise ConfigError("expected `--` between the S2L options and the training script, e.g. s2l launch --s2l-domain X -- train.py ...")
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def split_command(command: Sequence[str]) -> tuple[list[str], Path, list[str]]:
    """The command after ``--`` as (launcher, script, script arguments).

    ``train.py ARGS`` has no launcher; ``accelerate launch [ITS OPTIONS] train.py ARGS`` (or ``python
    train.py``) has the tokens before the first ``*.py`` as its launcher. ConfigError when no ``*.py``
    is there."""
    command = list(command)
    if not command:
        raise ConfigError("no training script after `--`; expected SCRIPT.py [SCRIPT ARGS]")
    for i, tok in enumerate(command):
        if tok.endswith(".py"):
            return command[:i], Path(tok), command[i + 1 :]
    raise ConfigError(
        f"no training script in {' '.join(command[:4])!r}…; expected SCRIPT.py [SCRIPT ARGS] or LAUNCHER … SCRIPT.py [SCRIPT ARGS] after `--`"
    )


def child_command(run: Any) -> list[str] | None:
    """The command line of the script's child process, or None to run it in this process.

    A launcher runs the script (its first word looked for beside ``--python`` first, so ``accelerate``
    is the trainer environment's); else ``--python`` or, with ``--subprocess``, this interpreter does."""
    launcher = list(run.state.get("launcher") or [])
    python = run.state.get("python")
    if launcher:
        if python and "/" not in launcher[0]:
            beside = Path(python).parent / launcher[0]
            if beside.is_file():
                launcher[0] = str(beside)
        return [*launcher, run.script, *run.script_args]
    if python or run.state.get("subprocess"):
        return [python or sys.executable, run.script, *run.script_args]
    return None


def prepare(argv: Sequence[str], pm: Any = None) -> Any:
    """Parse and check everything, before anything is generated; returns the Run."""
    from s2l_plugin.hooks.manager import collect, get_plugin_manager
    from s2l_plugin.integration import run_from_args

    pm = pm or get_plugin_manager()
    ours, script_part = split_argv(argv)
    launcher, script, script_args = split_command(script_part)
    if not script.is_file():
        raise InputError(f"training script {str(script)!r} does not exist")
    args = build_parser(pm).parse_args(ours)
    if args.python is not None and not (Path(args.python).is_file() and os.access(args.python, os.X_OK)):
        raise InputError(f"--python {args.python!r} is not an executable file; expected the trainer environment's python")
    kind = args.s2l_script_kind or recognise_script(script)
    adapters = collect("adapters", pm)
    if args.adapter is not None and args.adapter not in adapters:
        raise ConfigError(f"--adapter {args.adapter!r} is not a known method; expected one of: {', '.join(sorted(adapters))}")
    if kind is None and args.adapter is None:
        raise ConfigError(unknown_script_message(script))
    if kind in NO_S2L_DATA and (args.s2l_domain or args.s2l_audit):
        raise ConfigError(f"training script {str(script)!r} is {kind}: {NO_S2L_DATA[kind]}, so --s2l-domain and --s2l-audit cannot be used with it")
    adapter_name = args.adapter or DEFAULT_ADAPTERS[kind]
    adapter = adapters[adapter_name]
    contract = data_contract(kind)
    if args.s2l_domain and (contract is None or contract not in getattr(adapter, "script_kinds", ())):
        described = f"a {kind} script" + (f" (data arguments as {contract})" if contract != kind else "")
        raise ConfigError(
            f"--s2l-domain needs a data argument the {adapter_name!r} adapter knows, but script {str(script)!r} "
            f"is {'not a known trainer (say which with --s2l-script-kind)' if kind is None else described}; "
            f"the adapter knows: {', '.join(getattr(adapter, 'script_kinds', ())) or '(no scripts)'}"
        )
    ns = argparse.Namespace(**vars(args))
    # kohya's scripts may take their arguments from a --config_file TOML (the command line wins)
    config = kohya.config_file_values(script_args) if kind in KOHYA_KINDS else {}
    ns.pretrained_model_name_or_path = kohya.run_value(script_args, "--pretrained_model_name_or_path", config)
    ns.output_dir = kohya.run_value(script_args, "--output_dir", config)
    if ns.output_dir is None:
        raise ConfigError("the training script's --output_dir is required: the artifact and the report are looked for there")
    if args.s2l_domain and ns.pretrained_model_name_or_path is None:
        raise ConfigError("--s2l-domain needs the script's --pretrained_model_name_or_path to generate the synthetic set")
    check_base_family(script, kind, ns.pretrained_model_name_or_path)
    kohya_state = _check_kohya_contract(script_args, args, config) if kind in KOHYA_NETWORK_KINDS else {}
    run = run_from_args(ns, adapter=adapter_name, script_kind=contract or "s2l", pm=pm)
    run.script = str(script)
    run.script_args = list(script_args)
    run.state["subprocess"] = bool(args.subprocess)
    run.state["launcher"] = launcher
    run.state["python"] = args.python
    run.state["script_kind"] = kind
    run.state.update(kohya_state)
    if "kohya_caption_extension" in kohya_state:
        run.options["generate"]["caption_extension"] = kohya_state["kohya_caption_extension"]
    return run


def _check_kohya_contract(script_args: Sequence[str], args: Any, config: dict[str, Any]) -> dict[str, Any]:
    """What a kohya network trainer's run will read and write, checked before anything is generated:
    the caption extension, the artifact's file name and a ``--dataset_config`` that is readable TOML
    (each from the command line, else from the run's ``--config_file``)."""
    fmt = kohya.run_value(script_args, "--save_model_as", config) or kohya.DEFAULT_SAVE_MODEL_AS
    if args.s2l_audit and fmt != "safetensors":
        raise ConfigError(f"--save_model_as {fmt!r} is not auditable; expected safetensors (S2L reads no pickled LoRA)")
    state: dict[str, Any] = {"expected_artifact": kohya.artifact_name(script_args, config),
                             "kohya_caption_extension": kohya.caption_extension(script_args, config)}
    dataset_config = kohya.run_value(script_args, "--dataset_config", config)
    if dataset_config is not None:
        kohya.read_dataset_config(dataset_config)  # InputError now, not after generating
        state["kohya_dataset_config"] = dataset_config
    return state


def _run_script(run: Any) -> None:
    command = child_command(run)
    if command is not None:
        try:
            proc = subprocess.run(command)
        except OSError as exc:
            raise InputError(f"training command {command[0]!r} cannot be started ({exc})") from exc
        if proc.returncode != 0:
            raise InputError(f"training script {run.script!r} exited with code {proc.returncode}")
        return
    old_argv = sys.argv
    sys.argv = [run.script, *run.script_args]
    script_dir = str(Path(run.script).resolve().parent)
    sys.path.insert(0, script_dir)
    try:
        runpy.run_path(run.script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise InputError(f"training script {run.script!r} exited with code {exc.code}") from exc
    finally:
        sys.argv = old_argv
        if script_dir in sys.path:
            sys.path.remove(script_dir)


def launch(argv: Sequence[str], pm: Any = None) -> Any:
    """Generate (main process) → run the script → audit (main process). Returns the Run."""
    run = prepare(argv, pm)  # before accelerate is imported: a bad option fails at once

    from accelerate import PartialState

    from s2l_plugin._dist import check_joined, cpu_launch
    from s2l_plugin.gate import GateFailed
    from s2l_plugin.integration import detect_artifact

    # Joined as generation and training join, so that on a CPU-only multi-process launch one main
    # process generates and audits (a plain PartialState() made every copy a lone "main").
    state = PartialState(cpu=cpu_launch())
    check_joined(state.num_processes)
    if state.is_main_process:
        run.pm.hook.s2l_before_training(run=run)
    state.wait_for_everyone()
    if not state.is_main_process and run.domain:
        # The main process generated the set; the others point their arguments at the same files.
        from s2l_plugin.generate import default_out_dir, load_generated_set
        from s2l_plugin.integration import point_data_arguments

        point_data_arguments(run, load_generated_set(default_out_dir(run)))
    _run_script(run)
    state.wait_for_everyone()
    tripped = None
    if state.is_main_process:
        artifact = detect_artifact(run)
        try:
            run.pm.hook.s2l_after_training(run=run, artifact=artifact)
        except GateFailed as exc:  # --s2l-fail-on: the other processes still reach the barrier below
            tripped = exc
    state.wait_for_everyone()
    if tripped is not None:
        raise tripped
    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m s2l_plugin.launch`` (what ``accelerate launch -m`` runs)."""
    from s2l_plugin.errors import S2LError

    try:
        launch(sys.argv[1:] if argv is None else argv)
    except S2LError as exc:
        print(f"s2l launch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
