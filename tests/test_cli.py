"""The `s2l` command line: instant help, version, plugin listing, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from s2l_plugin import __version__
from s2l_plugin.cli import main


def _s2l(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "s2l_plugin.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_help_does_not_import_torch():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "s2l_plugin.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in imported if m.split(".")[0] in {"torch", "diffusers", "transformers", "peft", "accelerate", "matplotlib"})
    assert not heavy, f"`s2l --help` imported {heavy[:5]}"
    assert "plugins" in proc.stdout


def test_version(capsys):
    proc = _s2l("--version")
    assert proc.stdout.strip() == f"s2l-plugin {__version__}"


def test_plugins_json_lists_builtins_and_no_third_party_when_disabled():
    proc = _s2l("plugins", "--json", env={"S2L_PLUGINS": ""})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    from s2l_plugin.hooks.manager import DEFAULT_PLUGINS

    assert {r["name"] for r in rows} == set(DEFAULT_PLUGINS)
    assert all(r["builtin"] for r in rows)


def test_usage_error_is_one_line_exit_2(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no-such-command'" in err


def test_public_api_imports_no_torch_and_resolves():
    code = (
        "import sys, s2l_plugin; assert 'torch' not in sys.modules, 'import s2l_plugin pulled in torch';"
        "[getattr(s2l_plugin, n) for n in s2l_plugin.__all__]"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
