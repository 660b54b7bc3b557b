"""Flux and SD3 LoRAs as people publish them, loaded onto the tiny Flux / SD3 bases.

Each file is written by its own library's code (``FluxPipeline.save_lora_weights`` /
``StableDiffusion3Pipeline.save_lora_weights`` of peft layers) or, for kohya's and XLabs' Flux
layouts, built from the real layout's key names with the tiny transformer's shapes (1 double +
1 single block, 2 heads of 16: width 32). Loaded by ``load_target`` / ``s2l audit``, the
transformer's velocity equals what diffusers' ``pipe.load_lora_weights(file)`` gives (within 1e-5;
the measured max abs diffs are in docs/audit.md ("Flow-matching models")).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from s2l_plugin.cli import main
from s2l_plugin.conditioning import encode_prompts, unet_forward
from s2l_plugin.errors import FormatError
from s2l_plugin.formats.detect import detect, lora_family
from s2l_plugin.formats.loaders import load_target
from s2l_plugin.testbed.components import (
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
)

#: every Linear of the tiny transformers' blocks and embedders (peft matches the names' ends)
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "norm.linear",
                "proj_mlp", "proj_out", "x_embedder", "context_embedder"]
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
               "ff.net.2", "norm1.linear"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
BUILD = {"flux": build_tiny_flux_pipeline, "sd3": build_tiny_sd3_pipeline}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    build_tiny_flux_pipeline(seed=0).save_pretrained(root / "flux")
    build_tiny_sd3_pipeline(seed=0).save_pretrained(root / "sd3")
    build_tiny_pipeline(seed=0).save_pretrained(root / "sd1")
    return {"flux": root / "flux", "sd3": root / "sd3", "sd1": root / "sd1"}


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


def velocity(pipe, prompt: str = "a photo of seven") -> torch.Tensor:
    """The transformer's velocity for fixed 4x8x8 latents at σ = 0.1 and 0.7, conditioned (through every text encoder) on ``prompt``."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet_forward(pipe.transformer, latents, torch.tensor([100.0, 700.0]), encode_prompts(pipe, [prompt] * 2, "cpu")).sample


def assert_matches(name: str, ours, theirs, family: str) -> float:
    """Max |ours - theirs| of the velocity (<= 1e-5), after checking the LoRA moves it at all."""
    got, expected = velocity(ours), velocity(theirs)
    assert (expected - velocity(BUILD[family](seed=0))).abs().max() > 1e-3
    diff = float((got - expected).abs().max())
    print(f"\nmax abs diff {name}: {diff:.3g}")
    assert diff <= 1e-5, diff
    return diff


def diffusers_loaded(family: str, file: Path):
    pipe = BUILD[family](seed=0)
    pipe.load_lora_weights(str(file))
    return pipe


def audit(base: Path, checkpoint: Path, images: tuple[Path, Path], out: Path) -> int:
    return main(["audit", "--base", str(base), "--lora", str(checkpoint), "--members", str(images[0]),
                 "--nonmembers", str(images[1]), "--attacks", "loss", "--no-memorization", "--out", str(out)])


def assert_refused(code: int, capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err
    return err[0]


def peft_layers(pipe, targets: dict[str, list[str]], seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """peft LoRA layers (rank 4, alpha 8 on the transformer, 2 on text encoders) injected by peft's own API."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    out = {}
    for component, names in targets.items():
        model = getattr(pipe, component)
        config = LoraConfig(r=4, lora_alpha=8.0 if component == "transformer" else 2.0, target_modules=names, init_lora_weights=False)
        inject_adapter_in_model(config, model)
        out[component] = (get_peft_model_state_dict(model), config.to_dict())
    return out


# -- 1. diffusers' save_lora_weights -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_diffusers(tmp_path_factory) -> Path:
    from diffusers import FluxPipeline

    src = build_tiny_flux_pipeline(seed=0)
    layers = peft_layers(src, {"transformer": FLUX_TARGETS, "text_encoder": TE_TARGETS})
    folder = tmp_path_factory.mktemp("flux_diffusers")
    FluxPipeline.save_lora_weights(
        folder, transformer_lora_layers=layers["transformer"][0], text_encoder_lora_layers=layers["text_encoder"][0],
        transformer_lora_adapter_metadata=layers["transformer"][1], text_encoder_lora_adapter_metadata=layers["text_encoder"][1])
    return folder / "pytorch_lora_weights.safetensors"


def test_flux_diffusers_lora_with_text_encoder_loads_as_diffusers_loads_it(bases, images, flux_diffusers, tmp_path):
    found = detect(flux_diffusers)
    assert (found.kind, found.variant) == ("diffusers_lora", "diffusers")
    assert any(k.startswith("transformer.single_transformer_blocks.0.") for k in found.keys)
    assert any(k.startswith("text_encoder.") for k in found.keys)
    assert lora_family(found.keys) == "flux"
    ours, _ = load_target(flux_diffusers, bases["flux"])
    assert_matches("flux diffusers (save_lora_weights, transformer + CLIP)", ours, diffusers_loaded("flux", flux_diffusers), "flux")
    # The CLI audits it on the tiny Flux base.
    assert audit(bases["flux"], flux_diffusers, images, tmp_path / "audit") == 0
    result = json.loads((tmp_path / "audit" / "result.json").read_text())
    assert {a["attack"] for a in result["audits"][-1]["membership"]["attacks"]} == {"loss"}
    assert result["config"]["loaded"][0]["kind"] == "diffusers_lora"


def test_flux_lora_without_metadata_scales_by_rank_as_diffusers_does(bases, flux_diffusers, tmp_path):
    from safetensors.torch import load_file

    file = tmp_path / "bare.safetensors"
    save_file(load_file(str(flux_diffusers)), str(file))  # the same tensors, no lora_adapter_metadata: alpha = rank
    assert "lora_adapter_metadata" not in detect(file).metadata
    ours, _ = load_target(file, bases["flux"])
    assert_matches("flux diffusers without metadata", ours, diffusers_loaded("flux", file), "flux")


def test_sd3_diffusers_lora_with_both_clips_loads_as_diffusers_loads_it(bases, images, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    src = build_tiny_sd3_pipeline(seed=0)
    layers = peft_layers(src, {"transformer": SD3_TARGETS, "text_encoder": TE_TARGETS, "text_encoder_2": TE_TARGETS}, seed=3)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=layers["transformer"][0], text_encoder_lora_layers=layers["text_encoder"][0],
        text_encoder_2_lora_layers=layers["text_encoder_2"][0], transformer_lora_adapter_metadata=layers["transformer"][1],
        text_encoder_lora_adapter_metadata=layers["text_encoder"][1], text_encoder_2_lora_adapter_metadata=layers["text_encoder_2"][1])
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    found = detect(file)
    assert found.kind == "diffusers_lora" and lora_family(found.keys) == "sd3"
    ours, _ = load_target(file, bases["sd3"])
    assert_matches("sd3 diffusers (save_lora_weights, transformer + both CLIPs)", ours, diffusers_loaded("sd3", file), "sd3")
    assert audit(bases["sd3"], file, images, tmp_path / "audit") == 0


def test_flux_dora_from_save_lora_weights_loads_as_diffusers_and_peft_load_it(bases, tmp_path):
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    src = build_tiny_flux_pipeline(seed=0)
    torch.manual_seed(4)
    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=FLUX_TARGETS, init_lora_weights=False, use_dora=True)
    inject_adapter_in_model(config, src.transformer)
    with torch.no_grad():  # a magnitude that is not the base weight's norm
        for name, p in src.transformer.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.2)
    FluxPipeline.save_lora_weights(tmp_path / "dora", transformer_lora_layers=get_peft_model_state_dict(src.transformer),
                                   transformer_lora_adapter_metadata=config.to_dict())
    file = tmp_path / "dora" / "pytorch_lora_weights.safetensors"
    assert any(k.endswith(".lora_magnitude_vector") for k in detect(file).keys)
    ours, _ = load_target(file, bases["flux"])
    assert_matches("flux DoRA (save_lora_weights, lora_magnitude_vector)", ours, diffusers_loaded("flux", file), "flux")
    assert float((velocity(ours) - velocity(src)).abs().max()) <= 1e-5  # and what the peft layers computed


# -- 2. kohya's Flux naming (the original BFL blocks) ----------------------------------------------------------


#: kohya module names of Flux.1's BFL layout -> (in, out) at the tiny transformer's width 32 (MLP 128, modulation 6x / 3x)
KOHYA_FLUX_MODULES = {
    "lora_unet_double_blocks_0_img_attn_qkv": (32, 96), "lora_unet_double_blocks_0_img_attn_proj": (32, 32),
    "lora_unet_double_blocks_0_img_mlp_0": (32, 128), "lora_unet_double_blocks_0_img_mlp_2": (128, 32),
    "lora_unet_double_blocks_0_img_mod_lin": (32, 192),
    "lora_unet_double_blocks_0_txt_attn_qkv": (32, 96), "lora_unet_double_blocks_0_txt_attn_proj": (32, 32),
    "lora_unet_double_blocks_0_txt_mlp_0": (32, 128), "lora_unet_double_blocks_0_txt_mlp_2": (128, 32),
    "lora_unet_double_blocks_0_txt_mod_lin": (32, 192),
    "lora_unet_single_blocks_0_linear2": (160, 32), "lora_unet_single_blocks_0_modulation_lin": (32, 96),
    **{f"lora_te1_text_model_encoder_layers_0_self_attn_{p}": (32, 32) for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": (32, 64), "lora_te1_text_model_encoder_layers_0_mlp_fc2": (64, 32),
}


def kohya_file(path: Path, modules: dict[str, tuple[int, int]], rank: int = 4, alpha: float = 2.0, seed: int = 0, **meta) -> Path:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (fan_in, fan_out) in modules.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata=meta or None)
    return path


def test_flux_kohya_lora_with_bfl_block_names_loads_as_diffusers_loads_it(bases, images, tmp_path):
    file = kohya_file(tmp_path / "flux_kohya.safetensors", KOHYA_FLUX_MODULES, alpha=2.0,
                      ss_base_model_version="flux1", **{"modelspec.architecture": "flux-1-dev/lora"})
    found = detect(file)
    assert (found.kind, found.variant) == ("kohya_lora", "kohya")
    assert lora_family(found.keys) == "flux"  # not SD's kohya: lora_unet_double_blocks_ are Flux's
    ours, _ = load_target(file, bases["flux"])
    theirs = diffusers_loaded("flux", file)
    assert any(n.endswith("encoder.layers.0.self_attn.q_proj") and hasattr(m, "lora_A") for n, m in theirs.text_encoder.named_modules())
    assert_matches("flux kohya (BFL names, CLIP lora_te1_, alpha 2 of rank 4)", ours, theirs, "flux")
    assert audit(bases["flux"], file, images, tmp_path / "audit") == 0


def test_flux_kohya_fused_qkv_with_block_diagonal_up_loads_as_diffusers_loads_it(bases, tmp_path):
    """A qkv LoRA whose up factor is block-diagonal (rank split by 3): diffusers splits the down factor too."""
    from safetensors.torch import load_file

    file = kohya_file(tmp_path / "k.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (32, 96)}, rank=6, alpha=3.0)
    sd = load_file(str(file))
    up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    blocks = torch.zeros_like(up)
    for i in range(3):  # rows of q, k, v x columns 2i, 2i+1: one rank-2 LoRA each
        blocks[i * 32:(i + 1) * 32, i * 2:(i + 1) * 2] = up[i * 32:(i + 1) * 32, i * 2:(i + 1) * 2]
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = blocks
    save_file(sd, str(file))
    ours, _ = load_target(file, bases["flux"])
    assert_matches("flux kohya block-diagonal qkv (rank 6 -> 3 x 2)", ours, diffusers_loaded("flux", file), "flux")


def test_flux_kohya_layers_diffusers_cannot_convert_are_one_line_exit_2(bases, images, tmp_path, capsys):
    # single_blocks linear1 is split by diffusers at Flux.1's widths (3 x 3072 + 12288): the tiny one's 224 rows are refused.
    linear1 = kohya_file(tmp_path / "linear1.safetensors", {"lora_unet_single_blocks_0_linear1": (32, 224)})
    capsys.readouterr()
    assert_refused(audit(bases["flux"], linear1, images, tmp_path / "out"), capsys, "FluxPipeline.lora_state_dict", "linear1.safetensors")
    # A second text encoder's kohya layers: diffusers' Flux conversion drops them without an error; refused by name.
    te2 = kohya_file(tmp_path / "te2.safetensors", {**KOHYA_FLUX_MODULES, "lora_te2_encoder_block_0_layer_0_SelfAttention_q": (32, 32)})
    with pytest.raises(FormatError, match="lora_te2_encoder_block_0_layer_0_SelfAttention_q.*left out"):
        load_target(te2, bases["flux"])
    assert not (tmp_path / "out" / "result.json").exists()


# -- 3. XLabs' Flux layout ---------------------------------------------------------------------------------------


def test_flux_xlabs_lora_loads_as_diffusers_loads_it(bases, tmp_path):
    gen = torch.Generator().manual_seed(5)
    shapes = {"double_blocks.0.processor.qkv_lora1": (32, 96), "double_blocks.0.processor.proj_lora1": (32, 32),
              "double_blocks.0.processor.qkv_lora2": (32, 96), "double_blocks.0.processor.proj_lora2": (32, 32)}
    sd = {}
    for name, (fan_in, fan_out) in shapes.items():
        sd[f"{name}.down.weight"] = torch.randn(4, fan_in, generator=gen) * 0.3
        sd[f"{name}.up.weight"] = torch.randn(fan_out, 4, generator=gen) * 0.3
    file = tmp_path / "xlabs.safetensors"
    save_file(sd, str(file))
    found = detect(file)
    assert (found.kind, found.variant) == ("diffusers_lora", "xlabs") and lora_family(found.keys) == "flux"
    ours, _ = load_target(file, bases["flux"])
    assert_matches("flux xlabs (double_blocks.0.processor.*_lora1/2)", ours, diffusers_loaded("flux", file), "flux")


# -- 4. a LoRA on a base of another family ---------------------------------------------------------------------


def test_a_lora_on_a_base_of_another_family_is_one_line_exit_2(bases, images, flux_diffusers, tmp_path, capsys):
    kohya = kohya_file(tmp_path / "flux_kohya.safetensors", KOHYA_FLUX_MODULES)
    capsys.readouterr()
    assert_refused(audit(bases["sd1"], kohya, images, tmp_path / "out"), capsys, "Flux LoRA", "lora_unet_double_blocks_0",
                   "Stable Diffusion 1.x/2.x pipeline")
    assert_refused(audit(bases["sd3"], flux_diffusers, images, tmp_path / "out"), capsys, "Flux LoRA", "Stable Diffusion 3 pipeline")
    sd_kohya = kohya_file(tmp_path / "sd_kohya.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32)})
    assert_refused(audit(bases["flux"], sd_kohya, images, tmp_path / "out"), capsys, "Stable Diffusion 1.x/2.x LoRA", "Flux pipeline")
    # kohya's SD3 names (MMDiT blocks): diffusers' SD3 loader does not convert them, and would load nothing.
    sd3_kohya = kohya_file(tmp_path / "sd3_kohya.safetensors", {"lora_unet_joint_blocks_0_x_block_attn_qkv": (32, 96)})
    assert lora_family(detect(sd3_kohya).keys) == "sd3"
    assert_refused(audit(bases["sd3"], sd3_kohya, images, tmp_path / "out"), capsys, "lora_unet_joint_blocks_0_x_block_attn_qkv",
                   "no layout diffusers' Stable Diffusion 3 loader reads")
    assert not (tmp_path / "out" / "result.json").exists()


def test_lora_family_reads_the_layout_not_the_file_name():
    assert lora_family(["lora_unet_single_blocks_3_linear1.lora_down.weight"]) == "flux"
    assert lora_family(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]) == "sd"
    assert lora_family(["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight"]) == "sdxl"
    assert lora_family(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]) == "flow"  # SD3 or Flux: not told
    assert lora_family(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
                       {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (16, 3072)}) == "flux"
    assert lora_family(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
                       {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (16, 1536)}) == "sd3"
    assert lora_family(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "text_encoder_2.x.lora_A.weight"]) == "sd3"
    assert lora_family(["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]) is None  # CLIP-L alone: any family
    assert lora_family(["emb_params"]) is None



# -- 5. s2l scan: modelspec.* and ss_* metadata, and the family -------------------------------------------------

#: what sd-scripts writes into a Flux LoRA it trained (ss_*) and the SAI model spec (modelspec.*)
FLUX_METADATA = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "flux-1-dev/lora",
    "modelspec.implementation": "https://github.com/black-forest-labs/flux",
    "modelspec.title": "jane_flux",
    "modelspec.date": "2024-09-01T10:00:00",
    "modelspec.resolution": "1024x1024",
    "modelspec.trigger_phrase": "ohwx woman",
    "modelspec.thumbnail": "data:image/jpeg;base64,/9j/4AAQ",
    "ss_base_model_version": "flux1",
    "ss_network_module": "networks.lora_flux",
    "ss_tag_frequency": json.dumps({"10_ohwx woman": {"ohwx woman": 12, "smiling": 3}}),
    "ss_num_train_images": "12",
}


def test_scan_reads_modelspec_and_kohya_metadata_of_a_flux_lora_and_names_the_family(tmp_path, capsys):
    from s2l_plugin.audit.metadata import scan_file

    file = kohya_file(tmp_path / "jane_flux.safetensors", KOHYA_FLUX_MODULES, **FLUX_METADATA)
    findings = {f.key: f for f in scan_file(file)}
    assert findings["ss_tag_frequency"].severity == "high" and "smiling (3)" in findings["ss_tag_frequency"].message
    assert findings["modelspec.trigger_phrase"].severity == "medium" and "ohwx woman" in findings["modelspec.trigger_phrase"].message
    assert findings["modelspec.thumbnail"].severity == "medium"
    assert (findings["modelspec.date"].severity, findings["modelspec.resolution"].severity) == ("low", "low")
    assert findings["modelspec.architecture"].message == "base model family 'flux-1-dev/lora' (Flux)"
    assert findings["ss_base_model_version"].message == "base model family 'flux1' (Flux)"
    assert (findings["modelspec.title"].message, findings["modelspec.sai_model_spec"].message) == ("model title", "SAI model spec version")
    assert main(["scan", str(file)]) == 0
    assert "(Flux)" in capsys.readouterr().out


def test_scan_dir_names_flux_and_sd3_from_metadata_keys_and_model_index(bases, flux_diffusers, tmp_path, capsys):
    import shutil

    root = tmp_path / "published"
    root.mkdir()
    kohya_file(root / "flux_meta.safetensors", {"lora_unet_img_in": (16, 32)}, **{"modelspec.architecture": "flux-1-schnell/lora"})
    kohya_file(root / "flux_keys.safetensors", KOHYA_FLUX_MODULES)  # no metadata: the BFL block names tell
    shutil.copy(flux_diffusers, root / "flux_diffusers.safetensors")  # transformer.single_transformer_blocks
    to_q = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    save_file(to_q, str(root / "sd3_meta.safetensors"), metadata={"modelspec.architecture": "stable-diffusion-v3-medium/lora"})
    save_file(to_q, str(root / "transformer_only.safetensors"))  # SD3 or Flux: the keys do not tell
    kohya_file(root / "sd3_kohya.safetensors", {"lora_unet_joint_blocks_0_x_block_attn_qkv": (32, 96)}, ss_base_model_version="sd3")
    shutil.copytree(bases["flux"], root / "flux_pipeline")
    shutil.copytree(bases["sd3"], root / "sd3_pipeline")
    assert main(["scan", str(root), "--json"]) == 0
    rows = {r["file"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert {f: r["base"] for f, r in rows.items()} == {
        "flux_meta.safetensors": "flux", "flux_keys.safetensors": "flux", "flux_diffusers.safetensors": "flux",
        "sd3_meta.safetensors": "sd3", "transformer_only.safetensors": "unknown", "sd3_kohya.safetensors": "sd3",
        "flux_pipeline": "flux", "sd3_pipeline": "sd3"}
    assert all(r["status"] == "ok" for r in rows.values()), rows


def test_flux_kohya_embedder_and_final_layers_are_applied_not_dropped(bases, tmp_path):
    """diffusers 0.42 converts kohya's img_in / txt_in / time_in / vector_in / guidance_in / final_layer to transformer
    paths without the ``transformer.`` prefix its loader selects by, so ``load_lora_weights(file)`` drops them. Here they
    are applied: the result equals diffusers loading its own conversion with those keys prefixed."""
    from diffusers import FluxPipeline

    modules = {"lora_unet_img_in": (16, 32), "lora_unet_txt_in": (96, 32), "lora_unet_time_in_in_layer": (256, 32),
               "lora_unet_vector_in_in_layer": (32, 32), "lora_unet_guidance_in_in_layer": (256, 32),
               "lora_unet_final_layer_linear": (32, 16), "lora_unet_final_layer_adaLN_modulation_1": (32, 64),
               "lora_unet_double_blocks_0_img_attn_proj": (32, 32)}
    file = kohya_file(tmp_path / "embedders.safetensors", modules, alpha=8.0, seed=7)
    ours, _ = load_target(file, bases["flux"])
    converted = FluxPipeline.lora_state_dict(str(file))
    assert "x_embedder.lora_A.weight" in converted and "norm_out.linear.lora_B.weight" in converted  # diffusers' own names
    complete = build_tiny_flux_pipeline(seed=0)
    complete.load_lora_weights({k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()})
    assert_matches("flux kohya embedders + final layer (diffusers' conversion, prefixed)", ours, complete, "flux")
    dropped = diffusers_loaded("flux", file)  # diffusers' load_lora_weights(file): only the double block's layer
    assert not hasattr(dropped.transformer.x_embedder, "lora_A")
    assert (velocity(dropped) - velocity(ours)).abs().max() > 1e-3


def test_flux_diffusers_lora_with_network_alpha_keys_loads_as_diffusers_loads_it(bases, flux_diffusers, tmp_path):
    """A diffusers-layout Flux file with an ``.alpha`` per module (as some trainers publish them): diffusers' network alphas,
    every module scaled by its own alpha / rank."""
    from safetensors.torch import load_file

    sd = load_file(str(flux_diffusers))
    modules = sorted({k[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight")})
    for i, module in enumerate(modules):
        sd[f"{module}.alpha"] = torch.tensor(2.0 + 0.5 * i)  # a different alpha per module
    # peft gives a module the pattern of any path it ends with, first in the dict: diffusers scales the single block's
    # proj_out by the top-level proj_out's alpha. With both alphas equal, diffusers is the reference.
    sd["transformer.single_transformer_blocks.0.proj_out.alpha"] = sd["transformer.proj_out.alpha"].clone()
    file = tmp_path / "alphas.safetensors"
    save_file(sd, str(file))
    assert detect(file).kind == "diffusers_lora"
    ours, _ = load_target(file, bases["flux"])
    assert_matches("flux diffusers with .alpha keys (network alphas)", ours, diffusers_loaded("flux", file), "flux")
    # With its own alpha, the single block's proj_out is scaled by it (and every other module by its own).
    sd["transformer.single_transformer_blocks.0.proj_out.alpha"] = torch.tensor(11.0)
    save_file(sd, str(file))
    ours, _ = load_target(file, bases["flux"])
    for component in ("transformer", "text_encoder"):
        for name, module in getattr(ours, component).named_modules():
            if hasattr(module, "scaling") and module.scaling:
                assert module.scaling["s2l_target"] == pytest.approx(float(sd[f"{component}.{name}.alpha"]) / 4), name


# -- 6. what is refused by name -------------------------------------------------------------------------------


def test_lycoris_on_flux_and_single_file_flow_bases_are_one_line_exit_2(bases, images, flux_diffusers, tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    loha = {f"lora_unet_double_blocks_0_img_attn_proj.{n}": torch.randn(*s, generator=gen)
            for n, s in (("hada_w1_a", (32, 2)), ("hada_w1_b", (2, 32)), ("hada_w2_a", (32, 2)), ("hada_w2_b", (2, 32)))}
    loha["lora_unet_double_blocks_0_img_attn_proj.alpha"] = torch.tensor(2.0)
    save_file(loha, str(tmp_path / "loha.safetensors"))
    capsys.readouterr()
    assert_refused(audit(bases["flux"], tmp_path / "loha.safetensors", images, tmp_path / "out"), capsys,
                   "lora_unet_double_blocks_0_img_attn_proj.hada_w", "no layout diffusers' Flux loader reads")
    # Single files in the original layouts (the real key names): not taken yet, named as what they are.
    bfl = tmp_path / "flux1-tiny.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32), "img_in.weight": torch.zeros(32, 16)}, str(bfl))
    mmdit = tmp_path / "sd3-tiny.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(96, 32)}, str(mmdit))
    for file, family, config in ((bfl, "Flux", bases["flux"]), (mmdit, "Stable Diffusion 3", bases["sd3"])):
        code = main(["audit", "--base", str(file), "--base-config", str(config), "--lora", str(flux_diffusers),
                     "--members", str(images[0]), "--nonmembers", str(images[1]), "--attacks", "loss", "--no-memorization",
                     "--out", str(tmp_path / "out")])
        assert_refused(code, capsys, f"single-file {family} checkpoint", "not supported yet")
    assert not (tmp_path / "out" / "result.json").exists()


@pytest.fixture(scope="module")
def flux_peft(tmp_path_factory) -> Path:
    """peft ``save_pretrained`` folders of a transformer and a CLIP LoRA (alpha 6 of rank 4)."""
    from peft import LoraConfig, get_peft_model

    src = build_tiny_flux_pipeline(seed=0)
    torch.manual_seed(6)
    root = tmp_path_factory.mktemp("flux_peft")
    for component, targets in (("transformer", FLUX_TARGETS), ("text_encoder", TE_TARGETS)):
        config = LoraConfig(r=4, lora_alpha=6.0, target_modules=targets, init_lora_weights=False)
        get_peft_model(getattr(src, component), config).save_pretrained(root / component)
    return root


def test_flux_peft_folders_of_transformer_and_clip_load_as_peft_loads_them(bases, flux_peft):
    from peft import PeftModel

    found = detect(flux_peft)
    assert found.kind == "peft_folders" and found.components == ["transformer", "text_encoder"]
    ours, _ = load_target(flux_peft, bases["flux"])
    theirs = build_tiny_flux_pipeline(seed=0)
    for component in ("transformer", "text_encoder"):
        PeftModel.from_pretrained(getattr(theirs, component), flux_peft / component)  # injects in place
    assert_matches("flux PEFT folders (transformer + CLIP, peft save_pretrained)", ours, theirs, "flux")


def test_a_transformer_peft_folder_on_an_sd_base_is_one_line_exit_2(bases, images, flux_peft, tmp_path, capsys):
    capsys.readouterr()
    assert_refused(audit(bases["sd1"], flux_peft, images, tmp_path / "out"), capsys, "'transformer'", "does not have")


def test_flux_kohya_lora_in_bfloat16_loads_as_diffusers_loads_it(bases, tmp_path):
    """Published Flux LoRAs are mostly bf16: diffusers folds alpha into the bf16 factors, the fp32 base gets them cast."""
    from safetensors.torch import load_file

    file = kohya_file(tmp_path / "fp32.safetensors", KOHYA_FLUX_MODULES, alpha=3.0, seed=8)
    bf16 = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(file)).items()}, str(bf16))
    assert detect(bf16).kind == "kohya_lora"
    ours, _ = load_target(bf16, bases["flux"])
    assert_matches("flux kohya in bfloat16 (alpha 3 of rank 4)", ours, diffusers_loaded("flux", bf16), "flux")


def test_a_clip_only_kohya_lora_loads_on_flux_as_diffusers_loads_it(bases, tmp_path):
    """lora_te1_ layers alone name no family (CLIP-L is in every one): on a Flux base diffusers' Flux conversion reads them."""
    clip = {k: v for k, v in KOHYA_FLUX_MODULES.items() if k.startswith("lora_te1_")}
    file = kohya_file(tmp_path / "clip.safetensors", clip, alpha=8.0, seed=9)
    assert lora_family(detect(file).keys) is None
    ours, _ = load_target(file, bases["flux"])
    assert_matches("flux kohya CLIP-only (lora_te1_)", ours, diffusers_loaded("flux", file), "flux")


def test_flux_comfyui_lora_loads_as_diffusers_loads_it(bases, tmp_path):
    """ComfyUI's layout: kohya factors under the BFL module paths (``diffusion_model.double_blocks.0.img_attn.qkv``) and
    CLIP-L's (``text_encoders.clip_l.transformer.text_model.…``)."""
    def comfy(name: str) -> str:
        if name.startswith("lora_te1_text_model_"):
            rest = name.removeprefix("lora_te1_text_model_encoder_layers_0_")
            return "text_encoders.clip_l.transformer.text_model.encoder.layers.0." + rest.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
        block, _, rest = name.removeprefix("lora_unet_").partition("_0_")
        layer = {"img_attn_qkv": "img_attn.qkv", "img_attn_proj": "img_attn.proj", "img_mlp_0": "img_mlp.0", "img_mlp_2": "img_mlp.2",
                 "img_mod_lin": "img_mod.lin", "txt_attn_qkv": "txt_attn.qkv", "txt_attn_proj": "txt_attn.proj", "txt_mlp_0": "txt_mlp.0",
                 "txt_mlp_2": "txt_mlp.2", "txt_mod_lin": "txt_mod.lin", "linear2": "linear2", "modulation_lin": "modulation.lin"}[rest]
        return f"diffusion_model.{block}.0.{layer}"

    file = kohya_file(tmp_path / "comfy.safetensors", {comfy(k): v for k, v in KOHYA_FLUX_MODULES.items()}, alpha=2.0, seed=10)
    found = detect(file)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in found.keys
    assert (found.kind, found.variant) == ("kohya_lora", "comfyui") and lora_family(found.keys) == "flux"
    ours, _ = load_target(file, bases["flux"])
    assert_matches("flux ComfyUI (diffusion_model.double_blocks.0.img_attn.qkv, text_encoders.clip_l)", ours,
                   diffusers_loaded("flux", file), "flux")


def test_flux_kohya_names_of_diffusers_paths_load_as_diffusers_loads_them(bases, tmp_path):
    """``lora_transformer_<diffusers path>`` (kohya factors, every module with its alpha) beside ``lora_te1_``."""
    paths = ["transformer_blocks_0_attn_to_q", "transformer_blocks_0_attn_to_k", "transformer_blocks_0_attn_to_out_0",
             "transformer_blocks_0_attn_add_q_proj", "transformer_blocks_0_attn_to_add_out", "single_transformer_blocks_0_attn_to_v",
             "x_embedder", "context_embedder", "proj_out", "norm_out_linear"]
    widths = {"x_embedder": (16, 32), "context_embedder": (96, 32), "proj_out": (32, 16), "norm_out_linear": (32, 64)}
    modules = {f"lora_transformer_{p}": widths.get(p, (32, 32)) for p in paths}
    # CLIP: an attention and an MLP layer (diffusers' text-encoder loader cannot infer the key style of MLP layers alone)
    modules.update({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32), "lora_te1_text_model_encoder_layers_0_mlp_fc1": (32, 64)})
    file = kohya_file(tmp_path / "mixture.safetensors", modules, alpha=6.0, seed=11)
    found = detect(file)
    assert found.kind == "kohya_lora" and lora_family(found.keys) == "flux"
    ours, _ = load_target(file, bases["flux"])
    assert_matches("flux kohya names of diffusers paths (lora_transformer_*)", ours, diffusers_loaded("flux", file), "flux")


def test_clip_mlp_layers_alone_in_a_converted_flux_file_load_with_their_alpha(bases, tmp_path):
    """diffusers' text-encoder loader cannot infer the key style of converted CLIP MLP layers alone ("Could not
    automatically infer state dict type"); here they load, each layer's delta = alpha / rank * up @ down of the file."""
    from safetensors.torch import load_file

    modules = {"lora_transformer_transformer_blocks_0_attn_to_q": (32, 32), "lora_te1_text_model_encoder_layers_0_mlp_fc1": (32, 64),
               "lora_te1_text_model_encoder_layers_0_mlp_fc2": (64, 32)}
    file = kohya_file(tmp_path / "mlp.safetensors", modules, alpha=6.0, seed=12)
    with pytest.raises(ValueError, match="infer state dict type"):
        diffusers_loaded("flux", file)
    ours, _ = load_target(file, bases["flux"])
    sd = load_file(str(file))
    for name, path in (("mlp_fc1", "encoder.layers.0.mlp.fc1"), ("mlp_fc2", "encoder.layers.0.mlp.fc2")):
        layer = dict(ours.text_encoder.named_modules())[path]
        delta = layer.scaling["s2l_target"] * layer.lora_B["s2l_target"].weight @ layer.lora_A["s2l_target"].weight
        key = f"lora_te1_text_model_encoder_layers_0_{name}"
        expected = 6.0 / 4 * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"]
        assert torch.allclose(delta, expected, atol=1e-6), name
