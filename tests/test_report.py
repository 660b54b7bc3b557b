"""Reports people read: every number shown equals result.json's, in HTML, Markdown and the console.

The expectations below are written from the JSON directly (not from the report's own view
code): for each table, which JSON field each column shows. Numbers are parsed back out of the
rendered text and compared with the JSON within the one rounding rule
(s2l_plugin.report.numbers.tolerance()).
"""

from __future__ import annotations

import base64
import copy
import csv
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from report_data import build_run_result

from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.report import numbers as fmt
from s2l_plugin.result import (
    SCHEMA_FILE,
    SCHEMA_VERSION,
    RunResult,
    json_schema,
    load_result,
    save_result,
)

NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?$")
INTERVAL = re.compile(r"^\[([-+]?\d+\.\d+), ([-+]?\d+\.\d+)\]$")


# -- the stored result -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(result.json path, its dict): a two-model S2L result with real metrics and grids."""
    path = build_run_result(tmp_path_factory.mktemp("run"))
    return path, json.loads(path.read_text())


@pytest.fixture(scope="module")
def rendered(stored, tmp_path_factory):
    """The html, markdown and long console renderings (``full=True``) of the stored result (console at 250 and 80 columns).
    The default one-screen console summary has its own tests: tests/test_report_console.py."""
    from rich.console import Console

    from s2l_plugin.report.console_report import print_summary
    from s2l_plugin.report.writers import write_reports

    path, _ = stored
    out = tmp_path_factory.mktemp("out")
    written = write_reports(path, out, ["html", "markdown"])
    consoles = {}
    for width in (250, 80):
        buf = io.StringIO()
        print_summary(path, console=Console(file=buf, width=width, color_system=None), full=True)
        consoles[width] = buf.getvalue()
    return {
        "dir": out,
        "written": written,
        "html": (out / "report.html").read_text(),
        "markdown": (out / "report.md").read_text(),
        "console": consoles[250],
        "console80": consoles[80],
    }


# -- what each table must show, straight from the JSON -------------------------------------

# column kinds: "num" (plain metric), "signed" (difference, with sign), "ci", "sci" (signed interval),
# "count", "text" (verbatim string)


def _verdict_word(c):
    lo, hi = c["delta_auc_ci"]
    return "amplified" if lo > 0 else "reduced" if hi < 0 else "no significant change"


def _tpr(value, fpr, n_nonmembers, ci=False):
    """A TPR cell: its number when ``fpr`` >= 1/n, else the n/r placeholder naming the non-members it needs."""
    if fpr + 1e-12 >= 1.0 / n_nonmembers:
        return ("ci" if ci else "num", value)
    return ("nr", round(1.0 / fpr))


def expected_tables(data):
    """{table title: [[(kind, value), ...] per row]} for every table every format shows."""
    t = {}
    n_non = {a["membership"]["n_nonmembers"] for a in data["audits"] if a.get("membership")}
    (n_comp,) = n_non  # every audit of the fixture scores the same non-members
    t["S2L amplification"] = [
        [
            ("text", c["method"]), ("text", c["attack"]), ("text", c["subset"]), ("num", c["auc_before"]),
            ("num", c["auc_after"]), ("signed", c["delta_auc"]), ("sci", c["delta_auc_ci"]),
            _tpr(c["tpr_at_1fpr_before"], 0.01, n_comp), _tpr(c["tpr_at_1fpr_after"], 0.01, n_comp), ("count", c["extracted_before"]),
            ("count", c["extracted_after"]), ("count", c["n_generations"]), ("text", _verdict_word(c)),
        ]
        for c in data["comparisons"]
    ]
    rows = []
    for a in data["audits"]:
        for x in a["membership"]["attacks"]:
            # the attack on all members, then each named member subset against all non-members
            for name, s, n_members in [("all", x, a["membership"]["n_members"])] + [
                (k, v, len(v["member_indices"])) for k, v in x["subsets"].items()
            ]:
                rows.append(
                    [
                        ("text", a["model"]["label"]), ("text", x["attack"]), ("text", name), ("num", s["auc"]),
                        ("ci", s["auc_ci"]), _tpr(s["tpr_at_1fpr"], 0.01, a["membership"]["n_nonmembers"]),
                        _tpr(s["tpr_at_1fpr_ci"], 0.01, a["membership"]["n_nonmembers"], ci=True),
                        _tpr(s["tpr_at_01fpr"], 0.001, a["membership"]["n_nonmembers"]),
                        ("num", s["asr"]), ("num", s["advantage"]), ("count", n_members), ("count", a["membership"]["n_nonmembers"]),
                    ]
                )
    t["Membership inference"] = rows
    t["Extraction"] = [
        [
            ("text", a["model"]["label"]), ("count", e["n_generations"]), ("count", e["n_per_prompt"]), ("num", e["delta"]),
            ("count", e["extracted_total"]), ("num", e["extraction_rate"]), ("count", e["n_references"]),
        ]
        for a in data["audits"]
        if (e := a["extraction"])
    ]
    t["Memorization score"] = [
        [
            ("text", a["model"]["label"]), ("text", s["prompt"]), ("num", s["score"]),
            ("count", a["memorization"]["steps"]), ("count", a["memorization"]["n_generations"]),
        ]
        for a in data["audits"]
        for s in a["memorization"]["scores"]
    ]
    t["Metadata findings"] = [
        [("text", a["model"]["label"]), ("text", f["severity"]), ("text", f["key"]), ("text", f["message"]), ("text", f["value"])]
        for a in data["audits"]
        for f in a["findings"]
    ]
    return t


def expected_long_tables(data):
    """Tables only the HTML and Markdown reports show."""
    t = {}
    t["Extracted per prompt"] = [
        [("text", a["model"]["label"]), ("text", p), ("count", n)]
        for a in data["audits"]
        for p, n in a["extraction"]["extracted_unique"].items()
    ]
    rows = []
    for a in data["audits"]:
        ms = sorted(a["extraction"]["matches"], key=lambda m: (not m["extracted"], m["distance_l2"]))[:24]
        rows += [
            [
                ("text", a["model"]["label"]), ("text", m["prompt"]), ("count", m["generation_index"]), ("count", m["seed"]),
                ("text", m["reference_id"]), ("num", m["distance_l2"]), ("num", m["distance_tiled"]),
                ("count", m["clique_size"]), ("text", "yes" if m["extracted"] else "no"),
            ]
            for m in ms
        ]
    t["Closest extraction matches"] = rows
    t["Models"] = [
        [("text", a["model"]["label"]), ("text", a["model"]["method"] or "—"), ("text", a["model"]["path"]), ("text", a["model"]["sha256"])]
        for a in data["audits"]
    ]
    return t


def _close(shown: str, value: float) -> None:
    assert NUMBER.match(shown), f"{shown!r} is not a number"
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    assert decimals == fmt.DECIMALS, f"{shown!r} is not rounded to {fmt.DECIMALS} decimals"
    assert abs(float(shown) - value) <= fmt.tolerance(), f"shown {shown} but result.json has {value}"


def check_cell(kind: str, value, shown: str) -> None:
    shown = shown.strip()
    if value is None:
        assert shown == fmt.MISSING
    elif kind == "text":
        assert shown == value, f"shown {shown!r}, result.json has {value!r}"
    elif kind == "count":
        assert shown == str(value), f"shown {shown!r}, result.json has {value}"
    elif kind == "nr":  # a TPR at an FPR below 1/n: never a number (value: the non-members it needs)
        assert shown == f"n/r (needs ≥ {value} non-members)", f"shown {shown!r}, expected the n/r placeholder"
    elif kind in ("num", "signed"):
        if kind == "signed":
            assert shown[0] in "+-", f"a difference must show its sign: {shown!r}"
        _close(shown.lstrip("+"), value)
    elif kind in ("ci", "sci"):
        m = INTERVAL.match(shown)
        assert m, f"{shown!r} is not an interval"
        for part, v in zip(m.groups(), value, strict=True):
            if kind == "sci":
                assert part[0] in "+-"
            _close(part.lstrip("+"), v)
    else:
        raise AssertionError(kind)


def check_tables(parsed: dict[str, list[list[str]]], expected: dict[str, list]) -> int:
    """Every expected table is present with exactly the expected rows; returns the cells checked."""
    checked = 0
    for title, rows in expected.items():
        assert title in parsed, f"table {title!r} missing (found {sorted(parsed)})"
        got = parsed[title]
        assert len(got) == len(rows), f"{title}: {len(got)} rows shown, {len(rows)} expected"
        for want_row, got_row in zip(rows, got, strict=True):
            assert len(got_row) == len(want_row), f"{title}: row {got_row}"
            for (kind, value), shown in zip(want_row, got_row, strict=True):
                check_cell(kind, value, shown)
                checked += 1
    return checked


# -- parsers of each format ----------------------------------------------------------------


class _HTMLTables(HTMLParser):
    """Tables (by their section's h2), td classes and data-json paths, and text outside tables."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.cells: list[tuple[str, str, str]] = []  # (class, data-json, text) of every td
        self.loose_text: list[str] = []
        self.footnotes: list[str] = []  # the FPR-resolution footnotes under tables with n/r cells
        self.imgs: list[dict[str, str]] = []
        self._stack: list[str] = []
        self._h2 = ""
        self._h2_open = False
        self._td = None
        self._row = None
        self._in_pre = 0
        self._in_meta = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self._h2, self._h2_open = "", True
        elif tag == "table":
            self.tables[self._h2] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._td = [tag, attrs.get("class", ""), attrs.get("data-json", ""), ""]
        elif tag == "img":
            self.imgs.append(attrs)
        elif tag in ("pre", "style", "title"):
            self._in_pre += 1
        if tag == "p" and "footnote" in (attrs.get("class") or "").split():
            self.footnotes.append("")
            self._stack.append("footnote")
        elif tag in ("p", "span", "div") and "meta" in (attrs.get("class") or "").split():
            self._in_meta += 1
            self._stack.append("meta")
        elif tag in ("p", "span", "div"):
            self._stack.append("")

    def handle_endtag(self, tag):
        if tag == "h2":
            self._h2_open = False
        elif tag in ("td", "th") and self._td:
            kind, cls, path, text = self._td
            if kind == "td":
                self._row.append(text)
                self.cells.append((cls, path, text))
            self._td = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                list(self.tables.values())[-1].append(self._row)
            self._row = None
        elif tag in ("pre", "style", "title"):
            self._in_pre -= 1
        elif tag in ("p", "span", "div") and self._stack:
            if self._stack.pop() == "meta":
                self._in_meta -= 1

    def handle_data(self, data):
        if self._h2_open:
            self._h2 += data
        if self._td is not None:
            self._td[3] += data
        elif "footnote" in self._stack:
            self.footnotes[-1] += data
        elif not self._in_pre and not self._in_meta:
            self.loose_text.append(data)


def parse_html(text: str) -> _HTMLTables:
    p = _HTMLTables()
    p.feed(text)
    return p


def parse_markdown(text: str) -> dict[str, list[list[str]]]:
    tables, title, rows = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            title, rows = line[4:].strip(), None
        elif line.startswith("|") and title is not None:
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if rows is None:
                rows = tables[title] = []  # header row
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
    return tables


def parse_console(text: str) -> dict[str, list[list[str]]]:
    """rich tables: a title line, then either a table (┏, ┃ header, │ one line per row) or, when the
    terminal is too narrow for it, one field/value box per row (┌, titled 'Title: key / key')."""
    tables: dict[str, list[list[str]]] = {}
    lines = text.splitlines()
    row = None
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("┏"):
            title, row = lines[i - 1].strip(), None
            tables[title] = []
        elif s.startswith("┌"):
            title, row = lines[i - 1].strip().split(":")[0], []
            tables.setdefault(title, []).append(row)
        elif s.startswith("│"):
            cells = [c.strip() for c in s.strip("│").split("│")]
            if row is None:
                tables[title].append(cells)
            else:
                row.append(cells[1])
    return tables


# -- the acceptance test: every number shown equals the JSON's ------------------------------


def test_html_shows_exactly_the_json_numbers(stored, rendered):
    _, data = stored
    page = parse_html(rendered["html"])
    n = check_tables(page.tables, {**expected_tables(data), **expected_long_tables(data)})
    assert n > 150
    # Every numeric cell names the JSON value it shows, and shows that value.
    numeric = [(path, text) for cls, path, text in page.cells if cls == "num"]
    assert numeric and all(path for path, _ in numeric)
    for path, text in numeric:
        value = data
        for part in path.split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            value = value[int(part)] if isinstance(value, list) else value[part]
        if path.endswith("/member_indices"):  # a subset's size
            check_cell("count", len(value), text)
        elif isinstance(value, list):
            check_cell("sci" if text.startswith("[+") or text.startswith("[-") else "ci", value, text)
        else:
            check_cell("count" if isinstance(value, int) else ("signed" if text[0] in "+-" else "num"), value, text)
    # A TPR the non-members cannot resolve is a placeholder cell (class nr) naming its JSON value, with the
    # footnote stating the smallest resolvable FPR, 1/n (the fixture has 40 non-members: no TPR resolves).
    unresolved = [path for cls, path, _ in page.cells if cls == "nr"]
    assert unresolved and all(re.search(r"/tpr_at_(1fpr|1fpr_ci|01fpr)(_before|_after)?$", p) for p in unresolved)
    n = data["audits"][0]["membership"]["n_nonmembers"]
    assert page.footnotes and all(f"1/{n} = {1 / n:.3g}" in f for f in page.footnotes)
    # No number is shown anywhere else (outside the tables, the footnotes, the config blocks and the header line).
    stray = [t for t in page.loose_text if re.search(r"(?<![\w@.%])[-+]?\d+(?:\.\d+)?(?![\w%])", t)]
    assert not stray, f"numbers outside the checked tables: {stray}"


def test_markdown_shows_exactly_the_json_numbers(stored, rendered):
    _, data = stored
    tables = parse_markdown(rendered["markdown"])
    assert check_tables(tables, {**expected_tables(data), **expected_long_tables(data)}) > 150
    blocks = re.findall(r"```json\n(.*?)\n```", rendered["markdown"], re.S)
    assert [json.loads(b) for b in blocks] == [data["config"], data["seeds"], data["versions"]]


def test_console_shows_exactly_the_json_numbers(stored, rendered):
    _, data = stored
    assert check_tables(parse_console(rendered["console"]), expected_tables(data)) > 60


def test_console_on_a_narrow_terminal_never_breaks_a_number(stored, rendered):
    """At 80 columns each row becomes a field/value box; the numbers are still whole and equal the JSON's."""
    _, data = stored
    boxes = parse_console(rendered["console80"])
    for title, rows in expected_tables(data).items():
        assert len(boxes[title]) == len(rows)
        for want, got in zip(rows, boxes[title], strict=True):
            for (kind, value), shown in zip(want, got, strict=True):
                if kind != "text":  # long messages may fold; numbers never do
                    check_cell(kind, value, shown)
    assert max(len(line) for line in rendered["console80"].splitlines()) <= 80


def test_verdict_says_amplified_only_when_the_interval_excludes_zero_upward(stored, rendered):
    _, data = stored
    amplified = [c for c in data["comparisons"] if c["delta_auc_ci"][0] > 0]
    not_amplified = [c for c in data["comparisons"] if c["delta_auc_ci"][0] <= 0]
    assert amplified and not_amplified, "the fixture should hold both kinds of comparison"
    for text in (rendered["html"], rendered["markdown"], rendered["console"]):
        headline = next(line for line in text.splitlines() if "S2L amplif" in line)
        assert "amplified membership leakage" in headline
        for c in amplified:
            assert f"{c['method']} / {c['attack']} ({c['subset']})" in headline
        for c in not_amplified:
            assert f"{c['method']} / {c['attack']} ({c['subset']})" not in headline


def test_verdict_without_amplification_says_not_established(stored, tmp_path):
    from s2l_plugin.report.view import build_view

    _, data = stored
    data = copy.deepcopy(data)
    for c in data["comparisons"]:
        c["delta_auc_ci"] = [-0.02, 0.05]
    data["comparisons"][0]["delta_auc_ci"] = [-0.09, -0.01]
    v = build_view(data).verdict
    assert v.headline.startswith("S2L amplification not established")
    assert any(line.startswith("Membership leakage fell") for line in v.lines)


def test_html_is_self_contained_with_roc_curves_and_grids(stored, rendered):
    path, data = stored
    page = parse_html(rendered["html"])
    attacks = {x["attack"] for a in data["audits"] for x in a["membership"]["attacks"]}
    rocs = [i for i in page.imgs if i.get("class") == "roc"]
    assert len(rocs) == 2 * len(attacks)  # linear and log-log per attack
    grids = [i for i in page.imgs if i.get("class") == "grid"]
    assert len(grids) == len([a for a in data["audits"] if a["extraction"]["grid_png"]]) == 2
    for img in page.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1]).startswith(b"\x89PNG")
    # The grids are the extraction's own PNGs, embedded byte for byte.
    for img, audit in zip(grids, data["audits"], strict=True):
        assert base64.b64decode(img["src"].split(",", 1)[1]) == (path.parent / audit["extraction"]["grid_png"]).read_bytes()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", rendered["html"]), "no network fetch"
    assert "<script" not in rendered["html"]


def test_writers_render_the_saved_json_and_never_recompute(stored, tmp_path):
    """Edit numbers in result.json by hand: every report shows the edited numbers. (And a grid
    image missing beside result.json is named in the page, not fatal.)"""
    from rich.console import Console

    from s2l_plugin.report.console_report import print_summary
    from s2l_plugin.report.writers import write_reports

    path, data = stored
    edited = copy.deepcopy(data)
    edited["comparisons"][0]["auc_after"] = 0.987654  # inconsistent with the scores on purpose
    edited["audits"][1]["membership"]["attacks"][0]["auc"] = 0.123456
    (tmp_path / "result.json").write_text(json.dumps(edited))
    base_grid = data["audits"][0]["extraction"]["grid_png"]
    (tmp_path / base_grid).parent.mkdir()
    (tmp_path / base_grid).write_bytes((path.parent / base_grid).read_bytes())  # the lora grid stays behind
    write_reports(tmp_path / "result.json", tmp_path, ["html", "markdown"])
    buf = io.StringIO()
    print_summary(tmp_path, console=Console(file=buf, width=250, color_system=None), full=True)
    html = (tmp_path / "report.html").read_text()
    for text in (html, (tmp_path / "report.md").read_text(), buf.getvalue()):
        assert "0.988" in text and "0.123" in text
    assert f"grid image {data['audits'][1]['extraction']['grid_png']} not found" in html
    assert len([i for i in parse_html(html).imgs if i.get("class") == "grid"]) == 1


# -- result.json: schema, CSVs, versions -------------------------------------------------------


def test_shipped_json_schema_matches_the_dataclasses():
    """Regenerate with `python -m s2l_plugin.result` after changing a result dataclass."""
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema()


def test_stored_result_validates_against_the_schema_and_bad_ones_do_not(stored):
    import jsonschema  # the test extra
    _, data = stored
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(data, schema)
    bad = copy.deepcopy(data)
    bad["comparisons"][0]["auc_after"] = "0.7"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(data)
    bad["audits"][0]["surprise"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_per_sample_csvs_beside_result_json_hold_the_json_scores(stored):
    path, data = stored
    for a in data["audits"]:
        for x in a["membership"]["attacks"]:
            rows = list(csv.DictReader((path.parent / "samples" / f"{a['model']['label']}.{x['attack']}.scores.csv").open()))
            assert [r["id"] for r in rows] == x["member_ids"] + x["nonmember_ids"]
            assert [int(r["member"]) for r in rows] == [1] * len(x["member_ids"]) + [0] * len(x["nonmember_ids"])
            assert [float(r["score"]) for r in rows] == x["member_scores"] + x["nonmember_scores"]  # exact (repr)
        rows = list(csv.DictReader((path.parent / "samples" / f"{a['model']['label']}.extraction.csv").open()))
        assert [float(r["distance_l2"]) for r in rows] == [m["distance_l2"] for m in a["extraction"]["matches"]]


def test_result_round_trips(stored, tmp_path):
    path, data = stored
    result = load_result(path)
    assert isinstance(result, RunResult) and result.audit("lora").extraction.grid_png == "grids/lora.png"
    assert json.loads(save_result(result, tmp_path).read_text()) == data


@pytest.mark.parametrize(
    ("version", "match"),
    [(SCHEMA_VERSION + 1, rf"schema_version {SCHEMA_VERSION + 1}; .*newer s2l-plugin"), (0, "schema_version 0; "), (None, "schema_version None")],
)
def test_unreadable_schema_version_is_named(stored, tmp_path, version, match):
    _, data = stored
    (tmp_path / "result.json").write_text(json.dumps({**data, "schema_version": version}))
    with pytest.raises(InputError, match=match):
        load_result(tmp_path)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe binary"], ids=["bad-json", "not-utf8"])
def test_unreadable_result_file_is_a_one_line_input_error(tmp_path, content):
    """Bug fixed: a result.json that is not UTF-8 raised a bare UnicodeDecodeError."""
    (tmp_path / "result.json").write_bytes(content)
    with pytest.raises(InputError, match=r"result\.json' is not valid JSON"):
        load_result(tmp_path)


def test_older_schema_versions_are_upgraded_through_migrations(stored, tmp_path, monkeypatch):
    """A result written by version N-1 loads once a migration to N is registered."""
    import s2l_plugin.result as r

    _, data = stored
    old = copy.deepcopy(data)
    old["schema_version"] = SCHEMA_VERSION - 1
    old["kind_of_run"] = old.pop("kind")  # pretend the field was renamed in the newer version

    def migrate(d):
        d["kind"] = d.pop("kind_of_run")
        d["schema_version"] += 1
        return d

    monkeypatch.setattr(r, "MIGRATIONS", {SCHEMA_VERSION - 1: migrate})
    monkeypatch.setattr(r, "OLDEST_READABLE", SCHEMA_VERSION - 1)
    (tmp_path / "result.json").write_text(json.dumps(old))
    assert r.load_result(tmp_path).kind == data["kind"]


def test_missing_and_unknown_fields_are_one_line_errors(stored, tmp_path):
    _, data = stored
    bad = copy.deepcopy(data)
    del bad["comparisons"][0]["auc_after"]
    (tmp_path / "result.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"Comparison: missing field\(s\) \['auc_after'\]"):
        load_result(tmp_path)


# -- hooks -------------------------------------------------------------------------------------


def test_hook_register_report_writers_registers_the_builtin_writers():
    from s2l_plugin.hooks.manager import collect

    writers = collect("report_writers")
    assert {"html", "markdown", "console", "json"} <= set(writers)
    assert all(callable(w.write) for w in writers.values())


def test_hook_s2l_write_report_default_writes_html_markdown_and_prints(stored, tmp_path, capsys):
    from s2l_plugin.hooks.manager import get_plugin_manager

    result = load_result(stored[0])
    out = tmp_path / "run"
    get_plugin_manager().hook.s2l_write_report(result=result, out_dir=out)
    assert {"result.json", "report.html", "report.md"} <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert "S2L amplifi" in printed
    assert f"Full report: {out / 'report.html'} · {out / 'report.md'}" in printed


def test_hook_s2l_write_report_follows_the_runs_report_formats(stored, tmp_path, capsys):
    from s2l_plugin.hooks.manager import get_plugin_manager

    result = load_result(stored[0])
    for i, option in enumerate((["markdown"], "markdown", {"formats": ["markdown"]})):  # as run configs write it
        result.config["report"] = option
        get_plugin_manager().hook.s2l_write_report(result=result, out_dir=tmp_path / str(i))
        assert (tmp_path / str(i) / "report.md").is_file() and not (tmp_path / str(i) / "report.html").exists()
    assert capsys.readouterr().out == ""


def test_unknown_format_fails_before_anything_is_written(stored, tmp_path):
    from s2l_plugin.report.writers import write_reports

    with pytest.raises(ConfigError, match=r"unknown report writer 'pdf'; expected one of: .*html"):
        write_reports(load_result(stored[0]), tmp_path, ["html", "pdf"])
    assert list(tmp_path.iterdir()) == []


def test_json_writer_normalises_result_json(stored, tmp_path):
    from s2l_plugin.hooks.manager import get

    path, data = stored
    sparse = copy.deepcopy(data)
    del sparse["warnings"]  # a field with a default, absent in an older file
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "result.json").write_text(json.dumps(sparse))
    written = get("report_writers", "json").write(tmp_path / "in" / "result.json", tmp_path / "out")
    assert tmp_path / "out" / "result.json" in written
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == {**sparse, "warnings": []}


# -- the command -------------------------------------------------------------------------------


def _s2l(*args):
    return subprocess.run([sys.executable, "-m", "s2l_plugin.cli", *map(str, args)], capture_output=True, text=True)


def test_s2l_report_rerenders_the_chosen_format(stored, tmp_path):
    path, _ = stored
    proc = _s2l("report", path.parent, "--format", "markdown", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "report.html").exists()
    assert f"wrote {tmp_path / 'report.md'}" in proc.stdout


def test_s2l_report_errors_are_one_line(tmp_path):
    proc = _s2l("report", tmp_path / "nothing")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("s2l: error: no result at ")


def test_s2l_report_compare_shows_every_metric_difference(stored, tmp_path):
    path, a = stored
    other = tmp_path / "other"
    build_run_result(other, seed=1, shift=0.2)
    b = json.loads((other / "result.json").read_text())
    proc = _s2l("report", path.parent, "--compare", other, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r[0]: r[1:] for r in parse_markdown((tmp_path / "compare.md").read_text()).popitem()[1]}
    console = {r[0]: r[1:] for r in parse_console(proc.stdout).popitem()[1]}
    expect = {}
    for ca, cb in zip(a["comparisons"], b["comparisons"], strict=True):
        p = f"S2L {ca['method']} / {ca['attack']} ({ca['subset']}): "
        expect[p + "AUC after"] = ("num", ca["auc_after"], cb["auc_after"])
        expect[p + "ΔAUC"] = ("signed", ca["delta_auc"], cb["delta_auc"])
        expect[p + "extracted after"] = ("count", ca["extracted_after"], cb["extracted_after"])
    for xa, xb in zip(a["audits"][1]["membership"]["attacks"], b["audits"][1]["membership"]["attacks"], strict=True):
        for key, name in (("auc", "AUC"), ("asr", "ASR")):
            expect[f"MIA lora / {xa['attack']}: {name}"] = ("num", xa[key], xb[key])
        # 40 non-members resolve no FPR below 1/40: TPR@1%FPR is n/r in both runs, with no difference.
        n_a, n_b = len(xa["nonmember_scores"]), len(xb["nonmember_scores"])
        kind_a, va = _tpr(xa["tpr_at_1fpr"], 0.01, n_a)
        kind_b, vb = _tpr(xb["tpr_at_1fpr"], 0.01, n_b)
        assert kind_a == kind_b
        expect[f"MIA lora / {xa['attack']}: TPR@1%FPR"] = (kind_a, va, vb)
    assert len(rows) >= len(flatten := expect) and len(console) == len(rows)
    for name, (kind, va, vb) in flatten.items():
        for shown in (rows[name], console[name]):
            check_cell(kind, va, shown[0])
            check_cell(kind, vb, shown[1])
            if kind == "count":
                assert shown[2] == f"{vb - va:+d}"
            elif kind == "nr":
                assert shown[2] == "—"
            else:
                check_cell("signed", vb - va, shown[2])


def test_audit_without_comparisons_words_the_membership_signal_by_its_interval(stored):
    """A plain audit (no before/after): 'signal detected' only when an AUC interval lies above chance."""
    from s2l_plugin.report.view import build_view

    _, data = stored
    audit = copy.deepcopy({**data, "kind": "audit", "comparisons": [], "audits": data["audits"][1:]})
    attacks = audit["audits"][0]["membership"]["attacks"]
    for x in attacks:
        x["auc_ci"] = [0.45, 0.62]
    assert build_view(audit).verdict.headline.startswith("No membership signal beyond chance")
    attacks[0]["auc_ci"] = [0.51, 0.70]
    headline = build_view(audit).verdict.headline
    assert headline.startswith("Membership signal detected") and f"lora / {attacks[0]['attack']}" in headline
    assert f"lora / {attacks[1]['attack']}" not in headline


def test_a_findings_only_result_renders_in_every_format(tmp_path, capsys):
    """`s2l scan`-style results (metadata only, no MIA, no extraction) still render, without empty sections."""
    from s2l_plugin.report.writers import write_reports
    from s2l_plugin.result import AuditResult, MetadataFinding, ModelIdentity

    result = RunResult(
        kind="audit",
        audits=[AuditResult(ModelIdentity("community-lora"), findings=[MetadataFinding("ss_tag_frequency", "medium", "tags list names", "42 tags")])],
    )
    written = write_reports(result, tmp_path, ["html", "markdown", "console"])
    html = (tmp_path / "report.html").read_text()
    assert "No membership inference was run." in html and "42 tags" in html
    assert 'id="roc"' not in html and "<img" not in html
    assert [p.name for p in written] == ["report.html", "report.md"]
    assert "ss_tag_frequency" in capsys.readouterr().out


def test_verdict_does_not_call_a_rise_of_an_inverted_attack_amplification():
    from s2l_plugin.report.view import _verdict

    def comparison(attack, before, after, ci):
        return {"method": "dreambooth", "attack": attack, "subset": "all", "auc_before": before, "auc_after": after,
                "delta_auc": after - before, "delta_auc_ci": ci, "tpr_at_1fpr_before": 0.0, "tpr_at_1fpr_after": 0.0}

    inverted = _verdict({"comparisons": [comparison("secmi", 0.30, 0.40, [0.05, 0.15]), comparison("loss", 0.7, 0.69, [-0.03, 0.01])]})
    assert inverted.level == "not-established"
    assert any("move toward chance" in line and "dreambooth / secmi (all)" in line for line in inverted.lines)
    # Crossing chance (the demo's end2end / secmi, duplicated: 0.07 -> 0.66) still leaves less signal than before.
    crossed = _verdict({"comparisons": [comparison("secmi", 0.07, 0.66, [0.45, 0.70])]})
    assert crossed.level == "not-established" and "inverted attacks moving toward chance (dreambooth / secmi (all))" in crossed.headline
    # An attack just below chance that rises well above it is leakage growing, and is called so.
    grown = _verdict({"comparisons": [comparison("secmi", 0.45, 0.70, [0.15, 0.35])]})
    assert grown.level == "amplified" and "dreambooth / secmi (all)" in grown.headline
    real = _verdict({"comparisons": [comparison("loss", 0.60, 0.68, [0.02, 0.14]), comparison("pia", 0.55, 0.55, [-0.02, 0.02])]})
    assert real.level == "amplified" and "dreambooth / loss (all)" in real.headline
    assert any("by chance alone" in line for line in real.lines)
