"""Format loaders: each community layout, built here from its documented key layout, loads onto the
base and gives the same denoiser output as the equivalent diffusers-format artifact loaded by diffusers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from s2l_plugin.errors import FormatError
from s2l_plugin.formats import detect as fmt
from s2l_plugin.formats.loaders import BUILTIN_LOADERS
from s2l_plugin.pipeline import load_pipeline

LOADERS = {loader.name: loader for loader in BUILTIN_LOADERS}
PROMPT = "a photo of the digit seven"

# Modules of the testbed architecture a LoRA patches: attention (self and cross), a 1x1 conv
# (proj_in), a 3x3 resnet conv (LoCon) and a CLIP projection.
UNET_LINEAR = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
]
UNET_CONV = ["down_blocks.0.resnets.0.conv1"]
# transformers >= 5 roots CLIPTextModel's modules at `encoder.`; kohya names keep sd-scripts' `text_model_`.
TE_LINEAR = ["encoder.layers.0.self_attn.q_proj"]


def denoise(pipe, prompt: str = PROMPT) -> torch.Tensor:
    """The UNet's noise prediction for fixed latents at two timesteps, conditioned on ``prompt``."""
    tok = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = pipe.text_encoder(tok.input_ids)[0].expand(2, -1, -1)
        return pipe.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample


def _factors(model, paths, rank, gen):
    """Random (down, up) LoRA factors shaped for each module of ``model`` (non-zero up, so the LoRA changes outputs)."""
    modules = dict(model.named_modules())
    out = {}
    for p in paths:
        m = modules[p]
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=gen) * 0.1
            up = torch.randn(m.out_channels, rank, 1, 1, generator=gen) * 0.1
        else:
            down = torch.randn(rank, m.in_features, generator=gen) * 0.1
            up = torch.randn(m.out_features, rank, generator=gen) * 0.1
        out[p] = (down, up)
    return out


@pytest.fixture
def lora_factors(tiny_pipeline):
    gen = torch.Generator().manual_seed(1)
    return {
        "unet": _factors(tiny_pipeline.unet, UNET_LINEAR + UNET_CONV, 4, gen),
        "text_encoder": _factors(tiny_pipeline.text_encoder, TE_LINEAR, 4, gen),
    }


def _diffusers_file(path, factors, scale):
    """diffusers layout (no alpha metadata = scale 1): ``<component>.<module>.lora_A/B.weight``, up pre-scaled."""
    sd = {}
    for comp, mods in factors.items():
        for p, (down, up) in mods.items():
            sd[f"{comp}.{p}.lora_A.weight"] = down.contiguous()
            sd[f"{comp}.{p}.lora_B.weight"] = (up * scale).contiguous()
    save_file(sd, str(path))
    return path


def _kohya_file(path, factors, alpha, metadata=None):
    """kohya layout (sd-scripts networks/lora.py): prefix + module path with dots as underscores, .alpha per module."""
    sd = {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    for comp, mods in factors.items():
        for p, (down, up) in mods.items():
            if comp == "text_encoder" and not p.startswith("text_model."):
                p = "text_model." + p
            name = prefixes[comp] + p.replace(".", "_")
            sd[f"{name}.lora_down.weight"] = down.contiguous()
            sd[f"{name}.lora_up.weight"] = up.contiguous()
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata=metadata)
    return path


def _diffusers_reference(base, file):
    """What diffusers itself makes of the diffusers-layout file (the independent reference)."""
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    return pipe


def test_kohya_lora_with_alpha_and_locon_conv_matches_diffusers(tiny_pipeline, lora_factors, tmp_path):
    alpha, rank = 2.0, 4
    kohya = _kohya_file(tmp_path / "community.safetensors", lora_factors, alpha, {"ss_network_module": "networks.lora"})
    (tmp_path / "ref").mkdir()
    ref_file = _diffusers_file(tmp_path / "ref" / "pytorch_lora_weights.safetensors", lora_factors, alpha / rank)
    assert fmt.detect(kohya).kind == fmt.KOHYA_LORA and LOADERS["lora"].sniff(kohya)
    target = LOADERS["lora"].load(kohya, tiny_pipeline)
    expected = denoise(_diffusers_reference(tiny_pipeline, ref_file))
    got = denoise(target)
    base = denoise(tiny_pipeline)
    assert (expected - base).abs().max() > 1e-3  # the LoRA changes the output: the comparison can fail
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(denoise(tiny_pipeline), base)  # the base pipeline was not modified


def test_diffusers_lora_file_and_folder_match_diffusers(tiny_pipeline, lora_factors, tmp_path):
    (tmp_path / "out").mkdir()
    file = _diffusers_file(tmp_path / "out" / "pytorch_lora_weights.safetensors", lora_factors, 1.0)
    expected = denoise(_diffusers_reference(tiny_pipeline, file))
    for path in (file, tmp_path / "out"):
        assert fmt.detect(path).kind == fmt.DIFFUSERS_LORA
        torch.testing.assert_close(denoise(LOADERS["lora"].load(path, tiny_pipeline)), expected, atol=1e-5, rtol=1e-4)


def test_peft_folders_as_the_s2l_reference_writes_them(tiny_pipeline, tmp_path):
    """S2L's s2l.py: get_peft_model(unet / text_encoder, LoraConfig).save_pretrained(output_dir/<component>)."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(tiny_pipeline)
    gen = torch.Generator().manual_seed(3)
    factors = {}
    for comp, targets, r, alpha in (("unet", ["to_q", "to_v"], 4, 8), ("text_encoder", ["q_proj", "v_proj"], 2, 2)):
        model = copy.deepcopy(getattr(base, comp))
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        peft_model.save_pretrained(str(tmp_path / "s2l_out" / comp))
        sd = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
        mods = {}
        for k, v in sd.items():
            path = k.removeprefix("base_model.model.").replace(".default", "")
            mod, side = path.rsplit(".lora_", 1)
            mods.setdefault(mod, [None, None])["A.weight" not in side and 1 or 0] = v
        factors[comp] = {m: (d, u * (alpha / r)) for m, (d, u) in mods.items()}
    assert (tmp_path / "s2l_out" / "unet" / "adapter_config.json").is_file()
    found = fmt.detect(tmp_path / "s2l_out")
    assert found.kind == fmt.PEFT_FOLDERS and found.components == ["unet", "text_encoder"]
    (tmp_path / "ref").mkdir()
    ref = _diffusers_file(tmp_path / "ref" / "pytorch_lora_weights.safetensors", factors, 1.0)
    expected = denoise(_diffusers_reference(tiny_pipeline, ref))
    assert (expected - denoise(tiny_pipeline)).abs().max() > 1e-3
    got = denoise(LOADERS["peft_folders"].load(tmp_path / "s2l_out", tiny_pipeline))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "suffixes, variant",
    [
        (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"), "LoHa"),
        (("lokr_w1", "lokr_w2", "alpha"), "LoKr"),
        (("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"), "Tucker"),
        (("lora_down.weight", "lora_up.weight", "dora_scale"), "DoRA"),
    ],
)
def test_lycoris_variants_fail_naming_the_variant_and_never_load_partially(tiny_pipeline, tmp_path, suffixes, variant):
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    plain = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
    sd = {f"{name}.{s}": torch.ones(4, 4) for s in suffixes}
    sd.update({f"{plain}.lora_down.weight": torch.ones(4, 64), f"{plain}.lora_up.weight": torch.ones(64, 4)})
    path = tmp_path / "lyco.safetensors"
    save_file(sd, str(path))
    before = denoise(tiny_pipeline)
    with pytest.raises(FormatError, match=variant):
        LOADERS["lora"].load(path, tiny_pipeline)
    torch.testing.assert_close(denoise(tiny_pipeline), before)


def test_width_mismatch_names_both_numbers(tiny_pipeline, tmp_path):
    """An SD 1.5 LoRA (cross-attention width 768) on the testbed (32): one error with both widths."""
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    path = tmp_path / "sd15.safetensors"
    save_file({f"{name}.lora_down.weight": torch.ones(4, 768), f"{name}.lora_up.weight": torch.ones(64, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    with pytest.raises(FormatError, match=r"cross-attention width mismatch .* file has input width 768, the base has 32"):
        LOADERS["lora"].load(path, tiny_pipeline)
    te = tmp_path / "te.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 768),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, 4)}, str(te))
    with pytest.raises(FormatError, match=r"text-encoder width mismatch .* 768, the base has 32"):
        LOADERS["lora"].load(te, tiny_pipeline)


def test_unknown_module_and_pickled_lora(tiny_pipeline, tmp_path):
    path = tmp_path / "other_arch.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(4, 64),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(64, 4)}, str(path))
    with pytest.raises(FormatError, match="matches no module"):
        LOADERS["lora"].load(path, tiny_pipeline)
    pt = tmp_path / "lora.ckpt"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(1, 1)}, pt)
    with pytest.raises(FormatError, match="allow-pickle"):
        LOADERS["lora"].load(pt, tiny_pipeline)


def test_pipeline_folder_loads_and_refuses_code_and_escapes(tiny_pipeline, tmp_path):
    folder = tmp_path / "db"
    tiny_pipeline.save_pretrained(folder)
    assert fmt.detect(folder).kind == fmt.DIFFUSERS_PIPELINE
    target = LOADERS["diffusers_pipeline"].load(folder, tiny_pipeline)
    torch.testing.assert_close(denoise(target), denoise(tiny_pipeline))

    index = json.loads((folder / "model_index.json").read_text())
    evil = tmp_path / "evil"
    tiny_pipeline.save_pretrained(evil)
    (evil / "model_index.json").write_text(json.dumps({**index, "unet": ["my_evil_lib", "UNet"]}))
    with pytest.raises(FormatError, match="library 'my_evil_lib'"):
        load_pipeline(evil)

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "vae" / "diffusion_pytorch_model.safetensors").symlink_to(outside)
    with pytest.raises(FormatError, match="outside the given folder"):
        load_pipeline(folder)


def test_embeddings_in_all_three_layouts_match_diffusers(tiny_pipeline, tmp_path):
    """diffusers (key = token), kohya ``emb_params`` (token = file stem), A1111 ``.pt`` (``string_to_param``, ``name``)."""
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    diffusers_file = tmp_path / "learned_embeds.safetensors"
    save_file({"jane": vectors}, str(diffusers_file))
    kohya_file = tmp_path / "jane.safetensors"
    save_file({"emb_params": vectors}, str(kohya_file))
    a1111_file = tmp_path / "jane.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone()}, "name": "jane", "step": 100,
                "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "testbed"}, a1111_file)

    reference = copy.deepcopy(tiny_pipeline)
    reference.load_textual_inversion(str(diffusers_file))
    expected = denoise(reference, "a photo of jane")
    assert (expected - denoise(copy.deepcopy(reference), "a photo of")).abs().max() > 1e-4
    for path, allow in ((diffusers_file, False), (kohya_file, False), (a1111_file, True)):
        assert fmt.detect(path, allow_pickle=allow).kind == fmt.TEXTUAL_INVERSION
        target = LOADERS["textual_inversion"].load(path, tiny_pipeline, allow_pickle=allow)
        torch.testing.assert_close(denoise(target, "a photo of jane"), expected, atol=1e-5, rtol=1e-4)
    assert "jane" not in tiny_pipeline.tokenizer.get_vocab()  # the base was not modified
    with pytest.raises(FormatError, match="allow-pickle"):
        LOADERS["textual_inversion"].load(a1111_file, tiny_pipeline)
    wide = tmp_path / "sd15.safetensors"
    save_file({"<sd15>": torch.zeros(1, 768)}, str(wide))
    with pytest.raises(FormatError, match="768.*32"):
        LOADERS["textual_inversion"].load(wide, tiny_pipeline)


def _a1111_hypernetwork(widths, gen, old_keys=False):
    """A1111 layout, layer_structure [1, 2, 1] with activation "linear": Sequential slots linear.0 / linear.1."""
    data = {"layer_structure": [1, 2, 1], "activation_func": "linear", "is_layer_norm": False,
            "weight_initialization": "Normal", "use_dropout": False, "activate_output": False,
            "name": "janes_face", "step": 200, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "testbed"}
    for w in widths:
        pair = []
        for _ in "kv":
            sd = {"linear.0.weight": torch.randn(2 * w, w, generator=gen) * 0.1, "linear.0.bias": torch.randn(2 * w, generator=gen) * 0.1,
                  "linear.1.weight": torch.randn(w, 2 * w, generator=gen) * 0.1, "linear.1.bias": torch.randn(w, generator=gen) * 0.1}
            if old_keys:
                sd = {k.replace("linear.0", "linear1").replace("linear.1", "linear2"): v for k, v in sd.items()}
            pair.append(sd)
        data[w] = tuple(pair)
    return data


class _PlusMLP(torch.nn.Module):
    def __init__(self, proj, state):
        super().__init__()
        self.proj = proj
        w = proj.in_features
        self.mlp = torch.nn.Sequential(torch.nn.Linear(w, 2 * w), torch.nn.Linear(2 * w, w))
        self.mlp.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})

    def forward(self, x):
        return self.proj(x + self.mlp(x))


def _patched_by_hand(pipe, data):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    pipe = copy.deepcopy(pipe)
    pipe.unet.set_attn_processor(AttnProcessor())
    for module in pipe.unet.modules():
        if isinstance(module, Attention) and module.to_k.in_features in data:
            k_state, v_state = data[module.to_k.in_features]
            module.to_k, module.to_v = _PlusMLP(module.to_k, k_state), _PlusMLP(module.to_v, v_state)
    return pipe


def test_a1111_hypernetwork_pt_loads_weights_only_and_matches_its_safetensors_form(tiny_pipeline, tmp_path):
    from s2l_plugin.formats.hypernetwork_format import read_hypernetwork, write_hypernetwork

    # Context widths of the testbed UNet: 32 (cross-attention, text) and 64 (self-attention in the 64-wide block).
    pt = tmp_path / "janes_face.pt"
    torch.save(_a1111_hypernetwork([32, 64], torch.Generator().manual_seed(7)), pt)
    old = tmp_path / "old_style.pt"
    torch.save(_a1111_hypernetwork([32, 64], torch.Generator().manual_seed(7), old_keys=True), old)
    st = write_hypernetwork(read_hypernetwork(pt, allow_pickle=True), tmp_path / "janes_face.safetensors")

    base = denoise(tiny_pipeline)
    from_pt = denoise(LOADERS["hypernetwork"].load(pt, tiny_pipeline, allow_pickle=True))
    assert (from_pt - base).abs().max() > 1e-4
    # Independent reference (diffusers has no hypernetwork format): A1111's rule written out with plain
    # modules -- to_k / to_v see ``context + MLP(context)``, where context is the text for attn2 and the
    # hidden states for attn1; queries untouched.
    torch.testing.assert_close(from_pt, denoise(_patched_by_hand(tiny_pipeline, torch.load(pt, weights_only=True))))
    for path, allow in ((old, True), (st, False)):
        assert LOADERS["hypernetwork"].sniff(path, allow_pickle=allow)
        torch.testing.assert_close(denoise(LOADERS["hypernetwork"].load(path, tiny_pipeline, allow_pickle=allow)), from_pt)
    torch.testing.assert_close(denoise(tiny_pipeline), base)
    with pytest.raises(FormatError, match="allow-pickle"):
        LOADERS["hypernetwork"].load(pt, tiny_pipeline)
    wide = tmp_path / "sd15.pt"
    torch.save(_a1111_hypernetwork([768], torch.Generator().manual_seed(0)), wide)
    with pytest.raises(FormatError, match="768"):
        LOADERS["hypernetwork"].load(wide, tiny_pipeline, allow_pickle=True)


# -- single-file checkpoints: the original (LDM) Stable Diffusion key layout, written from a diffusers model --


def unet_to_ldm(sd, n_blocks, lpb):
    """diffusers UNet keys -> original SD `model.diffusion_model.` keys (input/middle/output_blocks)."""
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    for i in range(n_blocks):
        for j in range(lpb):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(lpb + 1) * i + j + 1}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(lpb + 1) * i + j + 1}.1."))
        if i < n_blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(lpb + 1) * (i + 1)}.0.op."))
        for j in range(lpb + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(lpb + 1) * i + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(lpb + 1) * i + j}.1."))
        if i < n_blocks - 1:
            has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(lpb + 1) * i + lpb}.{2 if has_attn else 1}."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    for j in range(2):
        pairs.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    resnet = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
              ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]
    out = {}
    for k, v in sd.items():
        for a, b in pairs:
            if k.startswith(a):
                rest = k[len(a):]
                if ".resnets." in a:
                    for ra, rb in resnet:
                        if rest.startswith(ra):
                            rest = rb + rest[len(ra):]
                out["model.diffusion_model." + b + rest] = v
                break
        else:
            raise KeyError(k)
    return out


def vae_to_ldm(sd, n_blocks):
    """diffusers VAE keys -> `first_stage_model.` keys (down/up.N.block, mid.attn_1 with 1x1-conv q/k/v)."""
    out = {}
    for k, v in sd.items():
        new = k
        for part in ("encoder", "decoder"):
            for i in range(n_blocks):
                ldm_i = i if part == "encoder" else n_blocks - 1 - i
                blocks = "down_blocks" if part == "encoder" else "up_blocks"
                ldm = "down" if part == "encoder" else "up"
                new = new.replace(f"{part}.{blocks}.{i}.resnets.", f"{part}.{ldm}.{ldm_i}.block.")
                new = new.replace(f"{part}.{blocks}.{i}.downsamplers.0.", f"{part}.{ldm}.{ldm_i}.downsample.")
                new = new.replace(f"{part}.{blocks}.{i}.upsamplers.0.", f"{part}.{ldm}.{ldm_i}.upsample.")
            for j in range(2):
                new = new.replace(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.")
            new = new.replace(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")
            new = new.replace(f"{part}.conv_norm_out.", f"{part}.norm_out.")
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attn_1." in new:
            for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
                new = new.replace(".attn_1." + a, ".attn_1." + b)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                v = v[:, :, None, None]
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(sd):
    """CLIP text-encoder keys -> `cond_stage_model.transformer.text_model.` keys (SD 1.x)."""
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def _ldm_state(pipe):
    return {k: v.contiguous() for k, v in {**unet_to_ldm(pipe.unet.state_dict(), 2, 1), **vae_to_ldm(pipe.vae.state_dict(), 2),
                                           **clip_to_ldm(pipe.text_encoder.state_dict())}.items()}


def test_single_file_checkpoint_matches_the_diffusers_folder(tiny_pipeline, tmp_path):
    from s2l_plugin.testbed import build_tiny_pipeline

    tuned = build_tiny_pipeline(seed=1)  # a "fine-tuned" model: same architecture, other weights
    tuned.save_pretrained(tmp_path / "tuned")
    expected = denoise(load_pipeline(tmp_path / "tuned"))
    assert (expected - denoise(tiny_pipeline)).abs().max() > 1e-3
    single = tmp_path / "model.safetensors"
    save_file(_ldm_state(tuned), str(single))
    assert fmt.detect(single).kind == fmt.SINGLE_FILE
    target = LOADERS["single_file"].load(single, tiny_pipeline)
    torch.testing.assert_close(denoise(target), expected)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(target.vae.encode(image).latent_dist.mean, tuned.vae.encode(image).latent_dist.mean)

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": _ldm_state(tuned), "global_step": 1000}, ckpt)
    with pytest.raises(FormatError, match="allow-pickle"):
        LOADERS["single_file"].load(ckpt, tiny_pipeline)
    torch.testing.assert_close(denoise(LOADERS["single_file"].load(ckpt, tiny_pipeline, allow_pickle=True)), expected)


def test_peft_folder_file_linked_outside_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"base_model.model.x.lora_A.weight": torch.ones(1, 1)}, str(outside))
    comp = tmp_path / "adapter" / "unet"
    comp.mkdir(parents=True)
    (comp / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    (comp / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(FormatError, match="outside the given folder"):
        fmt.detect(tmp_path / "adapter")


def test_sdxl_lora_on_an_sd1_base_names_the_missing_encoder(tiny_pipeline, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 32),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, 4)}, str(path))
    with pytest.raises(FormatError, match="lora_te2_ need a base with a text_encoder_2"):
        LOADERS["lora"].load(path, tiny_pipeline)


def test_non_lora_peft_adapter_names_its_type(tiny_pipeline, tmp_path):
    comp = tmp_path / "adapter" / "unet"
    comp.mkdir(parents=True)
    (comp / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 4}))
    save_file({"base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.hada_w1_a": torch.ones(64, 4)},
              str(comp / "adapter_model.safetensors"))
    with pytest.raises(FormatError, match="type 'LOHA'"):
        LOADERS["peft_folders"].load(tmp_path / "adapter", tiny_pipeline)


def test_hook_register_loaders_a_plugin_loader_serves_load_target(tiny_pipeline, tmp_path, lora_factors):
    from s2l_plugin.hooks import hookimpl
    from s2l_plugin.hooks.manager import make_plugin_manager

    from s2l_plugin.formats.loaders import load_target

    class MagicLoader:
        name = "magic"

        def sniff(self, path):
            return open(path, "rb").read(5) == b"MAGIC"

        def load(self, path, base):
            return ("loaded by plugin", path)

    class Plugin:
        @hookimpl
        def register_loaders(self, register):
            register(MagicLoader())

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Plugin()])
    magic = tmp_path / "x.magic"
    magic.write_bytes(b"MAGIC and more")
    target, found = load_target(magic, tiny_pipeline, pm=pm)
    assert target == ("loaded by plugin", magic) and found.kind == "magic"

    kohya = _kohya_file(tmp_path / "k.safetensors", lora_factors, 4.0)
    target, found = load_target(kohya, tiny_pipeline, pm=pm)
    assert found.kind == fmt.KOHYA_LORA and (denoise(target) - denoise(tiny_pipeline)).abs().max() > 1e-3
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 32)
    with pytest.raises(FormatError, match="unrecognised first bytes"):
        load_target(junk, tiny_pipeline, pm=pm)
