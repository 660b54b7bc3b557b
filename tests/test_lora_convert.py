"""LoRA state-dict conversions diffusers ⇄ kohya: exact round trips, kohya names, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s2l_plugin.errors import FormatError
from s2l_plugin.formats.lora_convert import (
    _convert_diffusers_to_peft,
    _convert_kohya_to_peft,
    _convert_peft_to_kohya,
    convert_diffusers_to_kohya,
    convert_kohya_to_diffusers,
    rank_of,
)

UNET_MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
TE_MODULE = "encoder.layers.1.self_attn.q_proj"


def _factors(path: str, rank: int, fan_in: int = 32, fan_out: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{path}.lora_A.weight": torch.randn(rank, fan_in, generator=g), f"{path}.lora_B.weight": torch.randn(fan_out, rank, generator=g)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def module_names():
    from s2l_plugin.testbed import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    return {"unet": [n for n, _ in pipe.unet.named_modules()], "text_encoder": [n for n, _ in pipe.text_encoder.named_modules()]}


def test_peft_to_kohya_uses_kohya_names_and_a_scalar_alpha():
    out = _convert_peft_to_kohya(_factors(UNET_MODULE, 4), "lora_unet", 8.0)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert set(out) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert out[f"{name}.alpha"].shape == () and out[f"{name}.alpha"].dtype == torch.float32
    assert float(out[f"{name}.alpha"]) == 8.0


def test_text_encoder_modules_are_named_from_the_clip_text_model_root():
    sd = {f"text_encoder.{k}": v for k, v in _factors(TE_MODULE, 2).items()}
    out = convert_diffusers_to_kohya(sd, {"text_encoder": 2.0})
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in out


def test_missing_alpha_means_alpha_equals_rank():
    sd = {f"unet.{k}": v for k, v in _factors(UNET_MODULE, 3).items()}
    out = convert_diffusers_to_kohya(sd)
    assert float(out["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"]) == 3.0


def test_old_diffusers_spellings_are_read():
    a, b = torch.ones(2, 4), torch.zeros(4, 2)
    sd = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": a,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": b,
        "text_encoder.encoder.layers.0.self_attn.v_proj.lora_linear_layer.down.weight": a,
        "text_encoder.encoder.layers.0.self_attn.v_proj.lora_linear_layer.up.weight": b,
    }
    out = _convert_diffusers_to_peft(sd)
    assert out["unet"]["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"] is a
    assert out["text_encoder"]["encoder.layers.0.self_attn.v_proj.lora_B.weight"] is b


def test_diffusers_kohya_diffusers_round_trip_is_exact(module_names):
    sd = {f"unet.{k}": v for k, v in _factors(UNET_MODULE, 4, seed=1).items()}
    sd.update({f"text_encoder.{k}": v for k, v in _factors(TE_MODULE, 4, seed=2).items()})
    back, alphas = convert_kohya_to_diffusers(convert_diffusers_to_kohya(sd, {"unet": 8.0, "text_encoder": 2.0}), module_names)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert alphas == {"unet": {UNET_MODULE: 8.0}, "text_encoder": {TE_MODULE: 2.0}}


def test_diffusers_own_kohya_reader_accepts_the_export():
    """``lora_state_dict`` is what ``load_lora_weights`` calls: it runs diffusers' kohya converter."""
    from diffusers import StableDiffusionPipeline

    sd = {f"unet.{k}": v for k, v in _factors(UNET_MODULE, 4, seed=3).items()}
    sd.update({f"text_encoder.{k}": v for k, v in _factors(TE_MODULE, 4, seed=4).items()})
    kohya = convert_diffusers_to_kohya(sd, {"unet": 8.0, "text_encoder": 8.0})
    converted, alphas = StableDiffusionPipeline.lora_state_dict(dict(kohya))
    assert len(converted) == 4  # every factor renamed, none left over (the converter raises otherwise)
    assert alphas and set(alphas.values()) == {8.0}


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a", "plain LoRA"),
        ("lora_unet_no_such_module.lora_down.weight", "matches no module"),
        ("model.diffusion_model.x.weight", "not a kohya SD1 LoRA key"),
    ],
)
def test_unsupported_kohya_keys_are_refused_by_name(key, message, module_names):
    with pytest.raises(FormatError, match=message) as err:
        convert_kohya_to_diffusers({key: torch.zeros(1)}, module_names)
    assert "\n" not in str(err.value)


def test_a_module_without_its_up_factor_is_refused():
    sd = {f"{UNET_MODULE}.lora_A.weight": torch.zeros(2, 4)}
    with pytest.raises(FormatError, match="expected down and up"):
        _convert_peft_to_kohya(sd, "lora_unet", 2.0)


def test_a_non_lora_key_is_refused():
    with pytest.raises(FormatError, match="not a LoRA factor"):
        _convert_diffusers_to_peft({"unet.conv_in.weight": torch.zeros(1)})


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_kohya_round_trip_over_any_linear_subset(data, module_names):
    linear = [n for n in module_names["unet"] if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    chosen = data.draw(st.lists(st.sampled_from(linear), min_size=1, max_size=len(linear), unique=True))
    rank = data.draw(st.integers(1, 8))
    alpha = data.draw(st.floats(0.5, 64.0, allow_nan=False))
    peft = {}
    for i, path in enumerate(chosen):
        peft.update(_factors(path, rank, seed=i))
    kohya = _convert_peft_to_kohya(peft, "lora_unet", alpha)
    back, alphas = _convert_kohya_to_peft(kohya, "lora_unet", module_names["unet"])
    assert back.keys() == peft.keys() and all(torch.equal(back[k], peft[k]) for k in peft)
    assert alphas == {p: pytest.approx(alpha) for p in chosen}
    assert rank_of(back) == dict.fromkeys(chosen, rank)
