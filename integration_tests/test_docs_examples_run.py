"""The documented examples run: every ```bash test``` block of docs/cli.md and ```python test``` block
of docs/python-api.md, exactly as written, with the installed ``s2l``.

cli.md's blocks run in order in one folder (later examples read what earlier ones wrote, as the
page says); each python-api.md block runs alone in an empty folder. A block passes when it exits
0 and every file on its ``# writes:`` line exists. Sizes in the docs are tiny, but the whole file
took about 7 minutes on 2 shared CPU cores (cli.md 218 s: demo, launch, run and audit about 35-40 s
each; python-api.md 186 s), hence an integration test.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The block parser lives with the fast checks (tests/test_docs_examples.py); loaded by path, as
# integration_tests/conftest.py loads the shared fixtures.
_spec = importlib.util.spec_from_file_location("_s2l_docs_checks", Path(__file__).resolve().parents[1] / "tests" / "test_docs_examples.py")
_checks = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _checks  # dataclasses look their module up there
_spec.loader.exec_module(_checks)
DOCS, REPO, DocBlock, doc_blocks = _checks.DOCS, _checks.REPO, _checks.DocBlock, _checks.doc_blocks

pytestmark = pytest.mark.integration

CLI_BLOCKS = doc_blocks(DOCS / "cli.md", "bash")
API_BLOCKS = doc_blocks(DOCS / "python-api.md", "python")
BLOCK_TIMEOUT_S = 900


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The interpreter running the tests is the one `s2l` and `python` in the examples must be.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env["S2L_SRC"] = str(REPO)  # the launch example's source checkout
    env.setdefault("COLUMNS", "120")
    return env


def _run(block: DocBlock, cwd: Path) -> None:
    if block.lang == "bash":
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        script = cwd / f"example_{block.index}.py"
        script.write_text(block.code)
        argv = [sys.executable, str(script)]
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, (
        f"{block.where} exited {proc.returncode}\n--- code\n{block.code}\n--- stderr (tail)\n{proc.stderr[-3000:]}"
    )
    missing = [w for w in block.writes if not (cwd / w).exists()]
    assert not missing, f"{block.where} did not write {missing}\n--- stdout (tail)\n{proc.stdout[-2000:]}"


@pytest.fixture(scope="module")
def cli_session(tmp_path_factory):
    """One folder for cli.md's examples, and which of them already ran there (they build on each other)."""
    return {"dir": tmp_path_factory.mktemp("cli-docs"), "done": set()}


@pytest.mark.parametrize("block", CLI_BLOCKS, ids=[b.id for b in CLI_BLOCKS])
def test_cli_example_runs_and_writes_what_the_doc_says(block, cli_session):
    for earlier in CLI_BLOCKS[: CLI_BLOCKS.index(block)]:  # so that one example can be run alone (-k)
        if earlier.index not in cli_session["done"]:
            _run(earlier, cli_session["dir"])
            cli_session["done"].add(earlier.index)
    _run(block, cli_session["dir"])
    cli_session["done"].add(block.index)


@pytest.mark.parametrize("block", API_BLOCKS, ids=[b.id for b in API_BLOCKS])
def test_python_api_example_runs_and_writes_what_the_doc_says(block, tmp_path):
    _run(block, tmp_path)
