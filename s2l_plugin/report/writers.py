"""The built-in report writers as a plugin, and :func:`write_reports`, the default ``s2l_write_report``.

Writers: ``html`` (report.html), ``markdown`` (report.md + plots/), ``console`` (prints the
summary), ``json`` (result.json normalised to the current schema, with its per-sample CSVs).
Each has ``name`` and ``write(result_json_path, out_dir) -> list[Path]`` and renders from the
saved JSON only. This module imports nothing heavy; the writers import rich, jinja2 and
matplotlib when they run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from s2l_plugin.hooks import hookimpl
from s2l_plugin.report.console_report import ConsoleWriter, print_summary
from s2l_plugin.report.html_report import HTML_FILE, HtmlWriter
from s2l_plugin.report.markdown_report import MARKDOWN_FILE, MarkdownWriter
from s2l_plugin.result import RESULT_FILE, RunResult, load_result, save_result

DEFAULT_FORMATS: tuple[str, ...] = ("html", "markdown", "console")

__all__ = [
    "DEFAULT_FORMATS", "ConsoleWriter", "HtmlWriter", "JsonWriter", "MarkdownWriter", "ReportWriter", "print_summary",
    "report_formats", "report_writer_problem", "write_reports",
]


class ReportWriter(Protocol):
    """The report-writer contract: what ``register_report_writers`` accepts and :func:`write_reports` calls.

    docs/hooks.md (``register_report_writers``) states it for plugin authors;
    :func:`report_writer_problem` checks it at registration.

    - ``name``: a non-empty string, unique among writers (``report = [NAME, ...]``, ``s2l report --format``).
    - ``write(result_json_path, out_dir)``: render the saved ``result.json`` at ``result_json_path``
      (a ``Path``; read it with :func:`s2l_plugin.result.load_result`, which upgrades older
      schemas) into the folder ``out_dir`` (a ``Path``; it may not exist yet). It renders from the
      saved JSON only and never recomputes a number. It returns the paths of the files it wrote (or None).
    """

    name: str

    def write(self, result_json_path: Path, out_dir: Path) -> Sequence[str | Path] | None: ...


def report_writer_problem(obj: Any) -> str | None:
    """What keeps ``obj`` from being a :class:`ReportWriter` (one short phrase), or None when it is one."""
    from s2l_plugin.hooks.manager import call_problem

    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        return f"name must be a non-empty string, got {name!r}"
    return call_problem(obj, "write", ("result_json_path", "out_dir"))


class JsonWriter:
    """Writes ``result.json`` (upgraded to the current schema, defaults filled in) and its CSVs into ``out_dir``."""

    name = "json"

    def write(self, result_json_path: str | Path, out_dir: str | Path) -> list[Path]:
        from s2l_plugin.result import sample_tables

        result = load_result(result_json_path)
        path = save_result(result, out_dir)
        return [path, *(Path(out_dir) / rel for rel in sample_tables(result))]


def report_formats(result: RunResult | dict[str, Any]) -> list[str]:
    """The writers a result's run asked for, from its config: ``report = ["html", ...]`` (a list or one
    name, as ``s2l run`` configs write it) or ``report = {formats = [...]}``; else :data:`DEFAULT_FORMATS`."""
    config = result.config if isinstance(result, RunResult) else (result.get("config") or {})
    formats = config.get("report") if isinstance(config, dict) else None
    if isinstance(formats, dict):
        formats = formats.get("formats")
    if formats is None or isinstance(formats, bool):
        return list(DEFAULT_FORMATS)
    return [formats] if isinstance(formats, str) else list(formats)


def write_reports(
    result: RunResult | str | Path,
    out_dir: str | Path,
    formats: Sequence[str] | None = None,
    pm: Any = None,
) -> list[Path]:
    """Save (if given a RunResult) and render a result with the selected registered writers.

    ``result``: a RunResult (saved first as ``out_dir/result.json``) or the path of a saved
    ``result.json`` / its folder. ``formats``: writer names (default: :func:`report_formats`
    of the result). Unknown names fail with a ConfigError listing the registered writers,
    before any file is written. Returns the files the writers wrote (not the result.json saved here).
    """
    from s2l_plugin.hooks.manager import get

    out_dir = Path(out_dir)
    if isinstance(result, RunResult):
        names = list(formats) if formats is not None else report_formats(result)
        writers = [get("report_writers", n, pm) for n in names]
        json_path = save_result(result, out_dir)
    else:
        json_path = Path(result)
        if json_path.is_dir():
            json_path = json_path / RESULT_FILE
        names = list(formats) if formats is not None else report_formats(load_result(json_path))
        writers = [get("report_writers", n, pm) for n in names]
    written: list[Path] = []
    # The console summary goes last, so it can end with the path of the report just written.
    for writer in sorted(writers, key=lambda w: isinstance(w, ConsoleWriter)):
        if isinstance(writer, ConsoleWriter):
            report = next((p for p in written if p.name in (HTML_FILE, MARKDOWN_FILE)), None)
            writer.write(json_path, out_dir, report_path=report)
        else:
            written += [Path(p) for p in writer.write(json_path, out_dir) or []]
    return written


# -- the plugin ----------------------------------------------------------------------------


@hookimpl
def register_report_writers(register: Any) -> None:
    for writer in (HtmlWriter(), MarkdownWriter(), ConsoleWriter(), JsonWriter()):
        register(writer)


@hookimpl
def s2l_write_report(result: Any, out_dir: Any) -> None:
    """Default report: the writers of the result's ``config["report"]["formats"]`` (html, markdown, console)."""
    write_reports(result, out_dir)
