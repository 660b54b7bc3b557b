"""Single-file base models (the original layout AUTOMATIC1111, ComfyUI and kohya share: one
``.safetensors`` or ``.ckpt``), SD 1.x and SDXL, through the one loader with a local config folder:
diffusers' ``from_single_file`` converts them and every weight matches the pipeline the file was
written from; a missing config, a config of the other family and a pickle without the opt-in are
one-line refusals.

diffusers writes no single-file layout (it only reads one), so the files are built here from the
diffusers state dicts with the original key names: SD 1.x with :mod:`test_formats`' mapping (checked
there against ``from_single_file``), SDXL with the same UNet/VAE mapping plus SDXL's own parts —
``label_emb`` (the size/pooled embedding), ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L,
transformers layout) and ``conditioner.embedders.1.model.*`` (OpenCLIP bigG: fused ``in_proj``
attention, ``text_projection`` stored transposed).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_formats import clip_to_ldm, unet_to_ldm, vae_to_ldm

from s2l_plugin.cli import main
from s2l_plugin.errors import FormatError, InputError
from s2l_plugin.pipeline import load_pipeline, model_family
from s2l_plugin.testbed.components import build_tiny_pipeline, build_tiny_sdxl_pipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _open_clip(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP keys under ``prefix``."""
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           prefix + "text_projection": sd["text_projection.weight"].T}
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{w}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{w}"] for x in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{b}.{w}"] = sd[f"{src}{a}.{w}"]
    return out


def single_file_state(pipe) -> dict:
    """The original-layout state dict of an SD or SDXL pipeline."""
    unet = pipe.unet.state_dict()
    n_blocks, lpb = len(pipe.unet.config.block_out_channels), pipe.unet.config.layers_per_block
    state = unet_to_ldm({k: v for k, v in unet.items() if not k.startswith("add_embedding.")}, n_blocks, lpb)
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict()))
    else:
        for k, v in unet.items():
            if k.startswith("add_embedding."):
                layer = {"linear_1": "0", "linear_2": "2"}[k.split(".")[1]]
                state[f"model.diffusion_model.label_emb.0.{layer}.{k.split('.')[2]}"] = v
        state.update({"conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
                      for k, v in pipe.text_encoder.state_dict().items()})
        state.update(_open_clip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def family(request, tmp_path_factory):
    """(family, config folder (seed 0), single-file checkpoint of another model (seed 1), that model)."""
    build = build_tiny_pipeline if request.param == "sd" else build_tiny_sdxl_pipeline
    root = tmp_path_factory.mktemp(f"single-{request.param}")
    build(seed=0).save_pretrained(root / "config")
    tuned = build(seed=1)
    save_file(single_file_state(tuned), str(root / "model.safetensors"))
    return request.param, root / "config", root / "model.safetensors", tuned


def test_a_single_file_base_loads_with_every_weight_of_its_model(family):
    name, config, file, tuned = family
    assert model_family(file) == name
    pipe = load_pipeline(file, config=config)
    assert type(pipe).__name__ == type(tuned).__name__
    for component in COMPONENTS:
        ours, theirs = getattr(pipe, component, None), getattr(tuned, component, None)
        if theirs is None:
            continue
        a, b = ours.state_dict(), theirs.state_dict()
        assert set(a) == set(b), component
        unequal = [k for k in b if not torch.equal(a[k], b[k])]
        assert not unequal, (component, unequal[:3])


def test_s2l_audit_takes_a_single_file_base(family, test_testbed, tmp_path):
    name, config, file, tuned = family
    images = test_testbed.path / "members" / "seven", test_testbed.path / "nonmembers" / "seven"
    target = tmp_path / "target.safetensors"
    retuned = (build_tiny_pipeline if name == "sd" else build_tiny_sdxl_pipeline)(seed=2)
    save_file(single_file_state(retuned), str(target))
    out = tmp_path / "audit"
    assert main(["audit", "--base", str(file), "--base-config", str(config), "--model", str(target),
                 "--members", str(images[0]), "--nonmembers", str(images[1]), "--attacks", "loss",
                 "--no-memorization", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["audits"][0]["model"]["path"] == result["config"]["base"] == str(file)  # the file, not its config folder
    assert [p["kind"] for p in result["config"]["loaded"]] == ["single_file_checkpoint"]
    base_scores = result["audits"][0]["membership"]["attacks"][0]["member_scores"]
    target_scores = result["audits"][1]["membership"]["attacks"][0]["member_scores"]
    assert base_scores != target_scores


def test_single_file_refusals(family, tmp_path, capsys):
    name, config, file, _ = family
    with pytest.raises(InputError, match="single-file checkpoint; expected a config folder"):
        load_pipeline(file)
    other = tmp_path / "other-config"
    (build_tiny_sdxl_pipeline if name == "sd" else build_tiny_pipeline)(seed=0).save_pretrained(other)
    with pytest.raises(FormatError, match="expected a config folder of the same model family"):
        load_pipeline(file, config=other)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": single_file_state(load_pipeline(file, config=config))}, ckpt)
    capsys.readouterr()
    assert main(["audit", "--base", str(ckpt), "--base-config", str(config), "--model", str(file),
                 "--no-memorization"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allow-pickle" in err[0], err
    pipe = load_pipeline(ckpt, config=config, allow_pickle=True)
    assert torch.equal(next(iter(pipe.unet.state_dict().values())), next(iter(load_pipeline(file, config=config).unet.state_dict().values())))


def test_generate_and_finetune_take_a_single_file_model(family, test_testbed, tmp_path, capsys):
    name, config, file, _ = family
    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(file), "--model-config", str(config), "--domain", "seven", "--num-images", "2",
                 "--steps", "2", "--out", str(gen), "--no-progress"]) == 0
    assert len(list((gen / "images").glob("*.png"))) == 2
    lora = tmp_path / "lora"
    assert main(["finetune", "--method", "lora", "--model", str(file), "--model-config", str(config),
                 "--data", str(test_testbed.path / "members" / "seven"), "--out", str(lora), "--steps", "1", "--batch-size", "2"]) == 0
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    capsys.readouterr()
    assert main(["finetune", "--method", "lora", "--model", str(file), "--data", str(test_testbed.path / "members" / "seven"),
                 "--out", str(tmp_path / "no-config")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model-config" in err[0], err
    assert not (tmp_path / "no-config").exists()


def test_s2l_run_takes_a_single_file_base_with_base_config(family, test_testbed, tmp_path, capsys):
    name, config, file, _ = family
    members, nonmembers = test_testbed.path / "members" / "seven", test_testbed.path / "nonmembers" / "seven"
    body = (f'base = "{file}"\ndomains = ["seven"]\nmethods = ["lora"]\n'
            f'[data]\nmembers = "{members}"\nnonmembers = "{nonmembers}"\n'
            "[generate]\nnum_images = 2\nnum_inference_steps = 2\n[train]\nmax_train_steps = 1\ntrain_batch_size = 2\n"
            '[audit]\nattacks = ["loss"]\nextraction = 0\nmemorization = false\n')
    missing = tmp_path / "missing.toml"
    missing.write_text(f'out = "{tmp_path / "no-config"}"\n' + body)
    capsys.readouterr()
    assert main(["run", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base_config" in err[0], err
    assert not (tmp_path / "no-config").exists()
    good = tmp_path / "run.toml"
    good.write_text(f'out = "{tmp_path / "run"}"\nbase_config = "{config}"\n' + body)
    assert main(["run", str(good)]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [c["method"] for c in result["comparisons"]][:1] == ["lora"]


def test_launch_passes_its_base_config_to_the_run():
    import argparse

    from s2l_plugin.integration import add_arguments, run_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--pretrained_model_name_or_path")
    parser.add_argument("--output_dir")
    args = parser.parse_args(["--pretrained_model_name_or_path", "model.safetensors", "--output_dir", "out",
                              "--s2l-base-config", "config-dir"])
    assert run_from_args(args).options["base_config"] == "config-dir"
