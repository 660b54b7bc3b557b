"""``s2l launch``: wrap an existing training script with S2L generation and auditing.

    s2l launch --s2l-domain "…" --s2l-audit members=DIR,nonmembers=DIR -- train_dreambooth_lora.py <its args>
    accelerate launch -m s2l_plugin.launch --s2l-domain "…" -- train_dreambooth_lora.py <its args>

The script runs unchanged — in this process (``runpy``, with ``sys.argv`` set, so ``accelerate
launch`` multi-process runs work) or as a subprocess (``--subprocess``). Before it, the
``s2l_before_training`` hooks generate the synthetic private set and point the script's data
argument at it; after it, ``s2l_after_training`` finds the artifact in ``--output_dir`` and
audits it against the base. In a multi-process run the hooks run on the main process while the
others wait: nothing is generated or audited twice.
"""

from __future__ import annotations

import argparse
import re
import runpy
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2l_plugin.errors import ConfigError, InputError

#: Training-script kinds, recognised by the options a script defines (all must be present),
#: most specific first: each SDXL script before its SD 1.x twin (the SDXL scripts alone define
#: diffusers' ``--pretrained_vae_model_name_or_path`` and kohya's ``--cache_text_encoder_outputs``).
#: Facts from the scripts' argparse definitions.
SCRIPT_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("sdxl_train_network", frozenset({"--network_module", "--train_data_dir", "--cache_text_encoder_outputs"})),
    ("train_network", frozenset({"--network_module", "--train_data_dir"})),
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
#: Script kinds also recognised by file name, for scripts whose options live in other modules
#: (kohya's scripts define theirs in ``library/``: the source of ``sdxl_train_network.py`` names
#: none of the options above).
SCRIPT_NAMES = {f"{kind}.py": kind for kind, _ in SCRIPT_SIGNATURES}
#: An SDXL script reads its data through the same arguments, in the same layout, as its SD 1.x
#: twin and writes the same kind of artifact; the adapters' script arguments are the twin's.
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
#: The default method for each script kind (``--adapter`` overrides).
DEFAULT_ADAPTERS = {
    "train_network": "lora",
    "textual_inversion": "textual_inversion",
    "train_dreambooth_lora": "lora_dreambooth",
    "train_dreambooth": "dreambooth",
    "train_text_to_image_lora": "lora",
}
DEFAULT_ADAPTERS.update({sdxl: DEFAULT_ADAPTERS[twin] for sdxl, twin in SDXL_TWINS.items()})
# The Flux/SD3 scripts train the transformer only unless --train_text_encoder is given: plain LoRA.
DEFAULT_ADAPTERS.update({kind: "lora" for kind in FLOW_TWINS})
_OPTION_RE = re.compile(r"""["'](--[A-Za-z0-9_\-]+)["']""")


def script_options(script: Path) -> set[str]:
    """The ``--options`` a script's source names (argparse definitions; read, never executed)."""
    try:
        source = script.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"training script {str(script)!r} cannot be read ({exc})") from exc
    return set(_OPTION_RE.findall(source))


def recognise_script(script: Path) -> str | None:
    """The script kind whose options the script defines, else the kind its file name is, else None."""
    options = script_options(script)
    for kind, needed in SCRIPT_SIGNATURES:
        if needed <= options:
            return kind
    return SCRIPT_NAMES.get(Path(script).name)


def data_contract(kind: str | None) -> str | None:
    """The script kind whose data arguments and layout ``kind`` shares (an SDXL, SD3 or Flux script's SD 1.x twin)."""
    return {**SDXL_TWINS, **FLOW_TWINS}.get(kind, kind) if kind is not None else None


def check_base_family(script: Path, kind: str | None, base: str | None) -> None:
    """ConfigError, before anything is generated, when a recognised script and its base pipeline
    folder are of different model families (an SDXL script on an SD 1.x/2.x base, a Flux script on an
    SD3 base, or the reverse).

    Read from the folder's model_index.json (:func:`s2l_plugin.pipeline.folder_family`); a single-file
    checkpoint, a hub name or an unreadable folder is not checked here (the loader or the script reports it)."""
    if kind is None or base is None or kind == "textual_inversion":  # diffusers has TI scripts for both families
        return
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


def _arg_value(argv: Sequence[str], flag: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def build_parser(pm: Any = None) -> argparse.ArgumentParser:
    from s2l_plugin.integration import add_arguments

    parser = argparse.ArgumentParser(
        prog="s2l launch",
        description="Run a training script unchanged, with S2L generation before it and an audit after it.",
        usage="s2l launch [S2L OPTIONS] -- SCRIPT.py [SCRIPT ARGS]",
    )
    parser.add_argument("--adapter", help="fine-tuning method of the script (default: recognised from its options)")
    parser.add_argument("--subprocess", action="store_true", help="run the script in a subprocess instead of in-process")
    add_arguments(parser, pm=pm)
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """S2L options before ``--``, the script and its arguments after it."""
    argv = list(argv)
    if "--" not in argv:
        raise ConfigError("expected `--` between the S2L options and the training script, e.g. s2l launch --s2l-domain X -- train.py ...")
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def prepare(argv: Sequence[str], pm: Any = None) -> Any:
    """Parse and check everything, before anything is generated; returns the Run."""
    from s2l_plugin.hooks.manager import collect, get_plugin_manager
    from s2l_plugin.integration import run_from_args

    pm = pm or get_plugin_manager()
    ours, script_part = split_argv(argv)
    if not script_part:
        raise ConfigError("no training script after `--`; expected SCRIPT.py [SCRIPT ARGS]")
    script, script_args = Path(script_part[0]), script_part[1:]
    if not script.is_file():
        raise InputError(f"training script {str(script)!r} does not exist")
    args = build_parser(pm).parse_args(ours)
    kind = recognise_script(script)
    adapters = collect("adapters", pm)
    if args.adapter is not None and args.adapter not in adapters:
        raise ConfigError(f"--adapter {args.adapter!r} is not a known method; expected one of: {', '.join(sorted(adapters))}")
    if kind is None and args.adapter is None:
        raise ConfigError(
            f"cannot tell which trainer {str(script)!r} is (its options match no known script: "
            f"{', '.join(k for k, _ in SCRIPT_SIGNATURES)}); name the method with --adapter"
        )
    adapter_name = args.adapter or DEFAULT_ADAPTERS[kind]
    adapter = adapters[adapter_name]
    contract = data_contract(kind)
    if args.s2l_domain and (contract is None or contract not in getattr(adapter, "script_kinds", ())):
        described = f"a {kind} script" + (f" (data arguments as {contract})" if contract != kind else "")
        raise ConfigError(
            f"--s2l-domain needs a data argument the {adapter_name!r} adapter knows, but script {str(script)!r} "
            f"is {'not a known trainer' if kind is None else described}; "
            f"the adapter knows: {', '.join(getattr(adapter, 'script_kinds', ())) or '(no scripts)'}"
        )
    ns = argparse.Namespace(**vars(args))
    ns.pretrained_model_name_or_path = _arg_value(script_args, "--pretrained_model_name_or_path")
    ns.output_dir = _arg_value(script_args, "--output_dir")
    if ns.output_dir is None:
        raise ConfigError("the training script's --output_dir is required: the artifact and the report are looked for there")
    if args.s2l_domain and ns.pretrained_model_name_or_path is None:
        raise ConfigError("--s2l-domain needs the script's --pretrained_model_name_or_path to generate the synthetic set")
    check_base_family(script, kind, ns.pretrained_model_name_or_path)
    run = run_from_args(ns, adapter=adapter_name, script_kind=contract or "s2l", pm=pm)
    run.script = str(script)
    run.script_args = list(script_args)
    run.state["subprocess"] = bool(args.subprocess)
    return run


def _run_script(run: Any) -> None:
    if run.state.get("subprocess"):
        proc = subprocess.run([sys.executable, run.script, *run.script_args])
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
