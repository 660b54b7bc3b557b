"""The terminal summary of a run: the answer on one screen, every number equal to result.json's.

The fixture is shaped like `s2l demo`'s result (8 methods x 3 attacks x 3 member subsets = 72
comparisons) with every metric computed from seeded scores by s2l_plugin.audit (as in
tests/report_data.py). Expectations are written from the JSON directly, not from the view code:
which comparison each cell shows, which mark its interval earns. Numbers are parsed back out of
the printed text and compared within the one rounding rule (s2l_plugin.report.numbers).
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest
from report_data import DUPLICATED, N_MEMBERS, N_NONMEMBERS, build_run_result
from report_data import _attack as attack_result
from test_report import _s2l, check_cell, check_tables, expected_tables, parse_console

from s2l_plugin.result import (
    AttackResult,
    AuditResult,
    MembershipResult,
    ModelIdentity,
    RunResult,
    save_result,
)

# The demo's methods, in its config's order.
METHODS = [
    "dreambooth", "end2end", "lora", "lora_dreambooth",
    "textual_inversion", "hypernetwork", "textual_inversion+dreambooth", "textual_inversion+lora",
]
ATTACKS = ("loss", "pia", "secmi")
# How far each method moves its members' scores (the S2L effect simulated): lora clearly up,
# dreambooth clearly down, the rest small. secmi ranks members *below* non-members on the base.
SHIFTS = {"dreambooth": -1.2, "end2end": 0.1, "lora": 1.2, "lora_dreambooth": 0.0, "textual_inversion": 0.0,
          "hypernetwork": -0.05, "textual_inversion+dreambooth": 0.05, "textual_inversion+lora": 0.15}
SIGNAL = {"loss": 0.5, "pia": 0.3, "secmi": -1.0}
NON_DUPLICATED = [i for i in range(N_MEMBERS) if i not in DUPLICATED]
N_GENERATIONS = 128


def _attack(name: str, member: np.ndarray, nonmember: np.ndarray, seed: int) -> AttackResult:
    """report_data's AttackResult with both member subsets."""
    return attack_result(name, member, nonmember, seed, {"duplicated": DUPLICATED, "non-duplicated": NON_DUPLICATED})


def build_demo_result(out_dir, seed: int = 0):
    """Save a demo-shaped result (base + 8 fine-tuned models, 72 comparisons); returns result.json."""
    from s2l_plugin.audit.compare import compare_attack

    rng = np.random.default_rng(seed)
    base = AuditResult(ModelIdentity("base", "testbed/demo", None, "ab" * 32))
    base.membership = MembershipResult(attacks=[], n_members=N_MEMBERS, n_nonmembers=N_NONMEMBERS, seed=seed)
    scores = {}
    for k, attack in enumerate(ATTACKS):
        m0 = rng.normal(SIGNAL[attack], 1, N_MEMBERS)
        m0[DUPLICATED] += 1.5 * np.sign(SIGNAL[attack])
        n0 = rng.normal(0, 1, N_NONMEMBERS)
        scores[attack] = (m0, n0)
        base.membership.attacks.append(_attack(attack, m0, n0, seed + k))
    audits, comparisons = [base], []
    extracted_before = int(rng.integers(0, 4))
    for method in METHODS:
        after = AuditResult(ModelIdentity(method, f"runs/{method}", method, "cd" * 32))
        after.membership = MembershipResult(attacks=[], n_members=N_MEMBERS, n_nonmembers=N_NONMEMBERS, seed=seed)
        # secmi's members sit below chance; every method moves them up, toward 0.5 (an inverted attack's rise)
        extracted_after = int(rng.integers(0, 4))
        for k, attack in enumerate(ATTACKS):
            m0, n0 = scores[attack]
            shift = 0.5 if attack == "secmi" else SHIFTS[method]
            m1 = m0 + shift + rng.normal(0, 0.2, N_MEMBERS)
            n1 = n0 + rng.normal(0, 0.2, N_NONMEMBERS)
            before, fine_tuned = base.membership.attacks[k], _attack(attack, m1, n1, seed + k)
            after.membership.attacks.append(fine_tuned)
            for subset, indices in (("all", None), ("duplicated", DUPLICATED), ("non-duplicated", NON_DUPLICATED)):
                c = compare_attack(before, fine_tuned, method=method, subset=subset, member_indices=indices, seed=seed)
                c.extracted_before, c.extracted_after, c.n_generations = extracted_before, extracted_after, N_GENERATIONS
                comparisons.append(c)
        audits.append(after)
    result = RunResult(kind="run", audits=audits, comparisons=comparisons, config={"domains": ["seven"], "methods": METHODS},
                       seeds={"run": seed}, created="2026-11-28T08:00:00+00:00")
    return save_result(result, out_dir)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(result.json path, its dict) of the demo-shaped result, with report.html / report.md beside it."""
    from s2l_plugin.report.writers import write_reports

    path = build_demo_result(tmp_path_factory.mktemp("demo"))
    write_reports(path, path.parent, ["html", "markdown"])
    return path, json.loads(path.read_text())


def summary(path, width: int, **kw) -> str:
    from rich.console import Console

    from s2l_plugin.report.console_report import print_summary

    buf = io.StringIO()
    if not isinstance(path, dict):  # as the console writer calls it, after writing the reports
        kw.setdefault("report_path", [path.parent / "report.html", path.parent / "report.md"])
    print_summary(path, console=Console(file=buf, width=width, color_system=None), **kw)
    return buf.getvalue()


# -- what the summary must show, from the JSON --------------------------------------------------


def expected_mark(c) -> str:
    lo, hi = c["delta_auc_ci"]
    if lo > 0:
        # an attack scoring members below chance before that ends no further from chance: not amplification
        return "△" if c["auc_before"] < 0.5 and abs(c["auc_after"] - 0.5) < abs(c["auc_before"] - 0.5) else "▲"
    return "▼" if hi < 0 else "○"


def primary(data) -> dict[tuple[str, str], dict]:
    """{(method, attack): comparison} of the non-duplicated subset (the demo's primary endpoint)."""
    return {(c["method"], c["attack"]): c for c in data["comparisons"] if c["subset"] == "non-duplicated"}


def parse_summary_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the method x attack tables: a row is [method, "ΔAUC mark", "[lo, hi]", ...].
    Each row takes two lines (the interval, and the rest of a method name broken after "+", on the
    second); the attacks of a second table (a narrow terminal) join their method's row."""
    headers: list[str] = []
    rows: dict[str, list[str]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("┏"):
            continue
        headers += [c.strip() for c in lines[i + 1].strip("┃").split("┃")][1:]
        j = i + 3
        while not lines[j].startswith("└"):
            first, second = ([c.strip() for c in row.strip("│").split("│")] for row in lines[j : j + 2])
            for delta, interval in zip(first[1:], second[1:], strict=True):
                rows.setdefault(first[0] + second[0], []).extend([delta, interval])
            j += 2
    return headers, [[name, *cells] for name, cells in rows.items()]


# -- the acceptance tests -----------------------------------------------------------------------


def test_demo_summary_fits_one_screen_at_100_and_80_columns(demo):
    path, data = demo
    for width, budget in ((100, 40), (80, 42)):
        text = summary(path, width)
        lines = text.splitlines()
        assert len(lines) <= budget, f"{len(lines)} lines at {width} columns:\n{text}"
        assert max(len(line) for line in lines) <= width
        assert "┌" not in text, "a table fell back to one box per row"
        headers, rows = parse_summary_table(text)
        assert headers == list(ATTACKS) and [r[0] for r in rows] == METHODS


def test_every_number_in_the_summary_equals_result_json(demo):
    path, data = demo
    want = primary(data)
    for width in (100, 80):
        text = summary(path, width)
        _, rows = parse_summary_table(text)
        shown = 0
        for method, *cells in rows:
            for attack, (delta, interval) in zip(ATTACKS, zip(cells[::2], cells[1::2], strict=True), strict=True):
                c = want[(method, attack)]
                number, mark = delta.split()
                check_cell("signed", c["delta_auc"], number)
                check_cell("sci", c["delta_auc_ci"], interval)
                assert mark == expected_mark(c), f"{method}/{attack}: {mark} for {c['delta_auc_ci']}"
                shown += 1
        assert shown == len(METHODS) * len(ATTACKS)
        # Extraction before → after per method, from the method's comparisons
        flat = " ".join(text.split())
        m = re.search(r"Extracted training images \(unique, before → after, of (\d+) generations\):(.*?)Full report", flat)
        assert m and int(m.group(1)) == data["comparisons"][0]["n_generations"]
        got = re.findall(r"(\S+) (\d+) → (\d+)", m.group(2))
        assert [g[0] for g in got] == METHODS
        for method, before, after in got:
            c = want[(method, "loss")]
            assert (int(before), int(after)) == (c["extracted_before"], c["extracted_after"])
        # The other subsets in one line: how many of their intervals lie above zero (a real rise)
        others = [c for c in data["comparisons"] if c["subset"] != "non-duplicated"]
        m = re.search(r"Other subsets \(all, duplicated\): (\d+) of (\d+) intervals above zero", flat)
        assert m and (int(m.group(1)), int(m.group(2))) == (sum(expected_mark(c) == "▲" for c in others), len(others))
        up = [c for c in others if expected_mark(c) == "▲"]
        if len(up) > 3:
            assert re.search(rf"and {len(up) - 3} more[.;]", flat)
        toward = [c for c in others if expected_mark(c) == "△"]
        m = re.search(r"; (\d+) more above zero as an inverted attack moving toward chance", flat)
        assert (int(m.group(1)) if m else 0) == len(toward)
        # The headline: the report's own, or (when it would list too many names) the count of amplified comparisons
        m = re.match(r"S2L amplified membership leakage: the ΔAUC 95% interval lies above zero for (\d+) of (\d+) comparisons", flat)
        if m:
            everywhere = [c for c in data["comparisons"] if expected_mark(c) == "▲"]
            assert (int(m.group(1)), int(m.group(2))) == (len(everywhere), len(data["comparisons"]))
        # No other number anywhere: strip the checked ones, the legend's constants and the paths.
        rest = re.sub(r"[-+]\d\.\d{3}|\[[-+]\d\.\d{3}, [-+]\d\.\d{3}\]|\d+ → \d+|\d+ of \d+|of \d+ generations|and \d+ more|; \d+ more above zero", " ", flat)
        rest = rest.replace("95%", "").replace("AUC < 0.5", "").replace("above 0", "").replace("below 0", "").replace("contains 0", "")
        rest = rest.replace(str(path.parent), "")
        assert not re.findall(r"(?<![\w/])\d+(?![\w])", rest), f"unchecked numbers in: {rest}"


def test_the_fixture_holds_every_kind_of_mark(demo):
    _, data = demo
    marks = {expected_mark(c) for c in primary(data).values()}
    assert {"▲", "▼", "○", "△"} <= marks, marks


def test_marks_follow_the_reports_verdict_and_the_inverted_attack_caveat(demo):
    """The headline is the report's own; an inverted attack's rise is marked △ and explained, never ▲."""
    from s2l_plugin.report.view import build_view

    path, data = demo
    text = summary(path, 100)
    headline = build_view(data).verdict.headline
    amplified = [c for c in data["comparisons"] if expected_mark(c) == "▲"]
    flat = " ".join(text.split())
    if len(headline) <= 200:
        assert flat.startswith(headline)
    else:
        assert flat.startswith(f"S2L amplified membership leakage: the ΔAUC 95% interval lies above zero for {len(amplified)} of 72 comparisons")
    assert "△ above 0, but the attack scored members below chance (AUC < 0.5) before and ends no further from chance" in flat
    assert "by chance alone" in flat  # several comparisons, some amplified: the multiplicity caveat
    for c in primary(data).values():
        if c["attack"] == "secmi" and expected_mark(c) == "△":
            assert c["auc_before"] < 0.5  # what △ claims
    assert f"Full report: {path.parent / 'report.html'} · {path.parent / 'report.md'}" in text or \
        f"Full report: {path.parent / 'report.html'} · {path.parent / 'report.md'}" in flat


def test_many_or_long_attack_names_split_the_table_and_abbreviate_with_a_legend(demo):
    """At 80 columns no table falls back to per-row boxes: extra attacks go to a second table,
    a name longer than a column becomes A<k> with its legend."""
    import copy

    _, data = demo
    data = copy.deepcopy(data)
    extra = []
    for c in data["comparisons"]:
        if c["attack"] == "pia":
            extra.append({**c, "attack": "a_plugin_attack_with_a_long_name"})
    data["comparisons"] += extra
    text = summary(data, 80)
    assert "┌" not in text and max(len(x) for x in text.splitlines()) <= 80
    headers, rows = parse_summary_table(text)
    assert text.count("┏") == 2 and headers == [*ATTACKS, "A4"]
    assert "A4 = a_plugin_attack_with_a_long_name" in " ".join(text.split())
    long_name = {c["method"]: c for c in extra if c["subset"] == "non-duplicated"}
    for method, *cells in rows:
        check_cell("sci", long_name[method]["delta_auc_ci"], cells[7])


def test_s2l_report_prints_the_summary_and_full_prints_every_table(demo, tmp_path):
    path, _ = demo
    short = _s2l("report", path.parent, "--format", "console")
    assert short.returncode == 0, short.stderr
    assert len(short.stdout.splitlines()) <= 40 and "Membership inference" not in short.stdout
    assert len(parse_summary_table(short.stdout)[1]) == len(METHODS)
    # it names the reports beside the result, unless they are older than it (a stale report)
    assert f"Full report: {path.parent / 'report.html'} · {path.parent / 'report.md'}" in " ".join(short.stdout.split())
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in ("report.html", "report.md", "result.json"):
        (stale / name).write_bytes((path.parent / name).read_bytes())
    later = (stale / "report.html").stat().st_mtime + 60
    os.utime(stale / "result.json", (later, later))
    proc = _s2l("report", stale, "--format", "console")
    assert proc.returncode == 0, proc.stderr
    assert "Full report" not in proc.stdout and f"s2l report {stale} --format console --full" in proc.stdout
    # --full: the long listing, every table of the report tests' result, every number equal to its JSON
    other = build_run_result(tmp_path)
    long = _s2l("report", other.parent, "--format", "console", "--full")
    assert long.returncode == 0, long.stderr
    assert check_tables(parse_console(long.stdout), expected_tables(json.loads(other.read_text()))) > 60


def test_run_and_demo_full_reach_the_console_writer_of_the_report_hook(demo, tmp_path, capsys):
    """`s2l run/demo --full` wrap the run in full_listing: the report hook's console writer prints every table."""
    from s2l_plugin.hooks.manager import get_plugin_manager

    from s2l_plugin.cli import build_parser
    from s2l_plugin.report.console_report import full_listing
    from s2l_plugin.result import load_result

    for argv in (["run", "x.toml", "--full"], ["demo", "--full"]):
        assert build_parser().parse_args(argv).full
    result = load_result(demo[0])
    with full_listing():
        get_plugin_manager().hook.s2l_write_report(result=result, out_dir=tmp_path / "full")
    long = capsys.readouterr().out
    get_plugin_manager().hook.s2l_write_report(result=result, out_dir=tmp_path / "short")
    short = capsys.readouterr().out
    assert "Membership inference" in long and len(long.splitlines()) > 100
    assert "Membership inference" not in short and len(short.splitlines()) <= 40


def test_a_method_run_on_several_domains_gets_a_row_per_domain(demo):
    """Several domains compare each method once per domain: one row each, labelled method/domain."""
    import copy

    _, data = demo
    data = copy.deepcopy(data)
    second = copy.deepcopy(data["comparisons"])
    for c in second:
        c["delta_auc"] = -c["delta_auc"]
        c["delta_auc_ci"] = [-c["delta_auc_ci"][1], -c["delta_auc_ci"][0]]
    data["comparisons"] += second
    data["config"]["domains"] = ["seven", "eight"]
    text = summary(data, 80)
    assert max(len(x) for x in text.splitlines()) <= 80 and "┌" not in text
    _, rows = parse_summary_table(text)
    assert [r[0] for r in rows] == [f"{m}/{d}" for d in ("seven", "eight") for m in METHODS]
    n = len(data["comparisons"]) // 2
    by_domain = {"seven": data["comparisons"][:n], "eight": data["comparisons"][n:]}
    for label, *cells in rows:
        method, domain = label.rsplit("/", 1)
        for attack, interval in zip(ATTACKS, cells[1::2], strict=True):
            c = next(x for x in by_domain[domain] if (x["method"], x["attack"], x["subset"]) == (method, attack, "non-duplicated"))
            check_cell("sci", c["delta_auc_ci"], interval)
