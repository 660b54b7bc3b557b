"""Flow-matching families end to end on tiny pipelines built in code (Flux.1's and SD3's layouts: a
transformer denoiser predicting the velocity ε − x0, CLIP + a character-level T5): the one loader
opens their folders; `s2l generate`, `s2l finetune --method lora`, `s2l audit` (every attack,
extraction, memorization) and `s2l run` with lora each run on them; the LoRA trained here is what
diffusers loads; what cannot train on them is refused by name before any work; and the
transformer call every stage makes is the one the pipeline makes itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from s2l_plugin.cli import main
from s2l_plugin.conditioning import (
    FlowCondition,
    cat,
    encode_guidance_pair,
    encode_prompts,
    stack,
    unet_forward,
)
from s2l_plugin.testbed.components import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

BUILDERS = {"flux": build_tiny_flux_pipeline, "sd3": build_tiny_sd3_pipeline}
FAMILIES = sorted(BUILDERS)


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for family, build in BUILDERS.items():
        folder = tmp_path_factory.mktemp(family) / "base"
        build(seed=0).save_pretrained(folder)
        out[family] = folder
    return out


@pytest.fixture(scope="module")
def flow_loras(flow_dirs, test_testbed, tmp_path_factory) -> dict[str, Path]:
    """A LoRA trained by `s2l finetune --method lora` on each base (3 steps)."""
    out = {}
    data = test_testbed.path / "members" / "seven"
    for family, base in flow_dirs.items():
        folder = tmp_path_factory.mktemp(f"{family}-lora") / "lora"
        assert main(["finetune", "--method", "lora", "--model", str(base), "--data", str(data), "--out", str(folder),
                     "--steps", "3", "--batch-size", "4", "--lr", "1e-2"]) == 0
        out[family] = folder
    return out


def _images(tb, role: str) -> Path:
    return tb.path / role / "seven"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_one_loader_opens_the_folder(family, flow_dirs):
    from s2l_plugin.pipeline import load_pipeline, model_family

    pipe = load_pipeline(flow_dirs[family])
    assert type(pipe).__name__ == {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[family]
    assert model_family(flow_dirs[family]) == model_family(pipe) == family


@pytest.mark.parametrize("family", FAMILIES)
def test_the_transformer_call_is_what_the_pipeline_makes(family):
    """Hook the transformer during a pipeline call and call it again through unet_forward with the
    same latents (unpacked), timestep and prompt: identical outputs."""
    pipe = BUILDERS[family]()
    seen: list[tuple[dict, torch.Tensor]] = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out[0])), with_kwargs=True)
    extra = {"guidance_scale": 1.0} if family == "sd3" else {}  # SD3 without CFG: one prompt row per call
    try:
        pipe(prompt=["a photo of seven"], height=16, width=16, num_inference_steps=2, output_type="latent",
             generator=torch.Generator().manual_seed(0), **extra)
    finally:
        hook.remove()
    kw, out = seen[-1]
    with torch.no_grad():
        cond = encode_prompts(pipe, ["a photo of seven"], "cpu")
    assert isinstance(cond, FlowCondition)
    assert torch.allclose(cond.hidden, kw["encoder_hidden_states"], atol=1e-6, rtol=0)
    assert torch.allclose(cond.pooled, kw["pooled_projections"], atol=1e-6, rtol=0)
    if family == "flux":
        from diffusers import FluxPipeline

        latents = FluxPipeline._unpack_latents(kw["hidden_states"], 8, 8, 1)
        timestep = kw["timestep"] * 1000  # FluxPipeline passes σ; unet_forward takes σ·1000 for every family
        expected = FluxPipeline._unpack_latents(out, 8, 8, 1)
        assert float(kw["guidance"][0]) == cond.guidance == 3.5  # FluxPipeline's default, the audit's value
    else:
        latents, timestep, expected = kw["hidden_states"], kw["timestep"], out
    with torch.no_grad():
        ours = unet_forward(pipe.transformer, latents, timestep, cond).sample
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0), (ours - expected).abs().max()
    # Slicing, repeating, stacking and concatenating keep the parts aligned.
    two = encode_prompts(pipe, ["a photo of seven", "a photo of one"], "cpu")
    rep = two.repeat_interleave(3)
    assert len(rep) == 6 and torch.equal(rep[3:6].hidden, two.hidden[1:2].repeat(3, 1, 1))
    assert torch.equal(stack([two[1], two[0]]).pooled, two.pooled.flip(0))
    assert torch.equal(cat([two, two[:1]]).pooled, torch.cat([two.pooled, two.pooled[:1]]))
    c, u = encode_guidance_pair(pipe, "a photo of seven", "cpu", 2)
    assert len(c) == len(u) == 2 and not torch.equal(c.hidden, u.hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_writes_a_set(family, flow_dirs, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(flow_dirs[family]), "--domain", "seven", "--num-images", "3", "--steps", "4",
                 "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(list((out / "images").glob("*.png"))) == 3, manifest
    assert manifest["sampler"]["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_ddpm_sampler_is_refused_on_a_flow_model(family, flow_dirs, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(flow_dirs[family]), "--domain", "seven", "--num-images", "1",
                 "--scheduler", "dpm", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scheduler='dpm'" in err[0] and "flow-matching" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_lora_loads_as_diffusers_loads_it(family, flow_dirs, flow_loras):
    from s2l_plugin.formats.loaders import load_target
    from s2l_plugin.pipeline import load_pipeline

    weights = flow_loras[family] / "pytorch_lora_weights.safetensors"
    assert weights.is_file()
    training = json.loads((flow_loras[family] / "s2l_training.json").read_text())
    assert len(training["losses"]) == 3
    ours, _ = load_target(weights, flow_dirs[family])
    theirs = load_pipeline(flow_dirs[family])
    theirs.load_lora_weights(str(weights))
    base = load_pipeline(flow_dirs[family])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([50.0, 700.0])
    outs = []
    with torch.no_grad():
        for pipe in (ours, theirs, base):
            outs.append(unet_forward(pipe.transformer, x, t, encode_prompts(pipe, ["a photo of seven"] * 2, "cpu")).sample)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert (outs[0] - outs[2]).abs().max() > 1e-4  # the LoRA moved the transformer


@pytest.mark.parametrize("family", FAMILIES)
def test_audit_runs_every_stage_on_a_flow_lora(family, flow_dirs, flow_loras, test_testbed, tmp_path):
    out = tmp_path / "audit"
    argv = ["audit", "--base", str(flow_dirs[family]), "--lora", str(flow_loras[family] / "pytorch_lora_weights.safetensors"),
            "--members", str(_images(test_testbed, "members")), "--nonmembers", str(_images(test_testbed, "nonmembers")),
            "--attacks", "loss,pia,pian,secmi,reference,clid", "--domain", "seven", "--extraction", "4",
            "--extraction-steps", "4", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    target = result["audits"][-1]
    attacks = {a["attack"]: a for a in target["membership"]["attacks"]}
    assert set(attacks) == {"loss", "pia", "pian", "secmi", "reference", "clid"}
    assert all(0.0 <= a["auc"] <= 1.0 for a in attacks.values())
    assert target["extraction"] is not None and target["memorization"] is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_run_with_lora(family, flow_dirs, test_testbed, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'out = "{tmp_path / "run"}"\nbase = "{flow_dirs[family]}"\ndomains = ["seven"]\nmethods = ["lora"]\n'
        f'[data]\nmembers = "{_images(test_testbed, "members")}"\nnonmembers = "{_images(test_testbed, "nonmembers")}"\n'
        "[generate]\nnum_images = 4\nnum_inference_steps = 4\n[train]\nmax_train_steps = 2\ntrain_batch_size = 4\n"
        '[audit]\nattacks = ["loss", "reference"]\nextraction = 0\nmemorization = false\n'
    )
    assert main(["run", str(config)]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert {c["method"] for c in result["comparisons"]} == {"lora"}
    assert {c["attack"] for c in result["comparisons"]} == {"loss"}, result["comparisons"]


@pytest.mark.parametrize("method", ["textual_inversion", "hypernetwork", "dreambooth"])
def test_a_method_that_cannot_train_on_flux_is_refused_before_any_work(method, flow_dirs, test_testbed, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--method", method, "--model", str(flow_dirs["flux"]), "--data", str(_images(test_testbed, "members")),
                 "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"method {method!r}" in err[0] and "Flux" in err[0] and "lora" in err[0], err
    assert not out.exists()


def test_lora_with_a_trained_text_encoder_is_refused_on_sd3(flow_dirs, test_testbed, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--method", "lora", "--model", str(flow_dirs["sd3"]), "--data", str(_images(test_testbed, "members")),
                 "--out", str(out), "--steps", "1", "--train-text-encoder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_text_encoder" in err[0] and "Stable Diffusion 3" in err[0], err
