"""``s2l scan FILE --strip OUT``: a copy without the leaking metadata, tensors byte for byte, loadable as before."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from s2l_plugin.audit.metadata import KOHYA_MINIMUM_KEYS, LOADER_KEYS, scan_file, strip_file
from s2l_plugin.cli import main
from s2l_plugin.formats.detect import read_safetensors_header

UNET_MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_MODULE_2 = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"

LEAKY = {
    "ss_tag_frequency": json.dumps({"20_ohwx woman": {"ohwx woman": 14, "smiling in Lyon": 2}}),
    "ss_dataset_dirs": json.dumps({"20_ohwx woman": {"n_repeats": 20, "img_count": 14}}),
    "ss_datasets": json.dumps([{"subsets": [{"image_dir": "/home/jdoe/photos/jane", "class_tokens": "ohwx woman"}]}]),
    "ss_reg_dataset_dirs": json.dumps({"1_woman": {"n_repeats": 1, "img_count": 100}}),
    "ss_training_comment": "photos of Jane from the 2023 holiday",
    "ss_sample_prompts": "ohwx woman smiling, in a kitchen",
    "sample_captions": json.dumps(["ohwx woman at the beach"]),
    "ss_sd_model_name": "/home/jdoe/models/v1-5.safetensors",
    "ss_output_name": "jane_lora",
    "ss_num_train_images": "280",
    "ss_seed": "1234",
    "ss_session_id": "98765",
    "ss_training_started_at": "1700000000.0",
    "some_future_key": "anything a trainer adds",
}
KEPT = {
    "ss_v2": "False",
    "ss_base_model_version": "sd_v1",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "8.0",
    "ss_network_args": json.dumps({"conv_dim": "4"}),
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.title": "Jane LoRA",
    "format": "pt",
}


@pytest.fixture(scope="module")
def pipe_factory():
    from s2l_plugin.testbed.components import build_tiny_pipeline

    return lambda: build_tiny_pipeline(seed=0)


def _kohya_lora(pipe) -> dict[str, torch.Tensor]:
    from s2l_plugin.formats.lora_convert import convert_diffusers_to_kohya

    g = torch.Generator().manual_seed(7)
    sd = {}
    for module in (UNET_MODULE, UNET_MODULE_2):  # UNet layers: what diffusers' kohya reader maps on this tiny model
        layer = pipe.unet.get_submodule(module)
        sd[f"unet.{module}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=g)
        sd[f"unet.{module}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=g)
    return convert_diffusers_to_kohya(sd, {"unet": 8.0})


@pytest.fixture
def leaky_lora(tmp_path, pipe_factory) -> Path:
    path = tmp_path / "in" / "jane_lora.safetensors"
    path.parent.mkdir()
    save_file(_kohya_lora(pipe_factory()), str(path), metadata={**LEAKY, **KEPT})
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensor_bytes(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor's dtype, shape and raw bytes, read from the file by its header's offsets."""
    header = read_safetensors_header(path)
    raw = path.read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    return {name: (t.dtype, t.shape, raw[start + t.begin : start + t.end]) for name, t in header.tensors.items()}


def _unet_output(pipe) -> torch.Tensor:
    tok = pipe.tokenizer("a photo of ohwx woman", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt")
    latents = torch.randn(1, pipe.unet.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = pipe.text_encoder(tok.input_ids)[0]
        return pipe.unet(latents, 10, encoder_hidden_states=hidden).sample


def test_strip_removes_the_leaking_keys_keeps_the_needed_ones_and_copies_tensors_byte_for_byte(leaky_lora, tmp_path, capsys):
    before = _sha(leaky_lora)
    out = tmp_path / "public" / "jane_lora.safetensors"
    assert main(["scan", str(leaky_lora), "--strip", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "removed" in printed and str(out.name) in printed

    assert _sha(leaky_lora) == before  # the input is never modified
    meta = read_safetensors_header(out).metadata
    assert meta == KEPT  # every minimum key, modelspec.* and format kept, with their values
    assert not set(LEAKY) & set(meta)
    assert _tensor_bytes(out) == _tensor_bytes(leaky_lora)
    assert not [f for f in scan_file(out) if f.severity in ("high", "medium", "low")]
    assert sorted(p.name for p in out.parent.iterdir()) == ["jane_lora.safetensors"]  # no temporary file left


def test_stripped_lora_loads_in_diffusers_exactly_as_the_input(leaky_lora, tmp_path, pipe_factory):
    out = tmp_path / "stripped.safetensors"
    strip_file(leaky_lora, out)
    plain = _unet_output(pipe_factory())
    outputs = []
    for path in (leaky_lora, out):
        pipe = pipe_factory()
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        outputs.append(_unet_output(pipe))
    assert (outputs[0] - plain).abs().max() > 1e-4  # the LoRA changes the model
    assert torch.equal(outputs[0], outputs[1])


def test_strip_all_keeps_only_what_loaders_need(leaky_lora, tmp_path):
    result = strip_file(leaky_lora, tmp_path / "bare.safetensors", strip_all=True, keep=["modelspec.title"])
    meta = read_safetensors_header(result.path).metadata
    assert meta == {"format": "pt", "modelspec.title": "Jane LoRA"}
    assert set(result.removed) == set(LEAKY) | set(KOHYA_MINIMUM_KEYS) | {"modelspec.architecture"}
    assert set(LOADER_KEYS) >= set(meta) - {"modelspec.title"}
    assert _tensor_bytes(result.path) == _tensor_bytes(leaky_lora)


def test_strip_of_an_embedding_keeps_its_token_tensor(tmp_path):
    src = tmp_path / "ohwx.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(src), metadata={"ss_tag_frequency": LEAKY["ss_tag_frequency"],
                                                                      "ss_seed": "1"})
    out = tmp_path / "ohwx-clean.safetensors"
    assert main(["scan", str(src), "--strip", str(out), "--json"]) == 0
    assert read_safetensors_header(out).metadata == {}
    assert _tensor_bytes(out) == _tensor_bytes(src)


def _one_line_refusal(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2l: error:") and "\n" not in err, err
    return err


def test_strip_never_writes_over_its_input_or_an_existing_file(leaky_lora, tmp_path, capsys):
    before = _sha(leaky_lora)
    for argv in (["--strip", str(leaky_lora)], ["--strip", str(leaky_lora), "--overwrite"],
                 ["--strip", str(leaky_lora.parent / "." / leaky_lora.name), "--overwrite"]):
        assert "input" in _one_line_refusal(["scan", str(leaky_lora), *argv], capsys)
    link = tmp_path / "link.safetensors"
    link.symlink_to(leaky_lora)
    assert "input" in _one_line_refusal(["scan", str(leaky_lora), "--strip", str(link), "--overwrite"], capsys)
    assert _sha(leaky_lora) == before

    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    assert "--overwrite" in _one_line_refusal(["scan", str(leaky_lora), "--strip", str(existing)], capsys)
    assert existing.read_bytes() == b"keep me"
    assert main(["scan", str(leaky_lora), "--strip", str(existing), "--overwrite"]) == 0
    assert _tensor_bytes(existing) == _tensor_bytes(leaky_lora)
    assert sorted(p.name for p in leaky_lora.parent.iterdir()) == [leaky_lora.name]


def test_strip_refuses_pickles_folders_and_malformed_files_before_writing(tmp_path, capsys):
    pt = tmp_path / "emb.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "jane"}, str(pt))
    out = tmp_path / "out.safetensors"
    assert "pickle" in _one_line_refusal(["scan", str(pt), "--strip", str(out)], capsys)
    assert "folder" in _one_line_refusal(["scan", str(tmp_path), "--strip", str(out)], capsys)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 2) + b"{}" + b"x")
    _one_line_refusal(["scan", str(bad), "--strip", str(out)], capsys)
    assert "--strip" in _one_line_refusal(["scan", str(bad), "--strip-all"], capsys)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
