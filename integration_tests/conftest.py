"""Integration tests share the unit tests' fixtures (tests/conftest.py): one definition, two folders."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "_s2l_shared_conftest", Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
)
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)

fresh_plugin_manager = _shared.fresh_plugin_manager
tiny_pipeline = _shared.tiny_pipeline
test_testbed = _shared.test_testbed
load_benchmark = _shared.load_benchmark
pytest_configure = _shared.pytest_configure


@pytest.fixture(scope="module")
def audit_sets(tmp_path_factory, test_testbed):
    """Two members and two non-members of the testbed's "seven" (a small audit keeps the launch tests fast):
    ``members/`` and ``nonmembers/`` folders with their metadata.jsonl rows."""
    root = tmp_path_factory.mktemp("audit")
    for split in ("members", "nonmembers"):
        src, dst = test_testbed.path / split / "seven", root / split
        dst.mkdir()
        rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines() if line.strip()][:2]
        for row in rows:
            shutil.copy(src / row["file_name"], dst / row["file_name"])
        (dst / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
