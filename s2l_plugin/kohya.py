"""kohya-ss/sd-scripts' contract, as ``s2l launch`` needs it (facts read from sd-scripts, no code of it).

- **What a script is**, read from its source with :mod:`ast` (never executed), because kohya's
  scripts define their options in ``library/`` and name few of them in their own file:
  ``train_network.py`` defines ``class NetworkTrainer``; ``sdxl_train_network.py`` and
  ``flux_train_network.py`` ``import train_network`` and subclass ``train_network.NetworkTrainer``,
  importing ``library.sdxl_*`` / ``library.flux_*``; the fine-tuning scripts ``fine_tune.py`` and
  ``sdxl_train.py`` import kohya's ``library`` package and define a ``train(args)`` function.
  An in-house subclass of a ``NetworkTrainer`` is recognised as the trainer it subclasses.
- **Data.** ``--train_data_dir`` is the parent of ``<repeats>_<name>/`` folders, a caption file beside
  each image in ``--caption_extension`` (default ``.caption``). A ``--dataset_config`` TOML takes
  precedence over ``--train_data_dir`` (kohya only warns that it ignores the latter).
- **Artifact.** ``{--output_name or "last"}.{--save_model_as}`` (default ``safetensors``) in
  ``--output_dir``; epoch checkpoints are ``NAME-000001.safetensors`` beside it.
- **No data.** With no image found, the network trainers log "No data found" and return: the process
  exits 0 and writes no artifact.
- **Metadata.** ``ss_*`` keys and SAI ``modelspec.*`` keys in the safetensors header; with
  ``--no_metadata`` only ``SS_METADATA_MINIMUM_KEYS`` (``ss_v2``, ``ss_base_model_version``,
  ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_network_args``).
"""

from __future__ import annotations

import ast
import json
import math
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2l_plugin.errors import InputError

#: kohya script kinds S2L recognises, with what they are.
KOHYA_KINDS = {
    "train_network": "kohya LoRA/network trainer for SD 1.x/2.x (train_network.py, a NetworkTrainer subclass)",
    "sdxl_train_network": "kohya network trainer for SDXL (sdxl_train_network.py)",
    "flux_train_network": "kohya network trainer for Flux (flux_train_network.py)",
    "fine_tune": "kohya full fine-tuning for SD 1.x/2.x (fine_tune.py)",
    "sdxl_train": "kohya full fine-tuning for SDXL (sdxl_train.py)",
}
#: The network-trainer kind of each model family S2L recognises (kohya's own family names: its trainer
#: classes ``SdxlNetworkTrainer``, its ``library.strategy_sdxl`` modules). Others (SD3, Lumina, Anima,
#: HunyuanImage) are kohya trainers S2L does not recognise.
_FAMILY_KINDS = {"": "train_network", "sd": "train_network", "sdxl": "sdxl_train_network", "flux": "flux_train_network"}

DEFAULT_CAPTION_EXTENSION = ".caption"
DEFAULT_OUTPUT_NAME = "last"
DEFAULT_SAVE_MODEL_AS = "safetensors"
#: The folder file written for a rewritten ``--dataset_config`` (inside the training ``--output_dir``).
DATASET_CONFIG_NAME = "s2l-dataset-config.toml"
#: Subset keys that say where data is and how it is read; the synthetic subset sets its own.
_DATA_KEYS = frozenset({"image_dir", "metadata_file", "class_tokens", "is_reg", "num_repeats", "caption_extension",
                        "conditioning_data_dir", "cache_info"})


def arg_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag value`` or ``--flag=value``; the last one wins, as in argparse)."""
    found = None
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            found = argv[i + 1]
        elif tok.startswith(flag + "="):
            found = tok.split("=", 1)[1]
    return found


def config_file_values(script_args: Sequence[str]) -> dict[str, Any]:
    """The arguments a kohya ``--config_file`` TOML gives (``.toml`` added when missing, tables flattened
    as kohya flattens them); {} without one. kohya parses the command line over them, so a value given
    on the command line wins. InputError (one line) when the file is missing or not TOML."""
    name = arg_value(script_args, "--config_file")
    if not name:
        return {}
    path = Path(name if name.endswith(".toml") else name + ".toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--config_file {name!r} does not exist ({str(path)!r}); expected kohya's training config TOML") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"--config_file {name!r} is not readable TOML ({exc}); expected kohya's training config") from exc
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def run_value(script_args: Sequence[str], flag: str, config: dict[str, Any] | None = None) -> str | None:
    """A kohya run's value of ``flag``: the command line's, else its ``--config_file``'s (``config``)."""
    value = arg_value(script_args, flag)
    if value is None and config:
        found = config.get(flag.lstrip("-"))
        value = None if found is None else str(found)
    return value


# -- recognition ------------------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _imports(tree: ast.AST) -> set[str]:
    """Every module (and ``module.name``) the source imports, absolute imports only."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _network_family(classes: list[ast.ClassDef], imports: set[str]) -> str:
    """The model family of a network trainer's source, most specific evidence first: the trainer class it
    defines or subclasses (``FluxNetworkTrainer`` → ``flux``), else the ``library.strategy_<family>``
    module it imports (each kohya trainer imports its own; SDXL's also imports SD's), else the family
    trainer module it imports (``sdxl_train_network``), else ``sdxl`` for an ``sdxl_*`` utility module,
    else SD 1.x/2.x (``""``)."""
    suffix = "NetworkTrainer"
    for cls in classes:
        for name in (cls.name, *(_dotted(b).rsplit(".", 1)[-1] for b in cls.bases)):
            if name.endswith(suffix) and name != suffix:
                return name[: -len(suffix)].lower()
    leaves = {name.rsplit(".", 1)[-1] for name in imports}
    strategies = {leaf[len("strategy_"):] for leaf in leaves if leaf.startswith("strategy_")} - {"base"}
    if strategies - {"sd"}:
        return sorted(strategies - {"sd"})[0]
    if strategies:
        return "sd"
    trainers = {leaf[: -len("_train_network")] for leaf in leaves if leaf.endswith("_train_network")}
    if trainers:
        return sorted(trainers)[0]
    # SDXL's utilities (library.sdxl_train_util, …) are imported by the SDXL scripts only; the other
    # families import each other's (Flux's and SD3's both import sd3_train_utils and flux_utils).
    return "sdxl" if any(leaf.startswith("sdxl_") for leaf in leaves) else ""


def kohya_kind(source: str, file_name: str = "") -> str | None:
    """The kohya script kind (:data:`KOHYA_KINDS`) ``source`` is, by its structure; None when it is not one.

    A network trainer defines ``class NetworkTrainer``, subclasses a ``…NetworkTrainer`` or imports
    ``train_network`` / ``…_train_network``; its family is that of the trainer class it defines or
    subclasses (``SdxlNetworkTrainer``, ``FluxNetworkTrainer``), else of the ``library.strategy_*``
    module it imports, else SD 1.x/2.x. A network trainer of a family S2L does not recognise (SD3,
    Lumina, …) is None. The fine-tuning scripts import ``library`` and are told apart by
    ``file_name`` (``fine_tune.py`` / ``sdxl_train.py``): kohya has several such scripts (DreamBooth,
    Textual Inversion, ControlNet) with the same imports.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    imports = _imports(tree)
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    trainers = [c for c in classes
                if c.name.endswith("NetworkTrainer") or any(_dotted(b).endswith("NetworkTrainer") for b in c.bases)]
    imports_trainer = any(leaf == "train_network" or leaf.endswith("_train_network")
                          for leaf in (name.rsplit(".", 1)[-1] for name in imports))
    if trainers or imports_trainer:
        return _FAMILY_KINDS.get(_network_family(trainers, imports))
    if "library" in {name.split(".")[0] for name in imports}:
        return {"fine_tune.py": "fine_tune", "sdxl_train.py": "sdxl_train"}.get(Path(file_name).name)
    return None


# -- contract facts -----------------------------------------------------------------------------


def caption_extension(script_args: Sequence[str], config: dict[str, Any] | None = None) -> str:
    """The caption extension the run reads: ``--caption_extension`` (command line, else ``--config_file``),
    else kohya's default ``.caption``."""
    return run_value(script_args, "--caption_extension", config) or DEFAULT_CAPTION_EXTENSION


def artifact_name(script_args: Sequence[str], config: dict[str, Any] | None = None) -> str:
    """The file kohya writes at the end of training: ``{--output_name or "last"}.{--save_model_as}``
    (command line, else ``--config_file``)."""
    name = run_value(script_args, "--output_name", config) or DEFAULT_OUTPUT_NAME
    return f"{name}.{run_value(script_args, '--save_model_as', config) or DEFAULT_SAVE_MODEL_AS}"


def no_artifact_message(script: str, output_dir: str | Path, name: str) -> str:
    """The one-line error for a kohya run that exited 0 without writing its artifact."""
    return (
        f"{script if script == 'the kohya trainer' else 'training script ' + repr(script)} exited 0 but wrote no {str(Path(output_dir) / name)!r}; kohya's trainers "
        "exit 0 without training when they find no images ('No data found'): --train_data_dir must be the parent "
        "of <repeats>_<name>/ folders of images (a --dataset_config takes precedence over it)"
    )


# -- --dataset_config ---------------------------------------------------------------------------


def read_dataset_config(path: str | Path) -> dict[str, Any]:
    """A kohya ``--dataset_config`` TOML as a dict; InputError (one line) when it is missing or not TOML,
    or has no ``[[datasets]]`` table."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--dataset_config {str(path)!r} does not exist; expected kohya's dataset config TOML") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"--dataset_config {str(path)!r} is not readable TOML ({exc}); expected kohya's dataset config") from exc
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise InputError(f"--dataset_config {str(path)!r} has no [[datasets]] table; expected kohya's dataset config TOML")
    return data


def rewrite_dataset_config(config: dict[str, Any], subset_dir: str | Path, repeats: int, caption_ext: str) -> dict[str, Any]:
    """The dataset config that trains on the synthetic set and nothing else.

    ``[general]`` and the first dataset's settings (resolution, batch size, buckets) are kept; its
    subsets become one: ``image_dir`` = the ``<repeats>_<name>`` folder of the set, ``num_repeats``,
    ``caption_extension``, and the first training subset's reading options (``shuffle_caption``,
    ``keep_tokens``, ``flip_aug``, …). Other datasets and regularisation subsets are dropped: the
    synthetic set replaces the training data.
    """
    first = dict(config["datasets"][0])
    subsets = [s for s in first.get("subsets") or [] if isinstance(s, dict) and not s.get("is_reg")]
    subset = {k: v for k, v in (subsets[0] if subsets else {}).items() if k not in _DATA_KEYS}
    subset.update(image_dir=str(subset_dir), num_repeats=int(repeats), caption_extension=caption_ext)
    first["subsets"] = [subset]
    out = {k: v for k, v in config.items() if k != "datasets"}
    out["datasets"] = [first]
    return out


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v, where)}" for k, v in value.items()) + "}"
    raise InputError(f"--dataset_config value {value!r} at {where} cannot be written back; expected TOML scalars, arrays and tables")


def dumps_toml(data: dict[str, Any]) -> str:
    """TOML text for a dict of tables, arrays of tables and scalars (what tomllib reads back equal)."""
    lines: list[str] = []

    def table(prefix: str, body: dict[str, Any], header: str | None) -> None:
        if header is not None:
            lines.append(header)
        nested = []
        for key, value in body.items():
            name = json.dumps(key)
            if isinstance(value, dict):
                nested.append((key, value, False))
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                nested.append((key, value, True))
            else:
                lines.append(f"{name} = {_toml_value(value, prefix + key)}")
        for key, value, many in nested:
            path = f"{prefix}{json.dumps(key)}"
            lines.append("")
            if many:
                for i, item in enumerate(value):
                    if i:
                        lines.append("")
                    table(path + ".", item, f"[[{path}]]")
            else:
                table(path + ".", value, f"[{path}]")

    table("", data, None)
    return "\n".join(lines).lstrip("\n") + "\n"


# -- in-process: a NetworkTrainer subclass --------------------------------------------------------


def namespace_state(args: Any) -> dict[str, Any]:
    """The kohya contract of a parsed kohya namespace, as ``run.state`` keys: the artifact's file name,
    the caption extension the run reads and its ``--dataset_config`` (checked to be readable TOML)."""
    fmt = getattr(args, "save_model_as", None) or DEFAULT_SAVE_MODEL_AS
    state: dict[str, Any] = {
        "expected_artifact": f"{getattr(args, 'output_name', None) or DEFAULT_OUTPUT_NAME}.{fmt}",
        "kohya_caption_extension": getattr(args, "caption_extension", None) or DEFAULT_CAPTION_EXTENSION,
    }
    config = getattr(args, "dataset_config", None)
    if config is not None:
        read_dataset_config(config)
        state["kohya_dataset_config"] = str(config)
    return state


class S2LNetworkTrainerMixin:
    """S2L around a kohya ``NetworkTrainer``'s ``train(args)``, for in-house kohya pipelines::

        import train_network
        from s2l_plugin.kohya import S2LNetworkTrainerMixin

        class S2LNetworkTrainer(S2LNetworkTrainerMixin, train_network.NetworkTrainer):
            pass

        parser = train_network.setup_parser()
        s2l_plugin.add_arguments(parser)           # the --s2l-* options
        args = parser.parse_args()
        S2LNetworkTrainer().train(args)

    ``train(args)`` generates the synthetic set (with ``--s2l-domain``) in kohya's layout and points
    ``args.train_data_dir`` at it (and ``args.dataset_config`` at a rewritten copy when one is given),
    runs the trainer's own ``train(args)`` unchanged, then finds ``{output_name or "last"}.safetensors``
    and audits it (with ``--s2l-audit``). The Run is ``self.s2l_run``; the saved result ``self.s2l_result``.
    Mix it in before the trainer class (SD 1.x, SDXL: ``sdxl_train_network.SdxlNetworkTrainer``).
    One process: under ``accelerate launch`` with several processes, use ``s2l launch`` instead.
    """

    #: The S2L method the trainer's network is audited as.
    s2l_adapter = "lora"

    def train(self, args: Any) -> Any:
        from s2l_plugin.integration import after_training, before_training

        self.s2l_run = before_training(args, adapter=self.s2l_adapter, script_kind="train_network")
        out = super().train(args)  # type: ignore[misc]
        self.s2l_result = after_training(args, run=self.s2l_run)
        return out
