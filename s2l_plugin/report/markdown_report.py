"""The ``markdown`` report writer: ``report.md`` for a model card or a pull request, ROC plots beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from s2l_plugin._io import atomic_write_bytes, atomic_write_text
from s2l_plugin.report.view import NR_KIND, Table, build_view, figure_specs
from s2l_plugin.result import load_result_data

MARKDOWN_FILE = "report.md"
PLOTS_DIR = "plots"


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> list[str]:
    """A GitHub-flavoured Markdown table (numbers right-aligned) preceded by its ``### title``."""
    align = ["---:" if any(r[i].kind in ("num", NR_KIND) for r in table.rows) else "---" for i in range(len(table.columns))]
    lines = [f"### {table.title}", "", "| " + " | ".join(_cell(c) for c in table.columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c.text) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"_{table.note}_"]
    if table.footnote:
        lines += ["", f"_{table.footnote}_"]
    return lines + [""]


def render_markdown(data: dict[str, Any], plot_links: list[tuple[str, str]] | None = None) -> str:
    """The Markdown of a saved result's dict; ``plot_links``: (title, relative PNG path) to embed."""
    view = build_view(data)
    out = [f"## {view.title}", ""]
    if view.verdict.alert:
        out += [f"> **Warning: {view.verdict.alert}**", ""]
    out += [f"**Verdict:** {view.verdict.headline}", ""]
    out += [f"- {line}" for line in view.verdict.lines]
    if view.verdict.lines:
        out.append("")
    for t in view.tables:
        if t.id != "models":
            out += markdown_table(t)
    if plot_links:
        out += ["### ROC curves", ""] + [f"![{title}]({rel})" for title, rel in plot_links] + [""]
    models = view.table("models")
    if models:
        out += markdown_table(models)
    if view.warnings:
        out += ["### Warnings", ""] + [f"- {w}" for w in view.warnings] + [""]
    out += ["<details><summary>Run configuration, seeds and library versions</summary>", ""]
    for title, text in (("Configuration", view.config_json), ("Seeds", view.seeds_json), ("Library versions", view.versions_json)):
        out += [f"{title}:", "", "```json", text, "```", ""]
    out += ["</details>", ""]
    return "\n".join(out)


class MarkdownWriter:
    """Writes ``report.md`` (verdict and every table) and its ROC plots under ``plots/``."""

    name = "markdown"

    def write(self, result_json_path: str | Path, out_dir: str | Path) -> list[Path]:
        data = load_result_data(result_json_path)
        out_dir = Path(out_dir)
        written: list[Path] = []
        links: list[tuple[str, str]] = []
        for spec in figure_specs(data):
            if spec.kind != "roc":
                continue
            rel = f"{PLOTS_DIR}/{spec.id}.png"
            atomic_write_bytes(out_dir / rel, spec.png())
            written.append(out_dir / rel)
            links.append((f"{spec.title} ({'log-log' if spec.axes == 'loglog' else 'linear'})", rel))
        path = out_dir / MARKDOWN_FILE
        atomic_write_text(path, render_markdown(data, links))
        return [path, *written]
