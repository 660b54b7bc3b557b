"""The user docs stay true to the code: fast checks of their examples (running them is
integration_tests/test_docs_examples_run.py, which reuses :func:`doc_blocks` from here).

Conventions checked: a fenced block tagged ```bash test``` (docs/cli.md) or ```python test```
(docs/python-api.md) is an example the integration test runs as written; its ``# writes: A B``
line lists files it must leave behind. docs/hooks.md's ```python test``` block is a plugin
module: tests/test_attack_plugin.py registers it as written and audits with its attack.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
_FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class DocBlock:
    """One tested example: its language, code, where it is, and the files it says it writes."""

    lang: str
    code: str
    doc: str
    line: int
    index: int
    writes: tuple[str, ...] = field(default=())
    section: str = ""  # the heading the block sits under, as a slug

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def id(self) -> str:
        return f"{self.index:02d}-{self.section}"


def _headings(markdown: str) -> list[str]:
    """The Markdown headings of ``markdown``, outside fenced code (where ``# ...`` is a comment)."""
    return re.findall(r"^#+ (.+)$", _FENCE.sub("", markdown), re.M)


def doc_blocks(path: Path, lang: str) -> list[DocBlock]:
    """The ``<lang> test`` blocks of ``path``, in document order."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for m in _FENCE.finditer(text):
        if m.group(1) != lang or "test" not in m.group(2).split():
            continue
        code = m.group(3)
        writes = tuple(w for ln in code.splitlines() if ln.startswith("# writes:") for w in ln.split(":", 1)[1].split())
        line = text.count("\n", 0, m.start()) + 1
        headings = _headings(text[: m.start()])
        section = re.sub(r"[^\w]+", "-", headings[-1]).strip("-") if headings else "top"
        blocks.append(DocBlock(lang, code, path.relative_to(REPO).as_posix(), line, len(blocks), writes, section))
    return blocks


def _commands() -> list[str]:
    from s2l_plugin.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def _s2l_invocations(code: str) -> list[list[str]]:
    """The ``s2l ...`` command lines of a bash block (continuations joined, heredoc bodies and
    redirections dropped) as argv lists without the leading ``s2l``."""
    lines, joined, heredoc = [], "", None
    for raw in code.splitlines():
        if heredoc is not None:
            heredoc = None if raw.strip() == heredoc else heredoc
            continue
        joined += raw.rstrip("\\").rstrip() + " " if raw.endswith("\\") else raw
        if raw.endswith("\\"):
            continue
        line, joined = joined.split(" #", 1)[0].strip(), ""
        m = re.search(r"<<'?(\w+)'?", line)
        if m:
            heredoc = m.group(1)
        if line.startswith("s2l "):
            argv = shlex.split(line)[1:]
            for stop in (">", "|", ";", "&&"):
                if stop in argv:
                    argv = argv[: argv.index(stop)]
            lines.append(argv)
    return lines


CLI_BLOCKS = doc_blocks(DOCS / "cli.md", "bash")
API_BLOCKS = doc_blocks(DOCS / "python-api.md", "python")


def test_every_command_has_a_section_and_a_tested_example():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    invoked = {argv[0] for b in CLI_BLOCKS for argv in _s2l_invocations(b.code)}
    for command in _commands():
        assert f"\n## s2l {command}\n" in text, f"docs/cli.md has no '## s2l {command}' section"
        assert command in invoked, f"docs/cli.md has no tested example of `s2l {command}`"


def test_every_tested_block_says_what_it_writes_or_only_prints():
    # A block without a `# writes:` line must be one whose whole point is its output on screen.
    for block in CLI_BLOCKS + API_BLOCKS:
        for rel in block.writes:
            assert not Path(rel).is_absolute() and ".." not in Path(rel).parts, f"{block.where}: {rel!r} escapes the example folder"
    assert sum(bool(b.writes) for b in CLI_BLOCKS) >= len(CLI_BLOCKS) - 1


@pytest.mark.parametrize("block", CLI_BLOCKS, ids=[b.id for b in CLI_BLOCKS])
def test_cli_example_options_exist(block):
    """Every option an example passes is one the command accepts (argparse parses it; nothing runs)."""
    from s2l_plugin.cli import build_parser

    for argv in _s2l_invocations(block.code):
        if argv[0] == "launch":  # raw arguments: S2L options, `--`, then the script's own
            from s2l_plugin.launch import build_parser as launch_parser
            from s2l_plugin.launch import split_argv

            s2l_args, script = split_argv(argv[1:])
            assert script, f"{block.where}: no training script after `--`"
            launch_parser().parse_args(s2l_args)
            continue
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse's way of refusing
            pytest.fail(f"{block.where}: `s2l {' '.join(argv)}` does not parse (exit {exc.code})")


@pytest.mark.parametrize("block", API_BLOCKS, ids=[b.id for b in API_BLOCKS])
def test_python_example_uses_only_the_public_api(block):
    import s2l_plugin

    tree = ast.parse(block.code, filename=block.where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "s2l_plugin":
            for alias in node.names:
                assert alias.name in s2l_plugin.__all__, f"{block.where}: {alias.name} is not in s2l_plugin.__all__"
                getattr(s2l_plugin, alias.name)  # and it resolves
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("s2l_plugin."):
            pytest.fail(f"{block.where}: imports the private module {node.module}; the page documents the package root")


def test_every_public_function_has_an_example():
    used = set()
    for block in API_BLOCKS:
        used |= {n.id for n in ast.walk(ast.parse(block.code)) if isinstance(n, ast.Name)}
    main = ["load_pipeline", "Testbed", "generate_private_set", "GenerationConfig", "audit_membership", "extract",
            "memorization_scores", "relative_memorization_scores", "scan_file", "audit_checkpoint", "load_run_config",
            "run_experiment", "load_result"]
    assert not [name for name in main if name not in used]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve():
    for name in ("cli.md", "audit.md", "python-api.md"):
        text = (DOCS / name).read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([\w\-./]+\.md)(?:#([\w\-]+))?\)", text):
            path = (DOCS / target).resolve()
            assert path.is_file(), f"docs/{name} links to missing {target}"
            if anchor:
                headings = _headings(path.read_text(encoding="utf-8"))
                assert anchor in {_anchor(h) for h in headings}, f"docs/{name} links to missing #{anchor} in {target}"


def test_readme_commands_section_lists_every_command():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "\n## Commands\n" in text
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    for command in _commands():
        assert f"`s2l {command}`" in section and f"docs/cli.md#s2l-{command}" in section, command
