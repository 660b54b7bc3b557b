"""Fuzzing the checkpoint readers: every malformed input ends in one FormatError, never another exception.

Inputs: valid files in each format, then truncated, byte-flipped, or rewritten with headers that
lie about sizes, offsets and dtypes; random bytes behind pickle/zip magic; pickles that hold no
dict. A few thousand examples in total, derandomized so CI sees the same inputs every run.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from s2l_plugin.audit.metadata import scan_file
from s2l_plugin.errors import FormatError
from s2l_plugin.formats.detect import detect, load_safetensors, read_safetensors_header


def fuzz(n: int) -> settings:
    """Hypothesis settings for ``n`` derandomized examples (same inputs every CI run, no example database)."""
    return settings(max_examples=n, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None)

_TMP = Path(tempfile.mkdtemp(prefix="s2l-fuzz-"))

SEEDS = {
    "kohya": {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.ones(2, 8),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.ones(8, 2),
        "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(2.0),
    },
    "diffusers": {
        "unet.down_blocks.1.attentions.0.proj_in.lora.down.weight": torch.ones(2, 8, dtype=torch.float16),
        "unet.down_blocks.1.attentions.0.proj_in.lora.up.weight": torch.ones(8, 2, dtype=torch.float16),
    },
    "ti": {"<tok>": torch.ones(2, 8)},
    "loha": {"lora_unet_x.hada_w1_a": torch.ones(2, 2), "lora_unet_x.hada_w1_b": torch.ones(2, 2)},
}
SEED_BYTES = {name: save(t, metadata={"ss_tag_frequency": json.dumps({"1_a": {"a": 1}})}) for name, t in SEEDS.items()}


def _write(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=_TMP, suffix=".bin")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


def _every_reader(data: bytes, *, allow_pickle: bool = False) -> None:
    """Run detection, the metadata scan and the full tensor read; only FormatError may escape."""
    path = _write(data)
    try:
        for fn in (
            lambda: detect(path, allow_pickle=allow_pickle),
            lambda: scan_file(path, allow_pickle=allow_pickle),
            lambda: load_safetensors(path),
        ):
            try:
                fn()
            except FormatError as exc:
                assert str(exc) and "\n" not in str(exc)
    finally:
        path.unlink()


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@fuzz(800)
@given(seed=st.sampled_from(sorted(SEED_BYTES)), cut=st.integers(min_value=0, max_value=10_000))
def test_truncated_safetensors(seed, cut):
    data = SEED_BYTES[seed]
    _every_reader(data[: cut % len(data)])


@fuzz(800)
@given(seed=st.sampled_from(sorted(SEED_BYTES)), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_byte_flipped_safetensors(seed, flips):
    data = bytearray(SEED_BYTES[seed])
    for pos, value in flips:
        data[pos % len(data)] = value
    _every_reader(bytes(data))


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8))


@fuzz(900)
@given(
    seed=st.sampled_from(sorted(SEED_BYTES)),
    field=st.sampled_from(["dtype", "shape", "data_offsets", "extra", "drop", "metadata", "header_len"]),
    value=st.one_of(
        _json_leaf,
        st.lists(st.integers(-5, 2**40), max_size=4),
        st.sampled_from(["F32", "F16", "I8", "BOOL", "F64", "Q4", "f32", ""]),
        st.dictionaries(st.text(max_size=4), _json_leaf, max_size=3),
    ),
    which=st.integers(0, 10),
    header_len=st.integers(0, 2**64 - 1),
)
def test_headers_that_lie(seed, field, value, which, header_len):
    header, body = _split(SEED_BYTES[seed])
    names = [k for k in header if k != "__metadata__"]
    name = names[which % len(names)]
    if field == "extra":
        header[name]["extra"] = value
    elif field == "drop":
        header[name].pop(["dtype", "shape", "data_offsets"][which % 3])
    elif field == "metadata":
        header["__metadata__"] = value
    elif field == "header_len":
        data = _join(header, body)
        _every_reader(struct.pack("<Q", header_len) + data[8:])
        return
    else:
        header[name][field] = value
    _every_reader(_join(header, body))


@fuzz(400)
@given(magic=st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x80\x05", b""]), tail=st.binary(max_size=300))
def test_random_bytes_behind_pickle_magic(magic, tail):
    _every_reader(magic + tail, allow_pickle=True)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


PICKLE_SEEDS = [
    _torch_bytes({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(2, 8)}, "name": "x", "step": 3}),
    _torch_bytes({8: ({"linear.0.weight": torch.ones(16, 8)}, {"linear.0.weight": torch.ones(16, 8)}), "name": "h"}),
    _torch_bytes({"<tok>": torch.ones(1, 8)}),
]
NON_DICTS = [torch.ones(3), [torch.ones(2)], 7, "string", (1, 2), None, {"string_to_param": [1, 2]}, {"string_to_param": {}}]


@fuzz(400)
@given(seed=st.sampled_from(range(len(PICKLE_SEEDS))), cut=st.integers(0, 10_000), flip=st.tuples(st.integers(0, 10_000), st.integers(0, 255)))
def test_truncated_and_flipped_pickles(seed, cut, flip):
    data = bytearray(PICKLE_SEEDS[seed])
    data[flip[0] % len(data)] = flip[1]
    _every_reader(bytes(data[: max(1, cut % len(data))]), allow_pickle=True)


@pytest.mark.parametrize("obj", NON_DICTS, ids=lambda o: type(o).__name__)
def test_non_dict_pickles_are_format_errors(obj):
    path = _write(_torch_bytes(obj))
    with pytest.raises(FormatError):
        detect(path, allow_pickle=True)


def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Evil()}}, path, _use_new_zipfile_serialization=True)
    with pytest.raises(FormatError, match="allow-pickle"):
        detect(path)
    with pytest.raises(FormatError, match="weights-only unpickler refused"):
        detect(path, allow_pickle=True)
    assert not marker.exists()


def test_seed_files_are_valid_so_the_mutations_start_from_real_files():
    for name, data in SEED_BYTES.items():
        path = _write(data)
        header = read_safetensors_header(path)
        assert set(header.tensors) == set(SEEDS[name])
        found = detect(path)
        assert found.kind == {"kohya": "kohya_lora", "loha": "kohya_lora", "diffusers": "diffusers_lora", "ti": "textual_inversion"}[name]
        if name == "loha":
            assert "LoHa" in found.variant


# -- well-formed containers with the wrong content, loaded onto a real (tiny) base ---------------------

_MODULES = [
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_unet_no_such_module",
]
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.uint8, torch.bool]
_shape = st.lists(st.sampled_from([0, 1, 2, 3, 4, 32, 64, 768]), min_size=0, max_size=4)


@pytest.fixture(scope="module")
def fuzz_base():
    from s2l_plugin.testbed import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@fuzz(100)
@given(
    layout=st.sampled_from(["kohya", "diffusers", "ti"]),
    entries=st.lists(st.tuples(st.sampled_from(_MODULES), st.sampled_from(["lora_down.weight", "lora_up.weight", "alpha"]),
                               st.sampled_from(_DTYPES), _shape), min_size=1, max_size=4),
)
def test_wrong_dtypes_and_shapes_load_or_fail_with_format_error(fuzz_base, layout, entries):
    from s2l_plugin.formats.loaders import BUILTIN_LOADERS

    tensors = {}
    for module, suffix, dtype, shape in entries:
        if layout == "kohya":
            key = f"{module}.{suffix}"
        elif layout == "diffusers":
            key = "unet." + module.removeprefix("lora_unet_").replace("_", ".") + (".lora_A.weight" if "down" in suffix else ".lora_B.weight")
        else:
            key = "<tok>"
        tensors[key] = torch.zeros(shape, dtype=dtype)
    path = _write(save(tensors))
    loaders = {loader.name: loader for loader in BUILTIN_LOADERS}
    try:
        loaders["textual_inversion" if layout == "ti" else "lora"].load(path, fuzz_base)
    except FormatError as exc:
        assert "\n" not in str(exc)
    finally:
        path.unlink()
