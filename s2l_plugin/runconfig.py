"""The ``s2l run`` configuration: one TOML file, validated, with ``--set key=value`` overrides.

Every key is checked: an unknown key or a bad value is a ConfigError naming it. The config
is recorded in the result, and its parts key the run's resumable stages.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_plugin.config import DEFAULT_ATTACKS_WITH_BASE, check_choice, check_positive, from_dict
from s2l_plugin.defaults import (
    EXTRACTION_GUIDANCE_SCALE,
    EXTRACTION_NUM_INFERENCE_STEPS,
    GENERATE_GUIDANCE_SCALE,
    GENERATE_NUM_IMAGES,
    GENERATE_NUM_INFERENCE_STEPS,
)
from s2l_plugin.errors import ConfigError, InputError

SHIPPED_CONFIGS = Path(__file__).parent / "configs"
EXTRACTION_REFERENCES = ("members", "all")


@dataclass
class GenerateSection:
    num_images: int = GENERATE_NUM_IMAGES
    guidance_scale: float = GENERATE_GUIDANCE_SCALE
    num_inference_steps: int = GENERATE_NUM_INFERENCE_STEPS
    batch_size: int = 64
    scheduler: str = "ddim"
    negative_prompt: str = ""
    templates: list[str] = field(default_factory=list)  # empty: the generator's default

    def __post_init__(self) -> None:
        check_positive("generate.num_images", self.num_images, integer=True)
        check_positive("generate.guidance_scale", self.guidance_scale)
        check_positive("generate.num_inference_steps", self.num_inference_steps, integer=True)
        check_positive("generate.batch_size", self.batch_size, integer=True)


@dataclass
class AuditSection:
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS_WITH_BASE))
    extraction: int = 128  # generations per prompt; 0 = off
    extraction_guidance: float = EXTRACTION_GUIDANCE_SCALE
    extraction_steps: int = EXTRACTION_NUM_INFERENCE_STEPS
    memorization: bool = True
    #: what extraction matches generations against: "members", or "all" (members and non-members,
    #: so a hit on a non-member is seen as one: a generation counts for its nearest image)
    extraction_references: str = "members"
    #: how the attacks encode an image: the VAE posterior "mean" or one seeded "sample"
    latent: str = "mean"

    def __post_init__(self) -> None:
        from s2l_plugin.audit.mia.engine import LATENTS

        check_choice("audit.extraction_references", self.extraction_references, EXTRACTION_REFERENCES)
        check_choice("audit.latent", self.latent, LATENTS)
        check_positive("audit.extraction", self.extraction, allow_zero=True, integer=True)
        check_positive("audit.extraction_steps", self.extraction_steps, integer=True)
        if not self.attacks:
            raise ConfigError("audit.attacks=[] is not valid; expected at least one attack name")


@dataclass
class DataSection:
    """Member / non-member images for a base model that is not the testbed (one domain), and two
    folders that change an experiment's data (each may contain ``{domain}``, replaced by the domain's name):

    - ``private_set``: fine-tune on these images (with the domain prompt) instead of generating the
      synthetic set — a control arm of real images; the generate stage is then not run;
    - ``extra_nonmembers``: images appended to each domain's non-members in every audit (captions
      from their metadata.jsonl / .txt, else the domain prompt).
    """

    members: str | None = None
    nonmembers: str | None = None
    private_set: str | None = None
    extra_nonmembers: str | None = None

    def folder(self, name: str, domain: str) -> str | None:
        """``private_set`` / ``extra_nonmembers`` for ``domain`` (``{domain}`` filled in), or None when unset."""
        value = getattr(self, name)
        return None if value is None else value.replace("{domain}", domain)


@dataclass
class GateSection:
    """The privacy gate (``s2l run --fail-on EXPR`` sets ``fail_on``); empty = no gate."""

    fail_on: str = ""

    def __post_init__(self) -> None:
        if self.fail_on:
            from s2l_plugin.gate import parse

            parse(self.fail_on, source="gate.fail_on")


@dataclass
class RunConfig:
    """A whole S2L experiment: generate → fine-tune with each method → audit before and after."""

    out: str = "s2l-runs/run"
    base: str = "testbed"
    seed: int = 0
    domains: list[str] = field(default_factory=lambda: ["seven"])
    methods: list[str] = field(default_factory=lambda: ["dreambooth", "lora"])
    generate: GenerateSection = field(default_factory=GenerateSection)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields, plus [train.methods.<name>]
    audit: AuditSection = field(default_factory=AuditSection)
    data: DataSection = field(default_factory=DataSection)
    gate: GateSection = field(default_factory=GateSection)
    report: list[str] = field(default_factory=lambda: ["html", "markdown", "console"])
    #: read a base model folder that holds only pickled weights (weights-only); refused by default
    allow_pickle: bool = False
    #: when ``base`` is a single-file checkpoint: a local diffusers folder of the same family to convert it with
    base_config: str | None = None

    def __post_init__(self) -> None:
        for name, cls in (("generate", GenerateSection), ("audit", AuditSection), ("data", DataSection), ("gate", GateSection)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_dict(cls, value))
        if not self.domains:
            raise ConfigError("domains=[] is not valid; expected at least one domain")
        if not self.methods:
            raise ConfigError("methods=[] is not valid; expected at least one fine-tuning method")
        if not self.uses_testbed and not (self.data.members and self.data.nonmembers):
            raise ConfigError(
                f"base={self.base!r} is not a testbed, so [data] members and nonmembers folders are required"
            )
        if not self.uses_testbed and len(self.domains) != 1:
            raise ConfigError(f"domains={self.domains!r}: with your own member/non-member folders, give exactly one domain")

    @property
    def uses_testbed(self) -> bool:
        """True for "testbed" (the shipped one) or a built testbed folder (it has a testbed manifest)."""
        return self.base == "testbed" or (Path(self.base) / "manifest.json").is_file() and (Path(self.base) / "pipeline").is_dir()

    def train_for(self, method: str) -> dict[str, Any]:
        """TrainConfig fields for ``method``: the [train] table with [train.methods.<method>] over it."""
        common = {k: v for k, v in self.train.items() if k != "methods"}
        per_method = dict(self.train.get("methods", {}).get(method, {}))
        return {**common, **per_method}


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values in TOML syntax; bare words are strings)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not valid; expected KEY=VALUE, e.g. generate.num_images=200")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a table")
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a run config TOML file, with ``--set`` overrides applied."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{str(path)!r} is not valid TOML ({exc})") from exc
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(RunConfig, data)
    except TypeError as exc:  # a value of the wrong shape for a table
        raise ConfigError(f"{str(path)!r}: {exc}") from exc
