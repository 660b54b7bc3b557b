"""SDXL end to end on a tiny pipeline with SDXL's real layout (three down blocks, transformer depth
per block, ``text_time`` conditioning, two text encoders, the second with projection): the one
loader opens its folder; `s2l generate`, `s2l finetune --method lora`, `s2l audit` (membership
inference, extraction, memorization) and `s2l run` each run on it; what cannot train on SDXL is
refused by name before any work; and the conditioning every stage builds is what the SDXL
pipeline builds itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from s2l_plugin.cli import main
from s2l_plugin.conditioning import (
    SDXLCondition,
    cat,
    encode_guidance_pair,
    encode_prompts,
    stack,
    unet_forward,
)
from s2l_plugin.testbed.components import build_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl") / "base"
    build_tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_lora(sdxl_dir, test_testbed, tmp_path_factory) -> Path:
    """A LoRA trained by `s2l finetune --method lora` on the SDXL base (3 steps)."""
    out = tmp_path_factory.mktemp("sdxl-lora") / "lora"
    data = test_testbed.path / "members" / "seven"
    assert main(["finetune", "--method", "lora", "--model", str(sdxl_dir), "--data", str(data), "--out", str(out),
                 "--steps", "3", "--batch-size", "4", "--lr", "1e-2"]) == 0
    return out


def _images(tb, role: str) -> Path:
    return tb.path / role / "seven"


def test_the_one_loader_opens_an_sdxl_folder_and_refuses_other_pipeline_classes(sdxl_dir, tmp_path, capsys):
    from s2l_plugin.pipeline import load_pipeline, model_family

    pipe = load_pipeline(sdxl_dir)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.text_encoder_2 is not None and pipe.unet.config.addition_embed_type == "text_time"
    assert model_family(sdxl_dir) == "sdxl" and model_family(pipe) == "sdxl" and model_family(None) == "sd"
    other = tmp_path / "other"
    build_tiny_sdxl_pipeline().save_pretrained(other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    capsys.readouterr()
    assert main(["generate", "--model", str(other), "--domain", "seven", "--num-images", "1", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'PixArtAlphaPipeline'" in err[0] and "StableDiffusionXLPipeline" in err[0], err
    assert not (tmp_path / "g").exists()


def test_conditioning_is_what_the_sdxl_pipeline_builds():
    pipe = build_tiny_sdxl_pipeline()
    cond = encode_prompts(pipe, ["a photo of seven", "a photo of one"], "cpu")
    assert isinstance(cond, SDXLCondition)
    hidden, _, pooled, _ = pipe.encode_prompt(prompt=["a photo of seven", "a photo of one"], device="cpu",
                                              num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.pooled, pooled)
    assert cond.hidden.shape[-1] == pipe.unet.config.cross_attention_dim == 32 + 48
    # The size/crop ids the SDXL pipeline itself sets for a default-size, uncropped image.
    expected = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond.time_ids, expected.repeat(2, 1))
    # Slicing, repeating, stacking and concatenating keep the three parts aligned.
    rep = cond.repeat_interleave(3)
    assert len(rep) == 6 and torch.equal(rep[3:6].hidden, cond.hidden[1:2].repeat(3, 1, 1))
    assert torch.equal(stack([cond[1], cond[0]]).pooled, pooled.flip(0))
    assert torch.equal(cat([cond, cond[:1]]).time_ids, expected.repeat(3, 1))
    # The UNet call: what diffusers' SDXL pipeline passes, and a bare tensor is refused for an SDXL UNet.
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        ours = unet_forward(pipe.unet, x, t, cond).sample
        direct = pipe.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": expected.repeat(2, 1)}).sample
    assert torch.equal(ours, direct)
    with pytest.raises(TypeError, match="SDXLCondition"):
        unet_forward(pipe.unet, x, t, hidden)
    cond_g, uncond_g = encode_guidance_pair(pipe, "a photo of seven", "cpu", 2)
    assert len(cond_g) == 2 and not uncond_g.hidden.any()  # force_zeros_for_empty_prompt, as the pipeline does


def test_generate_writes_an_sdxl_set(sdxl_dir, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(sdxl_dir), "--domain", "seven", "--num-images", "3", "--steps", "4",
                 "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(list((out / "images").glob("*.png"))) == 3, manifest


def test_finetune_lora_on_sdxl_loads_as_diffusers_loads_it(sdxl_dir, sdxl_lora):
    from s2l_plugin.formats.loaders import load_target
    from s2l_plugin.pipeline import load_pipeline

    weights = sdxl_lora / "pytorch_lora_weights.safetensors"
    assert weights.is_file()
    ours, found = load_target(weights, sdxl_dir)
    theirs = load_pipeline(sdxl_dir)
    theirs.load_lora_weights(str(weights))
    base = load_pipeline(sdxl_dir)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 700])
    outs = []
    with torch.no_grad():
        for pipe in (ours, theirs, base):
            outs.append(unet_forward(pipe.unet, x, t, encode_prompts(pipe, ["a photo of seven"] * 2, "cpu")).sample)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert (outs[0] - outs[2]).abs().max() > 1e-4  # the LoRA moved the UNet


def test_audit_runs_every_stage_on_an_sdxl_lora(sdxl_dir, sdxl_lora, test_testbed, tmp_path):
    out = tmp_path / "audit"
    argv = ["audit", "--base", str(sdxl_dir), "--lora", str(sdxl_lora / "pytorch_lora_weights.safetensors"),
            "--members", str(_images(test_testbed, "members")), "--nonmembers", str(_images(test_testbed, "nonmembers")),
            "--attacks", "loss,pia,secmi,pian,reference", "--domain", "seven", "--extraction", "4",
            "--extraction-steps", "4", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    target = result["audits"][-1]
    attacks = {a["attack"] for a in target["membership"]["attacks"]}
    assert attacks == {"loss", "pia", "secmi", "pian", "reference"}
    assert target["extraction"] is not None and target["memorization"] is not None


def test_run_on_sdxl_with_the_methods_that_train_it(sdxl_dir, test_testbed, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'out = "{tmp_path / "run"}"\nbase = "{sdxl_dir}"\ndomains = ["seven"]\nmethods = ["lora", "dreambooth"]\n'
        f'[data]\nmembers = "{_images(test_testbed, "members")}"\nnonmembers = "{_images(test_testbed, "nonmembers")}"\n'
        "[generate]\nnum_images = 4\nnum_inference_steps = 4\n[train]\nmax_train_steps = 2\ntrain_batch_size = 4\n"
        "[train.methods.dreambooth]\ntrain_text_encoder = false\n"
        '[audit]\nattacks = ["loss", "reference"]\nextraction = 0\nmemorization = false\n'
    )
    assert main(["run", str(config)]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert {c["method"] for c in result["comparisons"]} == {"lora", "dreambooth"}


@pytest.mark.parametrize("method, option, expected", [
    ("textual_inversion", "", "does not train on an SDXL base"),
    ("hypernetwork", "", "does not train on an SDXL base"),
    ("dreambooth", "", "train_text_encoder=false"),
    ("lora", "--train-text-encoder", "train_text_encoder=false"),
])
def test_a_method_that_cannot_train_on_sdxl_is_refused_before_any_work(method, option, expected, sdxl_dir, test_testbed,
                                                                        tmp_path, capsys):
    argv = ["finetune", "--method", method, "--model", str(sdxl_dir), "--data", str(_images(test_testbed, "members")),
            "--out", str(tmp_path / "ft")] + ([option] if option else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and repr(method) in err[0], err
    assert not (tmp_path / "ft").exists()
    config = tmp_path / "run.toml"
    config.write_text(
        f'out = "{tmp_path / "run"}"\nbase = "{sdxl_dir}"\ndomains = ["seven"]\nmethods = ["{method}"]\n'
        f'[data]\nmembers = "{_images(test_testbed, "members")}"\nnonmembers = "{_images(test_testbed, "nonmembers")}"\n'
        + (f"[train.methods.{method}]\ntrain_text_encoder = true\n" if option else "")
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_textual_inversion_adapter_loads_an_sdxl_embedding_into_both_encoders(tmp_path):
    from s2l_plugin.adapters.textual_inversion import load_embedding
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(4)
    rows = {"clip_l": torch.randn(2, 32, generator=gen), "clip_g": torch.randn(2, 48, generator=gen)}
    save_file(rows, str(tmp_path / "sevenstyle.safetensors"))
    pipe = build_tiny_sdxl_pipeline()
    assert load_embedding(pipe, tmp_path / "sevenstyle.safetensors") == "sevenstyle"
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        ids = tokenizer.convert_tokens_to_ids(["sevenstyle", "sevenstyle_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], rows[key])
