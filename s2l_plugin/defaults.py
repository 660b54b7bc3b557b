"""The defaults of generation, extraction and the memorization score: one table every entry point reads.

``s2l run`` configs, ``s2l launch`` / the three-call API (``--s2l-*``), ``s2l generate``,
``s2l audit``, :class:`~s2l_plugin.context.AuditSpec`, :func:`~s2l_plugin.generate.generate_private_set`,
:func:`~s2l_plugin.audit.extraction.extract` and the memorization scores all default to these
values; docs/cli.md lists them. A config or flag that sets a value explicitly (the demo config sets
every one) is unaffected. Imports nothing heavy.

Sampler settings follow the S2L reference, which leaves diffusers' Stable Diffusion defaults in
place: 50 inference steps, classifier-free guidance 7.5, for both the synthetic set and extraction.
The memorization score follows Wen et al.: n = 4 generations, the first of 50 steps, guidance 7.5.
"""

from __future__ import annotations

#: Synthetic private set (S2L step 1): images per domain, guidance scale, sampling steps.
GENERATE_NUM_IMAGES = 200
GENERATE_GUIDANCE_SCALE = 7.5
GENERATE_NUM_INFERENCE_STEPS = 50

#: Extraction: guidance scale and sampling steps of the generations matched against the references.
EXTRACTION_GUIDANCE_SCALE = 7.5
EXTRACTION_NUM_INFERENCE_STEPS = 50

#: Memorization score (Wen et al.): generations per prompt, steps scored, sampling steps, guidance;
#: the paraphrase-relative score averages more generations (the measured setting, docs/extraction.md).
MEMORIZATION_N = 4
MEMORIZATION_STEPS = 1
MEMORIZATION_NUM_INFERENCE_STEPS = 50
MEMORIZATION_GUIDANCE_SCALE = 7.5
MEMORIZATION_RELATIVE_N = 32

#: The whole table, by the name docs/cli.md uses.
TABLE: dict[str, dict[str, float | int]] = {
    "generation": {"num_images": GENERATE_NUM_IMAGES, "guidance_scale": GENERATE_GUIDANCE_SCALE,
                   "num_inference_steps": GENERATE_NUM_INFERENCE_STEPS},
    "extraction": {"guidance_scale": EXTRACTION_GUIDANCE_SCALE, "num_inference_steps": EXTRACTION_NUM_INFERENCE_STEPS},
    "memorization": {"n": MEMORIZATION_N, "steps": MEMORIZATION_STEPS,
                     "num_inference_steps": MEMORIZATION_NUM_INFERENCE_STEPS,
                     "guidance_scale": MEMORIZATION_GUIDANCE_SCALE, "relative_n": MEMORIZATION_RELATIVE_N},
}
