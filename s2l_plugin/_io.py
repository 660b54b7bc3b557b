"""Atomic file writes: a reader sees the old file or the complete new one, never half a file.

One mechanism for every module that writes results, reports, embeddings, synthetic sets and
stage records: write a temporary file on the same filesystem, then ``os.replace`` it onto the
target. The temporary file is removed on any error, and the final file gets the ordinary
permissions (``0o666`` less the umask) rather than ``mkstemp``'s ``0o600``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, tmp_dir: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed onto ``path``, on error removed.

    The temporary file lives in ``tmp_dir`` (which must be on the same filesystem as ``path``;
    created if missing) or, by default, beside ``path`` as a hidden ``.<name>.*.tmp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, tmp_dir: str | Path | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, tmp_dir) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, tmp_dir: str | Path | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"), tmp_dir)
