"""LyCORIS LoHa / LoKr, full LoCon and DoRA files, in SD 1.x and SDXL layouts, applied as peft applies them.

Each file holds the tensors of peft's own LoHa / LoKr / DoRA layers (injected with peft's API into a
tiny base), under the kohya / LyCORIS names of the real layout (SD 1.x: the diffusers module names;
SDXL: the original SGM block names, ``lora_te1`` / ``lora_te2``). Loaded by ``load_target`` /
``s2l audit``, the UNet output equals that of the peft model the tensors came from (within 1e-5).
What neither peft nor diffusers implements is refused in one line naming it.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_sdxl_formats import (
    TE_TARGETS,
    UNET_TARGETS,
    assert_audited,
    assert_matches,
    assert_refused,
    audit,
    bases,  # noqa: F401  (fixture)
    images,  # noqa: F401  (fixture)
    lora_config,
    peft_layers,
    to_kohya,
)

from s2l_plugin.formats.detect import detect
from s2l_plugin.formats.loaders import load_target
from s2l_plugin.testbed.components import build_tiny_pipeline, build_tiny_sdxl_pipeline

BUILD = {"sd1": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline}
COMPONENTS = {"sd1": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2")}


def _targets(component: str) -> list[str]:
    return UNET_TARGETS if component == "unet" else TE_TARGETS


def loha(component: str, tucker: bool = False):
    from peft import LoHaConfig

    return LoHaConfig(r=2, alpha=3.0, target_modules=_targets(component), init_weights=False, use_effective_conv2d=tucker)


def lokr(component: str, factorized: bool = True):
    from peft import LoKrConfig

    # r=2 decomposes the factors (lokr_w1_a/b, lokr_w2_a/b; scale alpha/r); r=16 keeps both full (scale 1, alpha = r).
    r = 2 if factorized else 16
    return LoKrConfig(r=r, alpha=3.0 if factorized else float(r), target_modules=_targets(component), init_weights=False,
                      decompose_both=factorized)


def dora(component: str):
    return lora_config(component, use_dora=True)


ALGORITHMS = {
    "loha": (loha, "LoHa", {"unet": 3.0, "text_encoder": 3.0, "text_encoder_2": 3.0}),
    "loha-tucker": (lambda c: loha(c, tucker=True), "LoHa", {"unet": 3.0, "text_encoder": 3.0, "text_encoder_2": 3.0}),
    "lokr-factorized": (lokr, "LoKr", {"unet": 3.0, "text_encoder": 3.0, "text_encoder_2": 3.0}),
    # both factors full: LyCORIS applies no alpha, so the file's alpha 4 must not scale the update
    "lokr-full": (lambda c: lokr(c, factorized=False), "LoKr", {"unet": 4.0, "text_encoder": 4.0, "text_encoder_2": 4.0}),
    "dora": (dora, "DoRA", {"unet": 8.0, "text_encoder": 2.0, "text_encoder_2": 2.0}),
}


def lycoris_file(layout: str, algorithm: str, path):
    """``(file, the peft model its tensors came from)``."""
    config_for, _, alphas = ALGORITHMS[algorithm]
    src = BUILD[layout](seed=0)
    layers = peft_layers(src, config_for, COMPONENTS[layout], seed=4)
    save_file(to_kohya(layers, alphas, sdxl=layout == "sdxl"), str(path))
    return path, src


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_lycoris_and_dora_files_apply_as_peft_applies_them(layout, algorithm, bases, tmp_path):  # noqa: F811
    file, src = lycoris_file(layout, algorithm, tmp_path / f"{algorithm}.safetensors")
    found = detect(file)
    assert found.kind == "kohya_lora" and ALGORITHMS[algorithm][1] in found.variant
    if algorithm.startswith("lokr"):
        suffixes = {k.partition(".")[2] for k in found.keys}
        assert ({"lokr_w1_a", "lokr_w2_b"} <= suffixes) == (algorithm == "lokr-factorized")
    if algorithm == "loha-tucker":
        assert any(k.endswith(".hada_t1") for k in found.keys)
    assert any(k.split(".")[0].endswith(("_conv1", "_in_layers_2")) for k in found.keys)  # full LoCon: conv layers too
    ours, _ = load_target(file, bases[layout])
    assert_matches(ours, src, BUILD[layout](seed=0))


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
@pytest.mark.parametrize("algorithm", ["loha", "lokr-factorized", "dora"])
def test_lycoris_files_are_audited_by_the_cli(layout, algorithm, bases, images, tmp_path):  # noqa: F811
    file, _ = lycoris_file(layout, algorithm, tmp_path / f"{algorithm}.safetensors")
    result = assert_audited(bases[layout], "--lora", file, images, tmp_path / "audit")
    assert ALGORITHMS[algorithm][1] in result["config"]["loaded"][0]["variant"]


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
@pytest.mark.parametrize("config_for", [dora, loha, lokr], ids=["dora", "loha", "lokr"])
def test_peft_folders_of_dora_loha_and_lokr_load_as_peft_loads_them(layout, config_for, bases, tmp_path):  # noqa: F811
    from peft import PeftModel, get_peft_model

    src = BUILD[layout](seed=0)
    torch.manual_seed(5)
    for component in COMPONENTS[layout]:
        get_peft_model(getattr(src, component), config_for(component)).save_pretrained(tmp_path / "peft" / component)
    ours, _ = load_target(tmp_path / "peft", bases[layout])
    theirs = BUILD[layout](seed=0)
    for component in COMPONENTS[layout]:
        PeftModel.from_pretrained(getattr(theirs, component), tmp_path / "peft" / component)
    assert_matches(ours, theirs, BUILD[layout](seed=0))


def test_what_neither_peft_nor_diffusers_implements_is_refused_in_one_line(bases, images, tmp_path, capsys):  # noqa: F811
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    tucker = {f"{name}.lora_down.weight": torch.ones(2, 64), f"{name}.lora_up.weight": torch.ones(64, 2),
              f"{name}.lora_mid.weight": torch.ones(2, 2, 1, 1)}
    save_file(tucker, str(tmp_path / "tucker.safetensors"))
    capsys.readouterr()
    assert_refused(audit(bases["sd1"], "--lora", tmp_path / "tucker.safetensors", images, tmp_path / "o1"), capsys,
                   "Tucker", "neither diffusers nor peft")
    # DoRA decomposed over the input channels (LyCORIS wd_on_out=False): peft's DoRA is per output channel.
    ffn = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"  # Linear 256 -> 64
    wd_in = {f"{ffn}.lora_down.weight": torch.ones(2, 256), f"{ffn}.lora_up.weight": torch.ones(64, 2),
             f"{ffn}.dora_scale": torch.ones(1, 256)}
    save_file(wd_in, str(tmp_path / "dora_in.safetensors"))
    assert_refused(audit(bases["sd1"], "--lora", tmp_path / "dora_in.safetensors", images, tmp_path / "o2"), capsys,
                   "DoRA", "(1, 256)", "input-axis")
    # A LoHa factor that does not fit its layer names the tensor and both shapes.
    loha_bad = {f"{name}.hada_w1_a": torch.ones(64, 2), f"{name}.hada_w1_b": torch.ones(2, 48),
                f"{name}.hada_w2_a": torch.ones(64, 2), f"{name}.hada_w2_b": torch.ones(2, 48), f"{name}.alpha": torch.tensor(2.0)}
    save_file(loha_bad, str(tmp_path / "loha_bad.safetensors"))
    assert_refused(audit(bases["sd1"], "--lora", tmp_path / "loha_bad.safetensors", images, tmp_path / "o3"), capsys,
                   "LoHa", "hada_w1_b", "(2, 48)", "(2, 64)")
    assert not any((tmp_path / o / "result.json").exists() for o in ("o1", "o2", "o3"))
