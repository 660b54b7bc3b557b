"""The extractor contract: what ``register_extractors`` accepts and the audit calls.

The built-in extractor (``carlini``) is :class:`s2l_plugin.audit.extraction.CarliniExtractor`;
this module only states the contract (:class:`Extractor`, restated in docs/hooks.md) and checks
it (:func:`extractor_problem`, called at registration by ``s2l_plugin.hooks.manager.collect``).
It imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

#: What the audit passes to ``extract``: these positionally ...
EXTRACT_ARGS = ("pipeline", "prompts", "n_per_prompt", "references")
#: ... and these by keyword.
EXTRACT_KEYWORDS = ("guidance_scale", "num_inference_steps", "seed", "grid_path")


class Extractor(Protocol):
    """A training-data extraction method (``AuditSpec.extractor``, default ``carlini``).

    - ``name``: a non-empty string, unique among extractors.
    - ``extract(pipeline, prompts, n_per_prompt, references, *, guidance_scale, num_inference_steps,
      seed, grid_path) -> ExtractionResult``, called once per audited model by
      ``s2l_plugin.audit.api.audit_model`` when the audit asks for extraction, with

      - ``pipeline``: the audited diffusers pipeline;
      - ``prompts``: a non-empty ``list[str]``; ``n_per_prompt``: generations per prompt (an int);
      - ``references``: the reference (private / member) images — an image folder or a list of
        ``ImageRecord`` — or None when the audit has none;
      - ``guidance_scale`` (float), ``num_inference_steps`` (int), ``seed`` (int) and ``grid_path``
        (where to draw the matches grid, a ``Path``, or None: draw none).

      It returns an ``s2l_plugin.result.ExtractionResult``.
    """

    name: str

    def extract(
        self,
        pipeline: Any,
        prompts: Sequence[str],
        n_per_prompt: int,
        references: Any = None,
        *,
        guidance_scale: float,
        num_inference_steps: int,
        seed: int,
        grid_path: Path | None,
    ) -> Any: ...


def extractor_problem(obj: Any) -> str | None:
    """What keeps ``obj`` from being an :class:`Extractor` (one short phrase), or None when it is one."""
    from s2l_plugin.hooks.manager import call_problem

    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        return f"name must be a non-empty string, got {name!r}"
    return call_problem(obj, "extract", EXTRACT_ARGS, EXTRACT_KEYWORDS)
