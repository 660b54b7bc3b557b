"""The Adapter interface every fine-tuning method implements, and the Artifact it produces.

An adapter is registered through the ``register_adapters`` hook. The built-in trainers and
the wrapped diffusers/kohya scripts both end in an :class:`Artifact`: files on disk in the
format the community uses, which ``load`` applies to a base pipeline for auditing.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_plugin.config import check_choice, check_positive
from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.pipeline import FAMILY_NAMES

MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class TrainConfig:
    """Options shared by every built-in trainer; method-specific ones go in ``options``.

    ``options`` is validated by the adapter (:meth:`Adapter.validate_options`), which names
    unknown keys. Units: ``max_train_steps`` counts optimizer steps (after accumulation).
    """

    prompt: str = "a photo of the digit seven"
    max_train_steps: int = 100
    learning_rate: float = 1e-5
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    resolution: int | None = None  # None: the base model's sample size
    center_crop: bool = True
    random_flip: bool = False
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 1e-2
    prediction_type: str | None = None  # None: the base scheduler's
    checkpointing_steps: int = 0  # 0: no intermediate checkpoints
    resume: bool = True
    caption_from_data: bool = False  # use per-image captions (metadata.jsonl / .txt) instead of `prompt`
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_positive("max_train_steps", self.max_train_steps, integer=True)
        check_positive("learning_rate", self.learning_rate)
        check_positive("train_batch_size", self.train_batch_size, integer=True)
        check_positive("gradient_accumulation_steps", self.gradient_accumulation_steps, integer=True)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_positive("checkpointing_steps", self.checkpointing_steps, allow_zero=True, integer=True)
        if self.prediction_type is not None:
            check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.resolution is not None:
            check_positive("resolution", self.resolution, integer=True)
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError(f"prompt={self.prompt!r} is not valid; expected a non-empty string")


@dataclass
class Artifact:
    """What a fine-tuning run produced.

    ``path`` is a folder (pipeline folder, LoRA folder, ...) or a single file; ``files`` names
    the files that make up the artifact, relative to ``path`` when it is a folder.
    ``base`` is the base model the artifact applies to (a path), when known.
    """

    method: str
    path: Path
    files: list[str] = field(default_factory=list)
    base: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Artifact:
        return cls(**{**data, "path": Path(data["path"])})


def check_adapter_options(adapter: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``adapter``'s full option check (``check_options``, else ``validate_options``); a registered adapter
    with neither (it need only have the registry's required methods) takes ``options`` as given."""
    check = getattr(adapter, "check_options", None) or getattr(adapter, "validate_options", None)
    return check(options) if check is not None else dict(options)




def check_adapter_family(adapter: Any, options: dict[str, Any], family: str) -> None:
    """ConfigError, before any work, when ``adapter`` cannot train on a base of ``family``.

    An adapter states the families it trains in ``families`` (optional; without it every family
    is assumed). On SDXL, SD3 and Flux the built-in trainers keep the text encoders frozen, so a method whose
    ``train_text_encoder`` option (given or default) is on is refused there with the fix named.
    """
    from s2l_plugin.hooks.manager import collect

    families = getattr(adapter, "families", None)
    if families is not None and family not in families:
        able = sorted(n for n, a in collect("adapters").items() if family in (getattr(a, "families", None) or (family,)))
        raise ConfigError(
            f"method {adapter.name!r} does not train on an {FAMILY_NAMES.get(family, family)} base; "
            f"expected one of: {', '.join(able)}"
        )
    merged = check_adapter_options(adapter, options)
    if family != "sd" and merged.get("train_text_encoder"):
        label = FAMILY_NAMES.get(family, family)
        raise ConfigError(
            f"method {adapter.name!r} with train_text_encoder=true is not supported on an {label} base (the built-in "
            f"{label} trainers keep every text encoder frozen); expected train_text_encoder=false"
        )


class Adapter(abc.ABC):
    """One fine-tuning method: the adapter contract, what ``register_adapters`` accepts.

    Subclasses set ``name`` and implement the four operations; a registered object need not
    subclass this, but must have what the package calls (checked at registration by
    :func:`adapter_problem`; docs/hooks.md restates it):

    - ``name``: a non-empty string, unique among adapters (``--method``, ``Artifact.method``);
    - ``train(base, dataset_dir, config, output_dir) -> Artifact`` (``s2l finetune``, ``s2l run``,
      ``s2l audit --shake``);
    - ``load(base_pipeline, artifact) -> pipeline`` (every audit of a fine-tune);
    - ``script_args(script_kind, data_dir, prompt, output_dir) -> dict[str, str | None]``
      (``s2l launch`` / ``before_training``, for each kind in ``script_kinds``);
    - ``detect(output_dir) -> Artifact | None``: cheap, never raises (``after_training`` tries
      every adapter on a script's output folder).

    Optional, read with these defaults: ``script_kinds`` (a tuple of strings, ``()``),
    ``load_replaces_components`` (a bool, False), ``default_learning_rate`` (None or a positive
    number, None; ``s2l finetune`` only), ``families`` (the model families it trains on, e.g.
    ``("sd", "sdxl")``; None: any, :func:`check_adapter_family`), ``check_options(options)`` / ``validate_options(options)``
    (callables returning the checked options; without them options are taken as given,
    :func:`check_adapter_options`). ``default_options`` and ``unload`` are this class's own
    (read by :meth:`validate_options` and by tests), not part of the contract.
    """

    name: str = ""
    #: option names this method accepts in TrainConfig.options, with their defaults
    default_options: dict[str, Any] = {}
    #: The model families the method trains on (:func:`check_adapter_family`).
    families: tuple[str, ...] = ("sd",)
    #: which diffusers/kohya training scripts this adapter knows (script kind names)
    script_kinds: tuple[str, ...] = ()
    #: learning rate the CLI uses when none is given (None: TrainConfig's default)
    default_learning_rate: float | None = None
    #: True when :meth:`load` only swaps whole components into the pipeline it is given and never
    #: changes a module it finds there in place; such a method may be given a pipeline that shares
    #: the base's modules (the audit then holds one base in memory, not two)
    load_replaces_components: bool = False

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Return the options merged over the defaults; ConfigError naming any unknown key."""
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method {self.name!r}; "
                f"expected some of: {', '.join(sorted(self.default_options)) or '(none)'}"
            )
        return {**self.default_options, **options}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options merged over the defaults, every key and value checked (ConfigError naming the first
        bad one). Methods with value rules override it; every entry point calls it before any work starts."""
        return self.validate_options(options)

    @abc.abstractmethod
    def train(self, base: Any, dataset_dir: Path, config: TrainConfig, output_dir: Path) -> Artifact:
        """Fine-tune ``base`` (a pipeline or a model path) on ``dataset_dir``; write and return the artifact."""

    @abc.abstractmethod
    def script_args(self, script_kind: str, data_dir: Path, prompt: str, output_dir: Path) -> dict[str, str | None]:
        """The arguments that make training script ``script_kind`` train on ``data_dir`` (``None`` value = a flag)."""

    @abc.abstractmethod
    def load(self, base_pipeline: Any, artifact: Artifact) -> Any:
        """Apply ``artifact`` to ``base_pipeline`` and return the pipeline to audit."""

    def unload(self, pipeline: Any, artifact: Artifact) -> Any:
        """Undo :meth:`load` where the method allows it; returns the base pipeline."""
        raise NotImplementedError(f"method {self.name!r} cannot be unloaded; load a fresh base pipeline")

    @abc.abstractmethod
    def detect(self, output_dir: Path) -> Artifact | None:
        """Find this method's artifact in a training script's ``output_dir`` (None when absent)."""


#: The methods the package calls on every adapter, with the arguments it passes (positionally).
ADAPTER_CALLS: dict[str, tuple[str, ...]] = {
    "train": ("base", "dataset_dir", "config", "output_dir"),
    "load": ("base_pipeline", "artifact"),
    "script_args": ("script_kind", "data_dir", "prompt", "output_dir"),
    "detect": ("output_dir",),
}


def adapter_problem(obj: Any) -> str | None:
    """What keeps ``obj`` from being an adapter (:class:`Adapter`'s contract; one short phrase), or None."""
    from s2l_plugin.hooks.manager import call_problem

    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        return f"name must be a non-empty string, got {name!r}"
    for member, args in ADAPTER_CALLS.items():
        problem = call_problem(obj, member, args)
        if problem:
            return problem
    kinds = getattr(obj, "script_kinds", ())
    if not isinstance(kinds, (tuple, list)) or not all(isinstance(k, str) and k for k in kinds):
        return f"script_kinds must be a tuple of non-empty strings, got {kinds!r}"
    replaces = getattr(obj, "load_replaces_components", False)
    if not isinstance(replaces, bool):
        return f"load_replaces_components must be True or False, got {replaces!r}"
    rate = getattr(obj, "default_learning_rate", None)
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
        return f"default_learning_rate must be None or a positive number, got {rate!r}"
    for member in ("check_options", "validate_options"):
        if getattr(obj, member, None) is not None:
            problem = call_problem(obj, member, ("options",))
            if problem:
                return problem
    return None


# -- helpers every built-in trainer uses ----------------------------------------------------------------

#: The JSON record a built-in trainer writes next to its artifact (method, config, losses).
TRAINING_RECORD = "s2l_training.json"


def resolve_base(base: Any) -> tuple[Any, str | None]:
    """``(pipeline, base path or None)`` for ``base``: a loaded pipeline is used as is (and trained
    in place); None, "testbed" or a pipeline folder is loaded with :func:`s2l_plugin.pipeline.load_pipeline`
    (InputError for a folder that is not a diffusers pipeline)."""
    if base is None or isinstance(base, (str, Path)):
        from s2l_plugin.pipeline import load_pipeline, resolve_model_dir

        path = resolve_model_dir(base)
        return load_pipeline(path), str(path)
    if not all(hasattr(base, name) for name in ("vae", "text_encoder", "tokenizer", "scheduler")) or not (
        getattr(base, "unet", None) is not None or getattr(base, "transformer", None) is not None
    ):
        raise InputError(
            f"base {type(base).__name__} is not a text-to-image diffusion pipeline; expected a unet or transformer, "
            "vae, text_encoder, tokenizer and scheduler"
        )
    name = getattr(getattr(base, "config", None), "_name_or_path", None)
    return base, (str(name) if name else None)


def check_output_dir(output_dir: str | Path) -> Path:
    """``output_dir`` as a Path; InputError when it exists and is not a folder (nothing is created here)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {str(path)!r} exists and is not a folder; expected a folder path")
    return path


def publish(staging: Path, output_dir: Path) -> list[str]:
    """Move every entry of ``staging`` into ``output_dir`` (each by one rename, replacing what was
    there) and remove ``staging``; returns the moved names, sorted. ``staging`` must sit on the
    same filesystem (make it with :func:`staging_dir`), so readers never see half a file."""
    import shutil

    output_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    for name in names:
        target = output_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        (staging / name).replace(target)
    staging.rmdir()
    return names


def staging_dir(output_dir: Path) -> Path:
    """A fresh temporary folder beside ``output_dir`` (same filesystem), for :func:`publish`."""
    import tempfile

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))


def list_files(folder: Path, names: list[str] | None = None) -> list[str]:
    """Files under ``folder`` (or under its entries ``names``) as sorted POSIX paths relative to ``folder``."""
    roots = [folder / n for n in names] if names is not None else [folder]
    found: list[str] = []
    for root in roots:
        items = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        found.extend(p.relative_to(folder).as_posix() for p in items)
    return sorted(found)
