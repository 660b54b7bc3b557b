"""Installed layout: hooks/ and adapters/ only as s2l_plugin.hooks / s2l_plugin.adapters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

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


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
    # subpackages of s2l_plugin that are remapped elsewhere are not double counted
    assert found - listed == set(), f"packages missing from pyproject: {sorted(found - listed)}"
