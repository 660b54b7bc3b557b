"""The ``console`` report writer and :func:`print_summary`, which every auditing command calls at its end.

By default the terminal gets a one-screen summary (the verdict, one method x attack table of the
primary subset's ΔAUC with its interval and a verdict mark, extraction before → after, where the
full report is); ``full=True`` / :func:`full_listing` prints every console table instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from s2l_plugin.report import numbers as fmt
from s2l_plugin.report.view import (
    AMPLIFIED,
    NO_CHANGE,
    NO_INTERVAL,
    NR_KIND,
    REDUCED,
    Table,
    build_view,
    comparison_verdict,
    moves_toward_chance,
)
from s2l_plugin.result import RunResult, load_result_data, to_dict

# The tables a terminal shows; the HTML and Markdown reports have the rest.
CONSOLE_TABLES = ("amplification", "membership", "query-dataset", "query", "extraction", "memorization", "findings")


def _needed_width(t: Table) -> int:
    """Columns as wide as their longest cell and header (numeric columns never wrap, header included;
    other headers may wrap at spaces), plus rich's borders and padding."""
    widths = []
    for i, col in enumerate(t.columns):
        numeric = any(r[i].kind in ("num", NR_KIND) for r in t.rows)
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
            numeric = any(r[i].kind in ("num", NR_KIND) for r in t.rows)
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


def _footnote(t: Table, console: Any) -> None:
    """The table's footnote (the smallest FPR the non-members resolve) when a shown cell is a placeholder."""
    from rich.text import Text

    if t.footnote and any(c.kind == NR_KIND for r in t.rows for c in r):
        console.print(Text(f"  {t.footnote}", style="italic"), width=min(console.width, 100))


def _alert(view: Any, console: Any) -> None:
    """The distribution-shift warning (:attr:`Verdict.alert`), above the headline, when there is one."""
    from rich.text import Text

    if view.verdict.alert:
        console.print(Text(f"⚠ {view.verdict.alert}", style="bold yellow"))


def _render_full(data: dict[str, Any], console: Any, reports: list[Path]) -> None:
    """The long listing: the verdict with every line, then every console table in full."""
    from rich.text import Text

    view = build_view(data)
    _alert(view, console)
    console.print(Text(view.verdict.headline, style=_STYLE.get(view.verdict.level, "bold")))
    for line in view.verdict.lines:
        console.print(Text(f"  • {line}"))
    for table_id in CONSOLE_TABLES:
        t = view.table(table_id)
        if t is not None:
            console.print(_rich_table(t, console.width))
            _footnote(t, console)
    if reports:
        console.print(f"report: {reports[0]}")


# -- the compact summary ---------------------------------------------------------------------

#: The subset the method x attack table shows: the pre-registered primary endpoint (non-duplicated
#: members vs non-members, docs/results.md) where the run has it, else all members.
PRIMARY_SUBSETS = ("non-duplicated", "all")
#: One mark per comparison verdict (view.comparison_verdict), and one for an inverted attack's rise.
MARKS = {AMPLIFIED: "▲", REDUCED: "▼", NO_CHANGE: "○", NO_INTERVAL: "?"}
TOWARD_CHANCE = "△"
MARK_LEGEND = {
    "▲": "interval above 0 (amplified)",
    "○": "contains 0",
    "▼": "below 0 (reduced)",
    TOWARD_CHANCE: "above 0, but the attack scored members below chance (AUC < 0.5) before and ends no further "
    "from chance: a move toward chance, not amplification",
    "?": "no interval computed",
}
# A ΔAUC interval "[-0.095, +0.017]" is 16 characters; a method name wraps (at "+") to 18.
_ATTACK_WIDTH = 16
_METHOD_WIDTH = 18
# The verdict lines short enough for the summary that the table does not already say.
_KEPT_VERDICT_LINES = ("Each before/after interval", "Checkpoint metadata:", "Shift check")
_STYLE = {"amplified": "bold red", "signal": "bold red", "not-established": "bold green", "no-signal": "bold green"}

_FULL: ContextVar[bool] = ContextVar("s2l_console_full", default=False)


@contextmanager
def full_listing(enabled: bool = True) -> Iterator[None]:
    """Within this block, every console summary that is not told otherwise prints the long listing
    (how ``s2l run --full`` reaches the console writer the run's report hook calls)."""
    token = _FULL.set(enabled)
    try:
        yield
    finally:
        _FULL.reset(token)


def primary_subset(comparisons: list[dict[str, Any]]) -> str:
    """The member subset the summary table shows: the first of :data:`PRIMARY_SUBSETS` the comparisons
    have, else the first subset they name."""
    subsets = [c.get("subset", "all") for c in comparisons]
    return next((s for s in PRIMARY_SUBSETS if s in subsets), subsets[0] if subsets else "all")


def comparison_mark(comparison: dict[str, Any]) -> str:
    """The one-character mark of a comparison's verdict (:data:`MARKS`), :data:`TOWARD_CHANCE` for the
    rise of an inverted attack (:func:`s2l_plugin.report.view.moves_toward_chance`)."""
    return TOWARD_CHANCE if moves_toward_chance(comparison) else MARKS[comparison_verdict(comparison)]


def _wrap_name(name: str, width: int) -> str:
    """A method name broken after "+" into lines of at most ``width`` characters where it can be."""
    if len(name) <= width or "+" not in name:
        return name
    lines = [""]
    for part in name.replace("+", "+\x00").split("\x00"):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _method_rows(data: dict[str, Any], comps: list[tuple[int, dict[str, Any]]]) -> list[tuple[str, dict[str, int]]]:
    """(row label, {attack: comparison index}) per method, in order; a method compared more than once
    per attack (several domains) gets a row per domain."""
    rows: list[tuple[str, dict[str, int]]] = []
    for i, c in comps:
        row = next((r for m, r in rows if m == c["method"] and c["attack"] not in r), None)
        if row is None:
            rows.append((c["method"], row := {}))
        row[c["attack"]] = i
    counts = {m: sum(1 for n, _ in rows if n == m) for m, _ in rows}
    if max(counts.values(), default=1) == 1:
        return rows
    domains = (data.get("config") or {}).get("domains") or []
    seen: dict[str, int] = {}
    labelled = []
    for m, r in rows:
        k = seen[m] = seen.get(m, 0) + 1
        label = f"{m}/{domains[k - 1]}" if counts[m] == len(domains) else f"{m} ({k})"
        labelled.append((label, r))
    return labelled


def _wrap_items(items: list[str], width: int, sep: str = " · ") -> list[str]:
    """``items`` joined by ``sep`` into lines of at most ``width`` characters, never splitting an item."""
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + len(sep) + len(item) > width:
            lines.append("")
        lines[-1] += (sep if lines[-1] else "") + item
    return lines


def _bullet(line: str) -> Any:
    """``  • line``, wrapped lines indented under its first word."""
    from rich.table import Table as RichTable

    grid = RichTable.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column()
    grid.add_row("  •", line)
    return grid


def _comparison_summary(data: dict[str, Any], console: Any, width: int) -> None:
    """The headline, the method x attack ΔAUC table of the primary subset, the other subsets in one
    line, and extraction before → after per method."""
    from rich.table import Table as RichTable
    from rich.text import Text

    view = build_view(data)
    all_comps = list(enumerate(data["comparisons"]))
    subset = primary_subset(data["comparisons"])
    primary = [(i, c) for i, c in all_comps if c.get("subset", "all") == subset]
    headline = view.verdict.headline
    if view.verdict.level == AMPLIFIED and len(headline) > 2 * width:  # the view lists every amplified comparison by name; count them instead
        n = sum(1 for _, c in all_comps if comparison_mark(c) == "▲")
        headline = f"S2L amplified membership leakage: the ΔAUC 95% interval lies above zero for {n} of {len(all_comps)} comparisons (▲)."
    _alert(view, console)
    console.print(Text(headline, style=_STYLE.get(view.verdict.level, "bold")))
    for line in view.verdict.lines:
        if line.startswith(_KEPT_VERDICT_LINES):
            console.print(_bullet(line))

    attacks = list(dict.fromkeys(c["attack"] for _, c in primary))
    rows = _method_rows(data, primary)
    labels = [_wrap_name(label, _METHOD_WIDTH) for label, _ in rows]
    method_width = max([len("Method")] + [len(x) for label in labels for x in label.split("\n")])
    headers = {a: a if len(a) <= _ATTACK_WIDTH else f"A{k + 1}" for k, a in enumerate(attacks)}
    per_table = max(1, (width - method_width - 4) // (_ATTACK_WIDTH + 3))
    members = "all members" if subset == "all" else f"{subset} members"
    console.print(Text(f"ΔAUC after − before [95% CI], {members} vs non-members", style="italic"))
    used = set()
    for start in range(0, len(attacks), per_table):
        chunk = attacks[start : start + per_table]
        rt = RichTable(title_justify="left")
        rt.add_column("Method", no_wrap=True, min_width=method_width)
        for a in chunk:
            rt.add_column(headers[a], justify="right", no_wrap=True, min_width=_ATTACK_WIDTH)
        for label, (_, row) in zip(labels, rows, strict=True):
            cells = [Text(label)]
            for a in chunk:
                if a not in row:
                    cells.append(Text(fmt.MISSING))
                    continue
                c = data["comparisons"][row[a]]
                mark = comparison_mark(c)
                used.add(mark)
                style = "bold red" if mark == "▲" else "yellow" if mark == TOWARD_CHANCE else None
                cells.append(Text(f"{fmt.signed(c['delta_auc'])} {mark}\n{fmt.interval(c.get('delta_auc_ci'), sign=True)}", style=style))
            rt.add_row(*cells)
        console.print(rt)
    legend = [f"{m} {MARK_LEGEND[m]}" for m in ("▲", "○", "▼")] + [f"{m} {MARK_LEGEND[m]}" for m in (TOWARD_CHANCE, "?") if m in used]
    legend += [f"{h} = {a}" for a, h in headers.items() if h != a]
    for line in _wrap_items(legend, width, "  "):
        console.print(Text(line))

    others = [(i, c) for i, c in all_comps if c.get("subset", "all") != subset]
    if others:
        names = list(dict.fromkeys(c.get("subset", "all") for _, c in others))
        up = [f"{c['method']} / {c['attack']} ({c.get('subset', 'all')})" for _, c in others if comparison_mark(c) == "▲"]
        toward = [f"{c['method']} / {c['attack']} ({c.get('subset', 'all')})" for _, c in others if comparison_mark(c) == TOWARD_CHANCE]

        def listed(items: list[str]) -> str:
            return ": " + ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

        text = f"Other subsets ({', '.join(names)}): {len(up)} of {len(others)} intervals above zero (▲)"
        text += listed(up) if up else ""
        if toward:
            text += f"; {len(toward)} more above zero as an inverted attack moving toward chance ({TOWARD_CHANCE})" + listed(toward)
        text += "."
        console.print(Text(text))

    extraction = []
    n_gens = set()
    for label, row in rows:
        c = data["comparisons"][min(row.values())]
        if c.get("extracted_before") is None and c.get("extracted_after") is None:
            continue
        extraction.append(f"{label} {fmt.count(c.get('extracted_before'))} → {fmt.count(c.get('extracted_after'))}")
        n_gens.add(c.get("n_generations"))
    if extraction:
        of = f", of {fmt.count(n_gens.pop())} generations" if len(n_gens) == 1 and None not in n_gens else ""
        console.print(Text(f"Extracted training images (unique, before → after{of}):"))
        for line in _wrap_items(extraction, width - 2):
            console.print(Text("  " + line))


def _audit_summary(data: dict[str, Any], console: Any, width: int) -> None:
    """Without before/after comparisons: the verdict, then AUC per model and attack (all members),
    extraction per model and the metadata findings, in narrow tables."""
    from rich.text import Text

    view = build_view(data)
    _alert(view, console)
    console.print(Text(view.verdict.headline, style=_STYLE.get(view.verdict.level, "bold")))
    for line in view.verdict.lines:
        if len(line) + 4 <= 2 * width:
            console.print(_bullet(line))
    picks = {"membership": ("Model", "Attack", "AUC", "AUC 95% CI", "TPR@1%FPR"),
             "query-dataset": ("Query images", "Null images", "AUC (U / n·m)", "p-value"),
             "query": None,
             "extraction": ("Model", "Generations", "δ", "Extracted (unique)", "Extraction rate"),
             "findings": ("Model", "Severity", "Key", "Message")}
    for table_id, columns in picks.items():
        t = view.table(table_id)
        if t is None:
            continue
        columns = columns or tuple(t.columns)
        keep = [t.columns.index(c) for c in columns]
        rows = [[r[k] for k in keep] for r in t.rows if table_id != "membership" or r[t.columns.index("Subset")].text == "all"]
        shown = Table(t.id, t.title, list(columns), rows, footnote=t.footnote)
        console.print(_rich_table(shown, width))
        _footnote(shown, console)


def _footer(console: Any, reports: list[Path], run_dir: Path | None) -> None:
    from rich.text import Text

    if reports:
        console.print(Text("Full report: " + " · ".join(str(p) for p in reports)), overflow="fold")
    target = str(run_dir) if run_dir is not None else "RUN_DIR"
    console.print(Text(f"Every table in the terminal: s2l report {target} --format console --full"), overflow="fold")


def _gate_line(console: Any, folder: str | Path | None) -> None:
    """The privacy gate's verdict (``verdict.json`` beside the result), first: the failed conditions, or that it held."""
    from rich.text import Text

    from s2l_plugin.gate import headline, load_verdict

    verdict = load_verdict(folder) if folder is not None else None
    if verdict is not None:
        console.print(Text(headline(verdict), style="bold red" if verdict["verdict"] == "fail" else "bold green"), overflow="fold")


def render_console(
    data: dict[str, Any],
    console: Any = None,
    *,
    report_path: str | Path | Sequence[str | Path] | None = None,
    full: bool | None = None,
    run_dir: str | Path | None = None,
) -> None:
    """Print a saved result's dict with rich: by default a one-screen summary (≤ 40 lines at 100
    columns for the 8-method demo, no line wider than the console); ``full=True`` (or inside
    :func:`full_listing`) the long listing of every console table.

    ``report_path``: the report file(s) to name last; ``run_dir``: the folder a ``s2l report`` hint names.
    """
    from rich.console import Console

    # Redirected output (logs, CI) does not wrap; do not squeeze tables into rich's default 80 columns there.
    console = console or (Console() if Console().is_terminal else Console(width=200))
    if report_path is None:
        reports = []
    elif isinstance(report_path, (str, Path)):
        reports = [Path(report_path)]
    else:
        reports = [Path(p) for p in report_path]
    if full is None:
        full = _FULL.get()
    _gate_line(console, run_dir if run_dir is not None else (reports[0].parent if reports else None))
    if full:
        _render_full(data, console, reports)
        return
    # Sentences wrap at 100 columns at most, even on a wide (or redirected) console.
    width = min(console.width, 100)
    if data.get("comparisons"):
        _comparison_summary(data, console, width)
    else:
        _audit_summary(data, console, width)
    if run_dir is None and reports:
        run_dir = reports[0].parent
    _footer(console, reports, Path(run_dir) if run_dir is not None else None)


def print_summary(
    result: RunResult | dict[str, Any] | str | Path,
    *,
    console: Any = None,
    report_path: str | Path | Sequence[str | Path] | None = None,
    full: bool | None = None,
) -> None:
    """Print a result's summary to the terminal (rich): the one-screen summary, or with ``full=True``
    the verdict and every console table (None: whatever :func:`full_listing` says, else the summary).

    ``result``: a RunResult, its dict, or the path of a saved ``result.json`` (or its folder).
    ``report_path``: the report file(s) just written, named last. Numbers are rounded as in every
    report (:mod:`s2l_plugin.report.numbers`).
    """
    run_dir = None
    if isinstance(result, RunResult):
        data = to_dict(result)
    elif isinstance(result, dict):
        data = result
    else:
        data = load_result_data(result)
        run_dir = Path(result) if Path(result).is_dir() else Path(result).parent
    reports = _reports(report_path, run_dir)
    render_console(data, console, report_path=reports or None, full=full, run_dir=run_dir)


def _reports(report_path: str | Path | Sequence[str | Path] | None, run_dir: Path | None) -> list[Path]:
    """The report files to name: ``report_path``, then report.html / report.md beside it (or beside
    the result, when none is given) that exist and are no older than the result's result.json
    (an older one is a stale report of an earlier result, not named)."""
    from s2l_plugin.report.html_report import HTML_FILE
    from s2l_plugin.report.markdown_report import MARKDOWN_FILE
    from s2l_plugin.result import RESULT_FILE

    if report_path is None:
        given: list[Path] = []
    elif isinstance(report_path, (str, Path)):
        given = [Path(report_path)]
    else:
        given = [Path(p) for p in report_path]
    folder = given[0].parent if given else run_dir
    if folder is None:
        return given
    json_file = (run_dir or folder) / RESULT_FILE
    since = json_file.stat().st_mtime if json_file.exists() else 0.0
    beside = [folder / name for name in (HTML_FILE, MARKDOWN_FILE)]
    return given + [p for p in beside if p not in given and p.is_file() and p.stat().st_mtime >= since]


class ConsoleWriter:
    """Prints the summary to stdout; writes no file."""

    name = "console"

    def write(self, result_json_path: str | Path, out_dir: str | Path, *, report_path: str | Path | None = None) -> list[Path]:
        """Print the summary (ending with ``report_path`` and the other report beside it); returns no file."""
        print_summary(result_json_path, report_path=report_path)
        return []
