"""Installed layout: hooks/ and adapters/ only as s2l_plugin.hooks / s2l_plugin.adapters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_generic_top_level_modules(tmp_path):
    # Run from an unrelated folder so the repository root is not on sys.path.
    code = (
        "import importlib.util as u, s2l_plugin.hooks, s2l_plugin.adapters;"
        "print(u.find_spec('hooks') is None, u.find_spec('adapters') is None)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


def test_package_data_is_reachable_from_the_installed_package():
    from importlib.resources import files

    root = files("s2l_plugin")
    for rel in ("configs/demo.toml", "schema/result.schema.json", "testbed/data/demo/manifest.json",
                "testbed/data/demo/pipeline/model_index.json"):
        assert root.joinpath(rel).is_file(), rel
    assert any(p.name.endswith((".html", ".j2")) for p in root.joinpath("report/templates").iterdir())


def test_setup_discovers_every_package_directory():
    import runpy

    found = set()
    for package, folder in {"s2l_plugin": "s2l_plugin", "s2l_plugin.hooks": "hooks", "s2l_plugin.adapters": "adapters"}.items():
        for init in (REPO / folder).rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(REPO / folder).parts]))
    import setuptools

    captured = {}
    original = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(str(REPO / "setup.py"))
    finally:
        setuptools.setup = original
    assert found <= set(captured["packages"])
