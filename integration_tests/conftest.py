"""Integration tests share the unit tests' fixtures (tests/conftest.py): one definition, two folders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
