"""Textual Inversion embedding files: diffusers ⇄ AUTOMATIC1111 .pt ⇄ kohya emb_params, loaded by diffusers."""

from __future__ import annotations

import pytest
import torch

from s2l_plugin.errors import FormatError
from s2l_plugin.formats.embeddings import (
    A1111,
    A1111_KEYS,
    DIFFUSERS,
    KOHYA,
    Embedding,
    detect_embedding_format,
    read_embedding,
    write_embedding,
)

WIDTH = 32  # the testbed text encoder's token-embedding width


def _vectors(n: int, seed: int = 0, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def _rows_of(pipe, token: str, n: int) -> torch.Tensor:
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    return pipe.text_encoder.get_input_embeddings().weight.detach()[ids]


@pytest.mark.parametrize("n", [1, 3])
def test_a1111_export_loads_through_diffusers_with_the_same_vectors(tiny_pipeline, tmp_path, n):
    vectors = _vectors(n)
    path = write_embedding(Embedding("<s2l-seven>", vectors, step=7), tmp_path / "s2l-seven.pt", A1111)

    tiny_pipeline.load_textual_inversion(str(path), token="<digit7>")

    torch.testing.assert_close(_rows_of(tiny_pipeline, "<digit7>", n), vectors, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2])
def test_kohya_emb_params_export_loads_through_diffusers_with_the_same_vectors(tiny_pipeline, tmp_path, n):
    vectors = _vectors(n, seed=1)
    path = write_embedding(Embedding("<s2l>", vectors), tmp_path / "s2l.safetensors", KOHYA)

    tiny_pipeline.load_textual_inversion(str(path), token="<k>")

    torch.testing.assert_close(_rows_of(tiny_pipeline, "<k>", n), vectors, rtol=0, atol=0)


def test_diffusers_folder_loads_with_load_textual_inversion_of_the_folder(tiny_pipeline, tmp_path):
    vectors = _vectors(2, seed=2)
    write_embedding(Embedding("<s2l>", vectors), tmp_path / "learned_embeds.safetensors")

    tiny_pipeline.load_textual_inversion(str(tmp_path))

    torch.testing.assert_close(_rows_of(tiny_pipeline, "<s2l>", 2), vectors, rtol=0, atol=0)


def test_the_a1111_file_has_exactly_the_a1111_keys(tmp_path):
    path = write_embedding(Embedding("<s2l>", _vectors(2), step=42), tmp_path / "s2l.pt", A1111)

    data = torch.load(path, weights_only=True)

    assert sorted(data) == sorted(A1111_KEYS)
    assert data["string_to_token"] == {"*": 265}
    assert data["name"] == "<s2l>" and data["step"] == 42
    assert list(data["string_to_param"]) == ["*"] and data["string_to_param"]["*"].shape == (2, WIDTH)


@pytest.mark.parametrize("fmt", [DIFFUSERS, A1111, KOHYA])
def test_every_layout_reads_back_to_the_same_embedding(tmp_path, fmt):
    vectors = _vectors(3, seed=3)
    suffix = ".pt" if fmt == A1111 else ".safetensors"
    path = write_embedding(Embedding("<tok>", vectors, step=5), tmp_path / f"tok{suffix}", fmt)

    emb, found = read_embedding(path, allow_pickle=True)

    assert found == fmt
    torch.testing.assert_close(emb.vectors, vectors, rtol=0, atol=0)
    # kohya keeps no token in the file: the file stem names it, as kohya and A1111 do
    assert emb.token == ("tok" if fmt == KOHYA else "<tok>")


def test_an_exported_row_slice_stores_only_its_rows(tmp_path):
    matrix = torch.randn(1000, WIDTH)
    path = write_embedding(Embedding("<s2l>", matrix[10:12]), tmp_path / "s2l.pt", A1111)

    stored = torch.load(path, weights_only=True)["string_to_param"]["*"]

    assert stored.untyped_storage().nbytes() == 2 * WIDTH * 4


def test_a_pickle_is_refused_unless_allowed(tmp_path):
    path = write_embedding(Embedding("<s2l>", _vectors(1)), tmp_path / "s2l.pt", A1111)

    with pytest.raises(FormatError, match="allow-pickle|allow_pickle"):
        read_embedding(path)


def test_a_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH)}, "name": "x", "payload": Exception("boom")}, path)

    with pytest.raises(FormatError, match="weights-only"):
        read_embedding(path, allow_pickle=True)


def test_an_embedding_of_another_width_is_one_clear_error_naming_both_widths(tiny_pipeline, tmp_path):
    from s2l_plugin.adapters.textual_inversion import load_embedding

    path = write_embedding(Embedding("<sd15>", _vectors(2, width=768)), tmp_path / "learned_embeds.safetensors")

    with pytest.raises(FormatError, match=r"embedding width 768 does not match .* width 32"):
        load_embedding(tiny_pipeline, path)
    assert "<sd15>" not in tiny_pipeline.tokenizer.get_vocab()  # nothing half-applied


def test_sdxl_and_unknown_layouts_are_format_errors():
    with pytest.raises(FormatError, match="SDXL"):
        detect_embedding_format({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})
    with pytest.raises(FormatError, match="unrecognised embedding layout"):
        detect_embedding_format({"a": torch.zeros(1), "b": torch.zeros(1)})


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "learned_embeds.safetensors"
    write_embedding(Embedding("<old>", _vectors(1)), target)
    before = target.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_embedding(Embedding("<new>", _vectors(1, seed=9)), target)

    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
