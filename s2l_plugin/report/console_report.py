"""The ``console`` report writer and :func:`print_summary`, which every auditing command calls at its end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from s2l_plugin.report.result import RunResult, load_result_data, to_dict
from s2l_plugin.report.view import Table, build_view

# The tables a terminal shows; the HTML and Markdown reports have the rest.
CONSOLE_TABLES = ("amplification", "membership", "extraction", "memorization", "findings")


def _needed_width(t: Table) -> int:
    """Columns as wide as their longest cell and header (numeric columns never wrap, header included;
    other headers may wrap at spaces), plus rich's borders and padding."""
    widths = []
    for i, col in enumerate(t.columns):
        numeric = any(r[i].kind == "num" for r in t.rows)
        header = len(col) if numeric else max(len(w) for w in col.split())
        widths.append(max([header] + [len(r[i].text) for r in t.rows]))
    return sum(widths) + 3 * len(widths) + 1


def _rich_table(t: Table, width: int) -> Any:
    """A rich table of ``t``; when the terminal is too narrow for it, one small field/value table
    per row (so no number is ever broken across lines)."""
    from rich.console import Group
    from rich.table import Table as RichTable
    from rich.text import Text

    highlight = t.id == "amplification"
    if _needed_width(t) <= width:
        rt = RichTable(title=t.title, title_justify="left")
        for i, col in enumerate(t.columns):
            numeric = any(r[i].kind == "num" for r in t.rows)
            longest = max(len(r[i].text) for r in t.rows)
            rt.add_column(col, justify="right" if numeric else "left", no_wrap=numeric or None, overflow="fold", min_width=longest)
        for row in t.rows:
            rt.add_row(*(Text(c.text) for c in row), style="red" if highlight and row[-1].text == "amplified" else None)
        return rt
    blocks = []
    for row in t.rows:
        keys = [c.text for c in row if c.kind == "key"]
        rt = RichTable(show_header=False)
        rt.add_column("field", overflow="fold")
        rt.add_column("value", justify="right", overflow="fold")
        for col, cell in zip(t.columns, row, strict=True):
            rt.add_row(Text(col), Text(cell.text))
        # The title on its own line: a table title would wrap at the (narrow) box's width.
        blocks += [Text(f"{t.title}: {' / '.join(keys[:3])}", style="italic"), rt]
    return Group(*blocks)


def render_console(data: dict[str, Any], console: Any = None, *, report_path: str | Path | None = None) -> None:
    """Print the verdict and the summary tables of a saved result's dict with rich."""
    from rich.console import Console
    from rich.text import Text

    # Redirected output (logs, CI) does not wrap; do not squeeze tables into rich's default 80 columns there.
    console = console or (Console() if Console().is_terminal else Console(width=200))
    view = build_view(data)
    style = {"amplified": "bold red", "signal": "bold red", "not-established": "bold green", "no-signal": "bold green"}
    console.print(Text(view.verdict.headline, style=style.get(view.verdict.level, "bold")))
    for line in view.verdict.lines:
        console.print(Text(f"  • {line}"))
    for table_id in CONSOLE_TABLES:
        t = view.table(table_id)
        if t is not None:
            console.print(_rich_table(t, console.width))
    if report_path is not None:
        console.print(f"report: {report_path}")


def print_summary(result: RunResult | dict[str, Any] | str | Path, *, console: Any = None, report_path: str | Path | None = None) -> None:
    """Print a result's verdict and summary tables to the terminal (rich).

    ``result``: a RunResult, its dict, or the path of a saved ``result.json`` (or its folder).
    ``report_path``: printed last, e.g. the HTML report just written. Numbers are rounded
    as in every report (:mod:`s2l_plugin.report.numbers`).
    """
    if isinstance(result, RunResult):
        data = to_dict(result)
    elif isinstance(result, dict):
        data = result
    else:
        data = load_result_data(result)
    render_console(data, console, report_path=report_path)


class ConsoleWriter:
    """Prints the summary to stdout; writes no file."""

    name = "console"

    def write(self, result_json_path: str | Path, out_dir: str | Path, *, report_path: str | Path | None = None) -> list[Path]:
        """Print the summary (ending with ``report_path``, when given); returns no file."""
        print_summary(result_json_path, report_path=report_path)
        return []
