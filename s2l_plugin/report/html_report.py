"""The ``html`` report writer: one self-contained ``report.html`` (plots and grids as data: URIs)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from s2l_plugin._io import atomic_write_text
from s2l_plugin.report.view import build_view, figure_specs, grid_specs
from s2l_plugin.result import load_result_data

HTML_FILE = "report.html"
TEMPLATES = Path(__file__).parent / "templates"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def render_html(data: dict[str, Any], result_dir: Path) -> str:
    """The HTML of a saved result's dict; grid PNGs are read from paths relative to ``result_dir``."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    figures = []
    for spec in figure_specs(data):
        figures.append({"id": spec.id, "kind": spec.kind, "title": spec.title, "attack": spec.attack, "axes": spec.axes, "b64": _b64(spec.png())})
    grids = []
    for label, rel in grid_specs(data):
        path = result_dir / rel
        grids.append({"label": label, "path": rel, "b64": _b64(path.read_bytes()) if path.is_file() else ""})
    return env.get_template("report.html.j2").render(
        view=build_view(data),
        rocs=[f for f in figures if f["kind"] == "roc"],
        hists=[f for f in figures if f["kind"] == "hist"],
        grids=grids,
    )


class HtmlWriter:
    """Writes ``report.html``: verdict, amplification table, ROC curves (linear and log-log),
    MIA metrics, score histograms, extraction grids and matches, memorization, metadata, config."""

    name = "html"

    def write(self, result_json_path: str | Path, out_dir: str | Path) -> list[Path]:
        result_json_path = Path(result_json_path)
        data = load_result_data(result_json_path)
        result_dir = result_json_path if result_json_path.is_dir() else result_json_path.parent
        path = Path(out_dir) / HTML_FILE
        atomic_write_text(path, render_html(data, result_dir))
        return [path]
