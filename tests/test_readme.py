"""The README's Quick start and .ci/run stay in sync."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_has_exactly_two_commands():
    commands = _quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert commands[0].endswith("s2l demo")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert _quick_start_commands()[1] in ci


def test_ci_runs_the_demo_after_the_tests():
    """The README's first command runs the demo: CI runs it too, after the tests, in the same environment."""
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    tests = ci.index(_quick_start_commands()[1])
    demo = [i for i, line in enumerate(ci) if line.split("#")[0].strip().split(" --")[0].endswith(".venv/bin/s2l demo")]
    assert demo and demo[0] > tests
    assert "set -euo pipefail" in ci


def test_constraints_pin_cpu_torch_only():
    lines = [line.strip() for line in (REPO / "constraints-cpu.txt").read_text().splitlines() if line.strip()]
    assert lines == ["torch==2.13.0"]
