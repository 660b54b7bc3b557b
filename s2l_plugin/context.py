"""The object every event hook receives as ``run``: one S2L run's settings and state.

The same Run flows through ``s2l run``, ``s2l launch``, ``s2l audit`` and the Python API, so
a plugin sees the same shape whichever way the user came in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_plugin.config import DEFAULT_ATTACKS_WITH_BASE
from s2l_plugin.defaults import EXTRACTION_GUIDANCE_SCALE, EXTRACTION_NUM_INFERENCE_STEPS


@dataclass
class AuditSpec:
    """What to audit, read by the default ``s2l_audit`` implementation (``run.audit``).

    - ``members`` / ``nonmembers``: image folders (captions from metadata.jsonl / .txt) or
      lists of ``s2l_plugin.data.ImageRecord``; both None = no membership inference;
    - ``member_groups``: optional named subsets of member indices (e.g. ``{"duplicated": [...]}``)
      for per-subset metrics;
    - ``attacks``: MIA attack names from the registry (default ``s2l_plugin.config.DEFAULT_ATTACKS_WITH_BASE``;
      attacks that need a reference model are left out where there is none, e.g. the base's own audit);
    - ``prompts``: prompts for extraction and the memorization score (empty = domain prompt);
    - ``extraction``: generations per prompt (0 = no extraction), by the registered extractor
      ``extractor`` (default "carlini"); ``extraction_guidance`` and
      ``extraction_steps`` its sampler settings; ``references``: images generations are matched
      against (default: the members);
    - ``memorization``: compute the data-free memorization score;
    - ``latent``: how the attacks encode images, ``"mean"`` (default) or ``"sample"`` (one
      posterior draw seeded per image; see ``DiffusionModel.encode_images``);
    - ``seed``: every noise draw and generation seed derives from it, so a before/after pair
      sees identical noise.
    """

    members: Any = None
    nonmembers: Any = None
    member_groups: dict[str, list[int]] = field(default_factory=dict)
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS_WITH_BASE))
    prompts: list[str] = field(default_factory=list)
    extraction: int = 0
    extractor: str = "carlini"
    extraction_guidance: float = EXTRACTION_GUIDANCE_SCALE
    extraction_steps: int = EXTRACTION_NUM_INFERENCE_STEPS
    references: Any = None
    memorization: bool = True
    seed: int = 0
    latent: str = "mean"


@dataclass
class Run:
    """One S2L run.

    - ``base_model``: path of the pretrained pipeline (or single-file checkpoint);
    - ``domain`` / ``prompt``: the target domain and the prompt its synthetic set uses;
    - ``adapter``: the fine-tuning method's name;
    - ``output_dir``: where training writes its artifact (the report goes here too);
    - ``data_dir``: the synthetic private set, once generated;
    - ``script`` / ``script_args``: a wrapped training script and its argument list
      (``s2l_before_training`` may rewrite ``script_args``);
    - ``options``: S2L options (generation, audit) as parsed;
    - ``audit``: what the after-training audit measures (:class:`AuditSpec`);
    - ``state``: what stages record for later ones (paths, results).
    """

    base_model: str | None = None
    domain: str | None = None
    prompt: str | None = None
    adapter: str | None = None
    output_dir: Path | None = None
    data_dir: Path | None = None
    script: str | None = None
    script_args: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    audit: AuditSpec | None = None
    state: dict[str, Any] = field(default_factory=dict)
    pm: Any = None
