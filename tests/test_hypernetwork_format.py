"""A1111 hypernetwork files: .pt ⇄ safetensors round trip, hand-built A1111 layouts, validation, the processor."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from s2l_plugin.adapters.base import Artifact
from s2l_plugin.adapters.hypernetwork import (
    HypernetworkAdapter,
    HypernetworkAttnProcessor,
    attention_context_widths,
    hypernetwork_from_file,
    hypernetwork_to_file,
    install_hypernetwork,
    make_hypernetwork,
    remove_hypernetwork,
)

from s2l_plugin.errors import FormatError
from s2l_plugin.formats.hypernetwork_format import (
    METADATA_KEYS,
    SAFETENSORS_MARKER_KEY,
    HypernetworkSpec,
    read_hypernetwork,
    write_hypernetwork,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear_sd(n_in: int, n_out: int, seed: int, prefix: str) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {f"{prefix}.weight": torch.randn(n_out, n_in, generator=g) * 0.1, f"{prefix}.bias": torch.randn(n_out, generator=g) * 0.1}


def _unet_inputs():
    g = _gen(123)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 40, 32, generator=g)


def _assert_same_file(a, b):
    assert a.spec == b.spec and a.name == b.name and a.step == b.step
    assert a.widths == b.widths
    for w in a.widths:
        for sa, sb in zip(a.layers[w], b.layers[w], strict=True):
            assert sorted(sa) == sorted(sb)
            for key in sa:
                torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


def test_a_pt_written_here_round_trips_through_safetensors(tmp_path):
    spec = HypernetworkSpec(layer_structure=[1, 2, 1.5, 1], activation_func="relu", is_layer_norm=True, use_dropout=True,
                            last_layer_dropout=True)
    net = make_hypernetwork(spec, [32, 64], seed=3)
    original = hypernetwork_to_file(net, name="s2l", step=11)
    pt = write_hypernetwork(original, tmp_path / "s2l.pt")

    from_pt = read_hypernetwork(pt, allow_pickle=True)
    st = write_hypernetwork(from_pt, tmp_path / "s2l.safetensors")
    from_st = read_hypernetwork(st)
    back = read_hypernetwork(write_hypernetwork(from_st, tmp_path / "again.pt"), allow_pickle=True)

    for got in (from_pt, from_st, back):
        _assert_same_file(original, got)
    raw = torch.load(tmp_path / "again.pt", weights_only=True)
    assert {k for k in raw if isinstance(k, int)} == {32, 64}
    assert set(METADATA_KEYS) <= set(raw)
    assert raw["layer_structure"] == [1, 2, 1.5, 1] and raw["activation_func"] == "relu" and raw["is_layer_norm"] is True


def test_the_safetensors_header_carries_the_a1111_metadata(tmp_path):
    from safetensors import safe_open

    spec = HypernetworkSpec(layer_structure=[1, 2, 1], activation_func="swish")
    path = write_hypernetwork(hypernetwork_to_file(make_hypernetwork(spec, [32]), name="n", step=4), tmp_path / "n.safetensors")

    with safe_open(str(path), framework="pt") as fh:
        meta, keys = fh.metadata(), sorted(fh.keys())

    assert meta[SAFETENSORS_MARKER_KEY] == "a1111-hypernetwork"
    assert json.loads(meta["layer_structure"]) == [1, 2, 1]
    assert json.loads(meta["activation_func"]) == "swish" and json.loads(meta["step"]) == 4
    assert keys == ["32.k.linear.0.bias", "32.k.linear.0.weight", "32.k.linear.2.bias", "32.k.linear.2.weight",
                    "32.v.linear.0.bias", "32.v.linear.0.weight", "32.v.linear.2.bias", "32.v.linear.2.weight"]


def test_a_hand_built_a1111_file_loads_and_computes_the_documented_mlp(tmp_path):
    # Written from the documented layout: [1, 2, 1], relu → Sequential(Linear, ReLU, Linear): keys linear.0, linear.2.
    def module(seed):
        return OrderedDict({**_linear_sd(32, 64, seed, "linear.0"), **_linear_sd(64, 32, seed + 1, "linear.2")})

    data = {32: (module(0), module(10)), "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
            "use_dropout": False, "name": "handmade", "step": 1000, "sd_checkpoint": "abc123", "sd_checkpoint_name": "tiny",
            "weight_initialization": "Orthogonal"}
    torch.save(data, tmp_path / "handmade.pt")

    net = hypernetwork_from_file(read_hypernetwork(tmp_path / "handmade.pt", allow_pickle=True)).eval()

    x = torch.randn(3, 32, generator=_gen(5))
    k = data[32][0]
    want = x + torch.relu(x @ k["linear.0.weight"].T + k["linear.0.bias"]) @ k["linear.2.weight"].T + k["linear.2.bias"]
    torch.testing.assert_close(net.layers["32"][0](x), want)
    # its metadata survives the safetensors form, the initialisation name this project does not use included
    again = read_hypernetwork(write_hypernetwork(read_hypernetwork(tmp_path / "handmade.pt", allow_pickle=True), tmp_path / "h.safetensors"))
    assert (again.name, again.step) == ("handmade", 1000)
    assert again.extra["sd_checkpoint"] == "abc123" and again.extra["weight_initialization"] == "Orthogonal"


def test_an_old_style_linear1_linear2_file_loads_as_a_plain_1_2_1_mlp(tmp_path):
    def module(seed):
        return {**_linear_sd(32, 64, seed, "linear1"), **_linear_sd(64, 32, seed + 1, "linear2")}

    torch.save({32: (module(0), module(2)), 64: (_old64 := {**_linear_sd(64, 128, 4, "linear1"), **_linear_sd(128, 64, 5, "linear2")}, _old64)},
               tmp_path / "old.pt")

    hn = read_hypernetwork(tmp_path / "old.pt", allow_pickle=True)
    net = hypernetwork_from_file(hn).eval()

    assert hn.spec.layer_structure == [1, 2, 1] and hn.spec.activation_func == "linear" and hn.name == "old"
    x = torch.randn(2, 64, generator=_gen(6))
    want = x + (x @ _old64["linear1.weight"].T + _old64["linear1.bias"]) @ _old64["linear2.weight"].T + _old64["linear2.bias"]
    torch.testing.assert_close(net.layers["64"][1](x), want)


def test_an_old_style_file_applies_to_the_unet(tiny_pipeline, tmp_path):
    module = {**_linear_sd(32, 64, 0, "linear1"), **_linear_sd(64, 32, 1, "linear2")}
    torch.save({32: (module, module)}, tmp_path / "old.pt")
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        base = tiny_pipeline.unet(x, t, ctx).sample

    HypernetworkAdapter().load(tiny_pipeline, Artifact(method="hypernetwork", path=tmp_path / "old.pt"), allow_pickle=True)
    with torch.no_grad():
        changed = tiny_pipeline.unet(x, t, ctx).sample

    assert (changed - base).abs().max() > 1e-4
    # only the cross-attention layers (context width 32) got the processor
    procs = tiny_pipeline.unet.attn_processors
    assert {n for n, p in procs.items() if isinstance(p, HypernetworkAttnProcessor)} == {
        n for n, (w, _) in attention_context_widths(tiny_pipeline.unet).items() if w == 32
    }


def test_a_file_whose_width_the_base_lacks_is_one_error_naming_both(tiny_pipeline, tmp_path):
    spec = HypernetworkSpec()
    write_hypernetwork(hypernetwork_to_file(make_hypernetwork(spec, [768, 64]), name="sd15", step=0), tmp_path / "sd15.safetensors")
    before = dict(tiny_pipeline.unet.attn_processors)

    with pytest.raises(FormatError, match=r"sd15.safetensors: hypernetwork module width 768 does not match the base model, "
                                          r"whose attention context widths are 32, 64"):
        HypernetworkAdapter().load(tiny_pipeline, Artifact(method="hypernetwork", path=tmp_path / "sd15.safetensors"))

    assert dict(tiny_pipeline.unet.attn_processors) == before  # nothing installed


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({32: ({"linear.0.weight": torch.zeros(64, 32)}, {})}, "keys do not match"),
        ({32: (_m := {**_linear_sd(32, 64, 0, "linear.0"), **_linear_sd(64, 16, 1, "linear.1")}, _m)}, r"shape \[16, 64\]; expected \[32, 64\]"),
        ({32: (_m, _m), "layer_structure": [2, 1]}, "starts and ends with 1"),
        ({32: (_m, _m), "activation_func": "prelu"}, "activation_func='prelu'"),
        ({32: (_m, _m), "skip_connection": True}, "skip_connection"),
        ({"name": "empty"}, "no modules"),
        ({32: torch.zeros(3)}, "expected a \\(k, v\\) pair"),
    ],
)
def test_malformed_files_are_format_errors(tmp_path, data, message):
    torch.save(data, tmp_path / "bad.pt")

    with pytest.raises(FormatError, match=message):
        read_hypernetwork(tmp_path / "bad.pt", allow_pickle=True)


def test_pt_files_are_refused_without_opt_in(tmp_path):
    write_hypernetwork(hypernetwork_to_file(make_hypernetwork(HypernetworkSpec(), [32]), name="x", step=0), tmp_path / "x.pt")

    with pytest.raises(FormatError, match="allow-pickle|allow_pickle"):
        read_hypernetwork(tmp_path / "x.pt")


def test_a_zero_mlp_reproduces_the_base_unet_and_removal_restores_the_processors(tiny_pipeline):
    unet = tiny_pipeline.unet
    x, t, ctx = _unet_inputs()
    original = dict(unet.attn_processors)
    keys_before = list(unet.state_dict())
    with torch.no_grad():
        base = unet(x, t, ctx).sample
    net = make_hypernetwork(HypernetworkSpec(activation_func="relu"), [32, 64], seed=0)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()

    installed = install_hypernetwork(unet, net)
    with torch.no_grad():
        same = unet(x, t, ctx).sample

    assert len(installed) == len(original)  # every attention layer: widths 32 (cross) and 64 (self)
    assert list(unet.state_dict()) == keys_before  # the MLPs live outside the UNet's state dict
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)
    assert remove_hypernetwork(unet) is True
    assert dict(unet.attn_processors) == original
