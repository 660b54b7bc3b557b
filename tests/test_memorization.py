"""Wen et al. memorization score: what it computes, its input checks, and that it flags duplicated domains."""

from __future__ import annotations

import pytest
import torch

from s2l_plugin.audit.memorization import memorization_scores, relative_memorization_scores
from s2l_plugin.errors import ConfigError

PROMPT = "a photo of the digit one"


def test_score_is_the_text_conditional_noise_magnitude_at_the_first_step(tiny_pipeline):
    from s2l_plugin.generate import image_seed

    result = memorization_scores(tiny_pipeline, [PROMPT], n=2, steps=1, seed=3, num_inference_steps=10, progress=False)
    pipe = tiny_pipeline
    # The same quantity computed by hand from the pipeline's parts.
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 2, True)
    gens = [torch.Generator().manual_seed(image_seed(3, PROMPT, i)) for i in range(2)]
    latents = pipe.prepare_latents(2, 4, 16, 16, cond.dtype, "cpu", gens)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    t = sched.timesteps[0]
    with torch.no_grad():
        e_u = pipe.unet(latents, t, encoder_hidden_states=uncond).sample
        e_c = pipe.unet(latents, t, encoder_hidden_states=cond).sample
    want = (e_c - e_u).flatten(1).norm(dim=1).mean().item()
    assert result.scores[0].score == pytest.approx(want, rel=1e-4)
    assert result.scores[0].per_step == [pytest.approx(want, rel=1e-4)]
    assert result.steps == 1 and result.n_generations == 2


def test_scores_are_deterministic_and_average_the_steps(tiny_pipeline):
    a = memorization_scores(tiny_pipeline, [PROMPT, "a photo of the digit two"], n=2, steps=3, num_inference_steps=5, progress=False)
    b = memorization_scores(tiny_pipeline, [PROMPT, "a photo of the digit two"], n=2, steps=3, num_inference_steps=5, progress=False)
    assert [s.score for s in a.scores] == [s.score for s in b.scores]
    for s in a.scores:
        assert len(s.per_step) == 3
        assert s.score == pytest.approx(sum(s.per_step) / 3, rel=1e-6)
        assert s.score > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, r"prompts=\[\] is not valid"),
        ({"n": 0}, "n=0 is not valid"),
        ({"steps": 6}, "steps=6 is not valid; expected at most num_inference_steps=5"),
    ],
)
def test_bad_input_is_a_config_error(tiny_pipeline, kwargs, message):
    args = {"prompts": [PROMPT], "n": 1, "steps": 1, "num_inference_steps": 5, "progress": False} | kwargs
    prompts = args.pop("prompts")
    with pytest.raises(ConfigError, match=message):
        memorization_scores(tiny_pipeline, prompts, **args)


def test_relative_score_is_the_prompt_score_over_the_mean_of_its_paraphrases(tiny_pipeline):
    others = ["a handwritten digit one", "a scan of the number one"]
    kw = {"n": 2, "steps": 2, "num_inference_steps": 5, "seed": 1}
    rel = relative_memorization_scores(tiny_pipeline, {PROMPT: others, "a photo of the digit two": "a handwritten digit two"},
                                       progress=False, **kw)
    raw = {s.prompt: s.score for s in memorization_scores(
        tiny_pipeline, [PROMPT, *others, "a photo of the digit two", "a handwritten digit two"], progress=False, **kw).scores}
    assert rel[PROMPT] == pytest.approx(raw[PROMPT] / ((raw[others[0]] + raw[others[1]]) / 2), rel=1e-9)
    assert rel["a photo of the digit two"] == pytest.approx(raw["a photo of the digit two"] / raw["a handwritten digit two"], rel=1e-9)
    assert list(rel) == [PROMPT, "a photo of the digit two"]


@pytest.mark.parametrize(
    ("paraphrases", "message"),
    [
        ({}, r"prompts=\[\] is not valid"),
        ({PROMPT: []}, r"paraphrases\['a photo of the digit one'\]=\[\] is not valid; expected at least one other wording"),
        ({PROMPT: [PROMPT]}, r"paraphrases\['a photo of the digit one'\] lists the prompt itself"),
        ({PROMPT: ["x", "x"]}, r"repeat a prompt"),
        ([PROMPT], r"paraphrases=\['a photo of the digit one'\] is not valid; expected a mapping"),
    ],
)
def test_relative_score_refuses_bad_paraphrases_before_any_model_call(paraphrases, message):
    with pytest.raises(ConfigError, match=message):
        relative_memorization_scores(object(), paraphrases, progress=False)


@pytest.fixture(scope="session")
def contrast_testbed(load_benchmark):
    """The testbed recipe with duplicated members in some domains only (cached in .s2l-cache/)."""
    cal = load_benchmark("extraction_calibration")
    return cal.build_contrast_testbed(cal.contrast_cache_dir(), progress=False)


@pytest.mark.xfail(
    strict=True,
    reason="measured negative: AUC 0.50 on the 1600-step contrast testbed (0.94 on the same recipe at 800 steps); "
    "0.50 again when built and scored with AVX2 kernels instead of AVX-512; see docs/extraction.md",
)
def test_prompts_of_domains_with_duplicated_members_score_higher(contrast_testbed, load_benchmark):
    cal = load_benchmark("extraction_calibration")
    tb = contrast_testbed
    result = memorization_scores(tb.load_pipeline(), [d.prompt for d in tb.domains], progress=False)
    dup = {d.prompt for d in tb.domains if tb.duplicates(d)}
    assert 0 < len(dup) < len(tb.domains)
    pos = [s.score for s in result.scores if s.prompt in dup]
    neg = [s.score for s in result.scores if s.prompt not in dup]
    # Threshold fixed before measuring. With 4 vs 4 prompts a random ranking reaches AUC >= 0.8 with
    # probability 7/70 = 0.1, so this is a coarse check; docs/extraction.md gives the measured AUC.
    assert cal.auc(pos, neg) >= 0.8


def test_relative_score_defaults_to_32_generations(tiny_pipeline):
    from s2l_plugin.audit.memorization import RELATIVE_N

    kw = {"steps": 1, "num_inference_steps": 3}
    prompts = {PROMPT: ["a handwritten digit one"]}
    assert RELATIVE_N == 32
    assert relative_memorization_scores(tiny_pipeline, prompts, progress=False, **kw) == relative_memorization_scores(
        tiny_pipeline, prompts, progress=False, n=RELATIVE_N, **kw)
    assert relative_memorization_scores(tiny_pipeline, prompts, progress=False, **kw) != relative_memorization_scores(
        tiny_pipeline, prompts, progress=False, n=4, **kw)
