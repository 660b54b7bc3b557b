"""Atomic writes (s2l_plugin._io): readers never see half a file, and files get ordinary permissions."""
from __future__ import annotations

import os
import stat

import pytest

from s2l_plugin._io import atomic_path, atomic_write_bytes, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _expected_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_write_replaces_file_with_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "néw")
    assert path.read_text(encoding="utf-8") == "néw"
    assert _mode(path) == _expected_mode()
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_tmp_dir_keeps_temporaries_out_of_the_target_folder(tmp_path):
    target_dir, tmp_dir = tmp_path / "images", tmp_path / ".partial"
    seen: list[str] = []
    with atomic_path(target_dir / "0.png", tmp_dir) as tmp:
        seen = sorted(p.name for p in target_dir.iterdir())
        assert tmp.parent == tmp_dir
        tmp.write_bytes(b"png")
    assert seen == []
    assert (target_dir / "0.png").read_bytes() == b"png"


def test_written_embedding_is_not_private_to_the_writer(tmp_path):
    """Bug fixed: write_embedding left mkstemp's 0600 mode on the file it published."""
    torch = pytest.importorskip("torch")
    from s2l_plugin.formats.embeddings import Embedding, write_embedding

    path = write_embedding(Embedding(token="<d>", vectors=torch.zeros(1, 4)), tmp_path / "learned_embeds.safetensors")
    assert _mode(path) == _expected_mode()
