"""Data-free memorization detection (Wen, Liu, Chen, Lyu, ICLR 2024).

A memorized prompt steers the denoiser strongly from the very first sampling steps, whatever the
starting noise: the text-conditional part of the noise prediction is large. The score of a prompt
is the magnitude

    d_t = ‖ε_θ(x_t, prompt) − ε_θ(x_t, ∅)‖₂

(ℓ2 norm over the whole latent tensor, unnormalized, as Wen et al.'s ``track_noise_norm``),
averaged over the first ``steps`` sampling steps and ``n`` generations. **Higher = more memorized.**
It needs no training data, so it can audit a checkpoint someone else trained.

On a flow-matching model (SD3, Flux) the same magnitude is taken on the velocity prediction,
``d_t = ‖v_θ(x_t, prompt) − v_θ(x_t, ∅)‖₂``, sampling with the model's own flow-matching Euler
scheduler (Flux: its resolution-dependent shift, as FluxPipeline sets it). SD3 samples with
classifier-free guidance like SD. Flux.1-dev is guidance-distilled and has no unconditional
branch: ∅ is the empty prompt through the same conditional path, with the same guidance
embedding (``guidance_scale``), so d_t measures how far the prompt moves the velocity from the
empty prompt's; its sampling follows the conditional velocity alone, as FluxPipeline does.

Sampling follows the pipeline's scheduler with classifier-free guidance (``guidance_scale``), so
``x_t`` at step t is what a normal generation would see; image ``i`` of a prompt starts from the
recorded seed ``image_seed(seed, prompt, i)`` (the derivation of :mod:`s2l_plugin.generate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from s2l_plugin.config import check_positive
from s2l_plugin.defaults import (
    MEMORIZATION_GUIDANCE_SCALE,
    MEMORIZATION_N,
    MEMORIZATION_NUM_INFERENCE_STEPS,
    MEMORIZATION_RELATIVE_N,
    MEMORIZATION_STEPS,
)
from s2l_plugin.result import MemorizationResult, MemorizationScore

#: Wen et al.'s defaults, from the one defaults table: 4 generations, 50 DDIM steps, guidance 7.5; the
#: score uses the first step only by default, which the paper reports is already enough.
DEFAULT_N = MEMORIZATION_N
DEFAULT_STEPS = MEMORIZATION_STEPS
DEFAULT_INFERENCE_STEPS = MEMORIZATION_NUM_INFERENCE_STEPS
DEFAULT_GUIDANCE = MEMORIZATION_GUIDANCE_SCALE
#: Generations per prompt of the relative score (measured on the testbed, docs/extraction.md).
RELATIVE_N = MEMORIZATION_RELATIVE_N


def memorization_scores(
    pipeline: Any,
    prompts: Sequence[str] | str,
    *,
    n: int = DEFAULT_N,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    progress: bool = True,
) -> MemorizationResult:
    """Wen et al.'s memorization score of every prompt (higher = more memorized).

    For each prompt, ``n`` generations run the first ``steps`` of ``num_inference_steps`` sampling
    steps; ``score`` is the mean of d_t over those steps and generations, ``per_step`` the mean over
    generations at each step. ConfigError for no prompts, ``n`` < 1 or ``steps`` outside
    ``[1, num_inference_steps]``.
    """
    import torch

    from s2l_plugin.audit.extraction import _check_prompts
    from s2l_plugin.conditioning import cat, encode_guidance_pair, unet_forward
    from s2l_plugin.errors import ConfigError
    from s2l_plugin.generate import image_seed
    from s2l_plugin.progress import progress_bar

    prompts = _check_prompts(prompts)
    check_positive("n", n, integer=True)
    check_positive("steps", steps, integer=True)
    check_positive("num_inference_steps", num_inference_steps, integer=True)
    check_positive("guidance_scale", guidance_scale, allow_zero=True)
    check_positive("seed", seed, integer=True, allow_zero=True)
    if steps > num_inference_steps:
        raise ConfigError(f"steps={steps} is not valid; expected at most num_inference_steps={num_inference_steps}")

    from s2l_plugin.conditioning import FlowCondition, default_resolution, denoiser, vae_factor

    unet = denoiser(pipeline)
    device = unet.device
    dtype = unet.dtype
    # A private scheduler: set_timesteps mutates state that the pipeline's own calls rely on.
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    height = width = default_resolution(pipeline)
    scores: list[MemorizationScore] = []
    for prompt in progress_bar(prompts, desc="memorization score", unit="prompt", disable=not progress, leave=False):
        with torch.inference_mode():
            cond, uncond = encode_guidance_pair(pipeline, prompt, device, n, resolution=height)
            generators = [torch.Generator("cpu").manual_seed(image_seed(seed, prompt, i)) for i in range(n)]
            if isinstance(cond, FlowCondition):
                from diffusers.utils.torch_utils import randn_tensor

                side = height // vae_factor(pipeline)
                latents = randn_tensor((n, int(pipeline.vae.config.latent_channels), side, side), generator=generators,
                                       device=device, dtype=cond.dtype)
                _flow_timesteps(scheduler, num_inference_steps, side, device)
                if cond.family == "flux":
                    cond.guidance = uncond.guidance = float(guidance_scale)
            else:
                latents = pipeline.prepare_latents(n, unet.config.in_channels, height, width, cond.dtype, device, generators)
                scheduler.set_timesteps(num_inference_steps, device=device)
            embeds = cat([uncond, cond]).to(dtype)
            per_step: list[float] = []
            per_image = torch.zeros(n, dtype=torch.float64)
            for t in scheduler.timesteps[:steps]:
                pair = torch.cat([latents, latents])
                model_in = scheduler.scale_model_input(pair, t) if hasattr(scheduler, "scale_model_input") else pair
                eps_uncond, eps_cond = unet_forward(unet, model_in, t, embeds).sample.chunk(2)
                magnitude = (eps_cond - eps_uncond).float().flatten(1).norm(dim=1).double().cpu()
                per_image += magnitude
                per_step.append(float(magnitude.mean()))
                if isinstance(cond, FlowCondition) and cond.family == "flux":
                    guided = eps_cond  # guidance-distilled: the guidance is in the embedding
                else:
                    guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = scheduler.step(guided, t, latents).prev_sample
        scores.append(MemorizationScore(prompt=prompt, score=float((per_image / steps).mean()), per_step=per_step))
    return MemorizationResult(
        scores=scores,
        steps=steps,
        n_generations=n,
        params={
            "seed": seed,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "units": "l2 norm over the latent tensor of eps(x_t, prompt) - eps(x_t, empty prompt)"
            + (" (velocity, not eps, on a flow-matching model)" if unet is not getattr(pipeline, "unet", None) else ""),
        },
    )


def _flow_timesteps(scheduler: Any, steps: int, latent_side: int, device: Any) -> None:
    """Set a flow-matching scheduler's sampling timesteps as SD3/Flux pipelines do: sigmas
    ``linspace(1, 1/steps)``, and for a resolution-shifted scheduler (Flux) the shift ``mu`` of the
    image's packed sequence length (diffusers' ``calculate_shift``)."""
    import numpy as np

    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler.config
        mu = calculate_shift((latent_side // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device)


def relative_memorization_scores(
    pipeline: Any,
    paraphrases: Mapping[str, Sequence[str]],
    *,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, float]:
    """Each prompt's memorization score divided by the mean score of its paraphrases (higher = more memorized).

    ``paraphrases`` maps a prompt to other wordings of the same subject ("a photo of the digit
    seven" → ["a handwritten digit seven", ...]). The raw magnitude also grows with how far the
    subject's images lie from the average image, a property of the subject, not of memorization;
    a paraphrase names the same subject, so the ratio keeps what is specific to the exact wording:
    well above 1 = this wording steers harder than its paraphrases, as the caption of duplicated
    training images does. Data-free like the raw score: the same model, the same settings
    (``kwargs`` go to :func:`memorization_scores`, each prompt's starting noise derives from it),
    except ``n`` defaults to :data:`RELATIVE_N` generations: a ratio of two 4-sample means is noisy
    (docs/extraction.md: ranking AUC 0.72-0.86 at n = 4, 0.87-1.00 at n = 32 on the testbed).
    ConfigError for no prompts, a prompt without paraphrases, or a paraphrase equal to its prompt.
    """
    from s2l_plugin.audit.extraction import _check_prompts
    from s2l_plugin.errors import ConfigError

    if not isinstance(paraphrases, Mapping):
        raise ConfigError(f"paraphrases={paraphrases!r} is not valid; expected a mapping prompt -> list of paraphrases")
    wordings: dict[str, list[str]] = {}
    for prompt in _check_prompts(list(paraphrases)):
        others = paraphrases[prompt]
        others = [others] if isinstance(others, str) else list(others or [])
        if not others:
            raise ConfigError(f"paraphrases[{prompt!r}]=[] is not valid; expected at least one other wording of the prompt")
        if prompt in others:
            raise ConfigError(f"paraphrases[{prompt!r}] lists the prompt itself; expected other wordings only")
        wordings[prompt] = _check_prompts(others)
    kwargs.setdefault("n", RELATIVE_N)
    everything = list(dict.fromkeys([*wordings, *(p for others in wordings.values() for p in others)]))
    score = {s.prompt: s.score for s in memorization_scores(pipeline, everything, progress=progress, **kwargs).scores}
    out = {}
    for prompt, others in wordings.items():
        base = sum(score[p] for p in others) / len(others)
        out[prompt] = score[prompt] / base if base > 0 else float("inf")
    return out
