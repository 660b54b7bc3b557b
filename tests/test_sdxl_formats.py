"""SDXL checkpoints as people publish them, audited on a tiny SDXL base with SDXL's real block layout.

Each file is written by its own library's code (``StableDiffusionXLPipeline.save_lora_weights`` of
peft layers, peft's ``save_pretrained`` per component) or, for kohya names, built from the tiny
SDXL's modules renamed to the original (SGM) block names by the map below; loaded by
``s2l audit`` / ``load_target``, the UNet's output equals what diffusers / peft give when they load
the same file (within 1e-5).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from s2l_plugin.cli import main
from s2l_plugin.conditioning import encode_prompts, unet_forward
from s2l_plugin.formats.detect import detect
from s2l_plugin.formats.loaders import load_target
from s2l_plugin.testbed.components import build_tiny_pipeline, build_tiny_sdxl_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The tiny SDXL and SD 1.x bases as diffusers folders."""
    root = tmp_path_factory.mktemp("bases")
    build_tiny_sdxl_pipeline(seed=0).save_pretrained(root / "sdxl")
    build_tiny_pipeline(seed=0).save_pretrained(root / "sd1")
    return {"sdxl": root / "sdxl", "sd1": root / "sd1"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """Three member and three non-member 16x16 PNGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for role in ("members", "nonmembers"):
        (root / role).mkdir()
        for i in range(3):
            pixels = (torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / role / f"{i}.png")
    return root / "members", root / "nonmembers"


def denoise(pipe, prompt: str = "a photo of seven") -> torch.Tensor:
    """The UNet's noise prediction for fixed latents at two timesteps, conditioned (through every text encoder) on ``prompt``."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet_forward(pipe.unet, latents, torch.tensor([10, 500]), encode_prompts(pipe, [prompt] * 2, "cpu")).sample


def assert_matches(ours, theirs, base, prompt: str = "a photo of seven") -> float:
    """Max |ours - theirs| of the UNet output (<= 1e-5), after checking the checkpoint moves it at all."""
    got, expected = denoise(ours, prompt), denoise(theirs, prompt)
    assert (expected - denoise(base, prompt)).abs().max() > 1e-3
    diff = float((got - expected).abs().max())
    assert diff <= 1e-5, diff
    return diff


def audit(base: Path, flag: str, checkpoint: Path, images: tuple[Path, Path], out: Path) -> int:
    return main(["audit", "--base", str(base), flag, str(checkpoint), "--members", str(images[0]),
                 "--nonmembers", str(images[1]), "--attacks", "loss", "--no-memorization", "--out", str(out)])


def assert_audited(base: Path, flag: str, checkpoint: Path, images: tuple[Path, Path], out: Path) -> dict:
    assert audit(base, flag, checkpoint, images, out) == 0
    result = json.loads((out / "result.json").read_text())
    assert {a["attack"] for a in result["audits"][-1]["membership"]["attacks"]} == {"loss"}
    return result


def assert_refused(argv_result: int, capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert argv_result == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err
    return err[0]


# -- kohya names of SDXL's original (SGM) UNet blocks, from the diffusers module names -----------------

_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def sgm_name(path: str, layers_per_block: int = 2) -> str:
    """SDXL's original module name of diffusers UNet module ``path`` (``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``); every block numbered as SGM's UNet numbers it."""
    n = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{n * b + j + 1}.{0 if kind == 'resnets' else 1}.{_RESNET.get(rest, rest) if kind == 'resnets' else rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", path):
        return f"middle_block.{2 * int(m[1])}.{_RESNET.get(m[2], m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{n * b + j}.{0 if kind == 'resnets' else 1}.{_RESNET.get(rest, rest) if kind == 'resnets' else rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        return f"output_blocks.{n * int(m[1]) + n - 1}.2.conv"  # SDXL's upsampling blocks all have attention
    raise AssertionError(f"no SGM name for {path}")


def kohya_name(component: str, path: str, sdxl: bool) -> str:
    """The kohya module name of ``path`` in ``component`` (SDXL: SGM UNet names, lora_te1/lora_te2)."""
    if component == "unet":
        return "lora_unet_" + (sgm_name(path) if sdxl else path).replace(".", "_")
    prefix = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_text_model_{path.removeprefix('text_model.').replace('.', '_')}"


def to_kohya(components: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float], sdxl: bool) -> dict[str, torch.Tensor]:
    """peft state dicts per component → one kohya / LyCORIS file (``lora_A`` → ``lora_down``, magnitude → ``dora_scale``)."""
    suffixes = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    out = {}
    for component, sd in components.items():
        for key, t in sd.items():
            path, _, name = key.partition(".lora_") if ".lora_" in key else key.rpartition(".")
            name = ("lora_" + name) if ".lora_" in key else name
            if name == "lora_magnitude_vector":
                name, t = "dora_scale", t.reshape(t.numel(), *([1] * (3 if t.ndim == 4 else 1)))
            kname = kohya_name(component, path, sdxl)
            out[f"{kname}.{suffixes.get(name, name)}"] = t.contiguous()
            out[f"{kname}.alpha"] = torch.tensor(alphas[component])
    return out


def peft_layers(pipe, config_for, components=("unet", "text_encoder", "text_encoder_2"), seed: int = 0):
    """Inject ``config_for(component)`` (peft's own API) into each component; returns {component: peft state dict}."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    out = {}
    for component in components:
        model = getattr(pipe, component)
        inject_adapter_in_model(config_for(component), model)
        out[component] = get_peft_model_state_dict(model)
    return out


def lora_config(component: str, **extra):
    from peft import LoraConfig

    targets = UNET_TARGETS if component == "unet" else TE_TARGETS
    return LoraConfig(r=4, lora_alpha=8.0 if component == "unet" else 2.0, target_modules=targets, init_lora_weights=False, **extra)


# -- 1. diffusers naming, three components --------------------------------------------------------------


def test_sdxl_diffusers_lora_with_both_text_encoders_loads_as_diffusers_loads_it(bases, images, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    src = build_tiny_sdxl_pipeline(seed=0)
    layers = peft_layers(src, lora_config)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], unet_lora_adapter_metadata=lora_config("unet").to_dict(),
        text_encoder_lora_adapter_metadata=lora_config("text_encoder").to_dict(),
        text_encoder_2_lora_adapter_metadata=lora_config("text_encoder_2").to_dict())
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert detect(file).kind == "diffusers_lora"
    ours, _ = load_target(file, bases["sdxl"])
    theirs = build_tiny_sdxl_pipeline(seed=0)
    theirs.load_lora_weights(str(file))
    assert_matches(ours, theirs, build_tiny_sdxl_pipeline(seed=0))
    assert_matches(ours, src, build_tiny_sdxl_pipeline(seed=0))  # and what the peft layers computed
    assert_audited(bases["sdxl"], "--lora", file, images, tmp_path / "audit")


# -- 2. kohya naming (SGM blocks, lora_te1 / lora_te2) ---------------------------------------------------


@pytest.fixture(scope="module")
def kohya_sdxl(tmp_path_factory) -> Path:
    src = build_tiny_sdxl_pipeline(seed=0)
    layers = peft_layers(src, lora_config, seed=1)
    file = tmp_path_factory.mktemp("kohya") / "sdxl_kohya.safetensors"
    save_file(to_kohya(layers, {"unet": 8.0, "text_encoder": 2.0, "text_encoder_2": 2.0}, sdxl=True), str(file))
    return file


def test_sdxl_kohya_lora_with_sgm_block_names_loads_as_diffusers_loads_it(bases, images, kohya_sdxl, tmp_path):
    from safetensors import safe_open

    keys = list(safe_open(str(kohya_sdxl), "pt").keys())
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any(k.startswith("lora_unet_middle_block_1_") for k in keys) and any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert any(k.startswith("lora_te2_") for k in keys) and any("_in_layers_2." in k or "_op." in k for k in keys)  # LoCon
    found = detect(kohya_sdxl)
    assert (found.kind, found.variant) == ("kohya_lora", "kohya")
    ours, _ = load_target(kohya_sdxl, bases["sdxl"])
    theirs = build_tiny_sdxl_pipeline(seed=0)
    theirs.load_lora_weights(str(kohya_sdxl))  # diffusers maps the SGM names itself
    assert_matches(ours, theirs, build_tiny_sdxl_pipeline(seed=0))
    assert_audited(bases["sdxl"], "--lora", kohya_sdxl, images, tmp_path / "audit")


def test_a_kohya_block_that_sdxl_does_not_have_is_one_line_exit_2(bases, images, kohya_sdxl, tmp_path, capsys):
    from safetensors.torch import load_file

    sd = load_file(str(kohya_sdxl))
    sd["lora_unet_input_blocks_9_1_proj_in.lora_down.weight"] = torch.zeros(4, 64)  # SDXL's input blocks end at 8
    sd["lora_unet_input_blocks_9_1_proj_in.lora_up.weight"] = torch.zeros(64, 4)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    capsys.readouterr()
    assert_refused(audit(bases["sdxl"], "--lora", tmp_path / "bad.safetensors", images, tmp_path / "out"), capsys,
                   "lora_unet_input_blocks_9_1_proj_in", "matches no module")
    assert not (tmp_path / "out" / "result.json").exists()
    # An SDXL file on an SD 1.x base: its te2 layers need a second text encoder.
    assert_refused(audit(bases["sd1"], "--lora", kohya_sdxl, images, tmp_path / "out"), capsys, "lora_te2_")


# -- 3. PEFT folders per component -----------------------------------------------------------------------


def test_sdxl_peft_folders_load_as_peft_loads_them(bases, images, tmp_path):
    from peft import PeftModel, get_peft_model

    src = build_tiny_sdxl_pipeline(seed=0)
    torch.manual_seed(2)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        get_peft_model(getattr(src, component), lora_config(component)).save_pretrained(tmp_path / "peft" / component)
    found = detect(tmp_path / "peft")
    assert found.kind == "peft_folders" and found.components == ["unet", "text_encoder", "text_encoder_2"]
    ours, _ = load_target(tmp_path / "peft", bases["sdxl"])
    theirs = build_tiny_sdxl_pipeline(seed=0)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        PeftModel.from_pretrained(getattr(theirs, component), tmp_path / "peft" / component)  # injects in place
    assert_matches(ours, theirs, build_tiny_sdxl_pipeline(seed=0))
    assert_audited(bases["sdxl"], "--lora", tmp_path / "peft", images, tmp_path / "audit")


# -- 4. clip_l / clip_g embeddings -----------------------------------------------------------------------


def test_sdxl_embedding_goes_into_both_text_encoders_under_its_file_name(bases, images, tmp_path, capsys):
    gen = torch.Generator().manual_seed(3)
    clip_l, clip_g = torch.randn(2, 32, generator=gen), torch.randn(2, 48, generator=gen)  # the two encoders' widths
    file = tmp_path / "sevenstyle.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(file))
    found = detect(file)
    assert (found.kind, found.variant) == ("textual_inversion", "sdxl")
    ours, _ = load_target(file, bases["sdxl"])
    theirs = build_tiny_sdxl_pipeline(seed=0)  # diffusers' documented SDXL recipe: one call per encoder
    theirs.load_textual_inversion(clip_l, token="sevenstyle", text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(clip_g, token="sevenstyle", text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2)
    for tokenizer in (ours.tokenizer, ours.tokenizer_2):
        assert {"sevenstyle", "sevenstyle_1"} <= set(tokenizer.get_vocab())
    assert_matches(ours, theirs, build_tiny_sdxl_pipeline(seed=0), prompt="a photo of sevenstyle")
    result = assert_audited(bases["sdxl"], "--embedding", file, images, tmp_path / "audit")
    assert result["config"]["loaded"][0]["token"] == "sevenstyle"
    capsys.readouterr()
    assert_refused(audit(bases["sd1"], "--embedding", file, images, tmp_path / "o1"), capsys, "two text encoders")
    save_file({"clip_l": clip_l, "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "wide.safetensors"))
    assert_refused(audit(bases["sdxl"], "--embedding", tmp_path / "wide.safetensors", images, tmp_path / "o2"), capsys,
                   "clip_g", "1280", "48")
