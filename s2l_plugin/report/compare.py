"""Two saved runs side by side: every metric of both, and the difference (B − A).

The only number computed here is the difference of two stored values; everything else is
read from the two ``result.json`` files and rounded as every report rounds
(:mod:`s2l_plugin.report.numbers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2l_plugin.report import numbers as fmt
from s2l_plugin.report.view import (
    NOT_RESOLVED,
    NR_KIND,
    Cell,
    Table,
    _attack_n,
    _comparison_n,
    comparison_verdict,
    not_resolved,
    tpr_resolvable,
)

COMPARE_FILE = "compare.md"


@dataclass(frozen=True)
class NotResolved:
    """A TPR at an FPR its run's non-members cannot resolve (below 1/n): shown as n/r, never differenced."""

    fpr: float


@dataclass
class MetricDiff:
    """One metric in runs A and B. ``kind``: "metric" (a float), "delta" (a signed float), "count" (an int)
    or "verdict" (a word)."""

    name: str
    kind: str
    a: Any = None
    b: Any = None

    @property
    def diff(self) -> float | int | None:
        """B − A when both runs have the number, else None."""
        if self.kind == "verdict" or self.a is None or self.b is None or isinstance(self.a, NotResolved) or isinstance(self.b, NotResolved):
            return None
        return self.b - self.a


def flatten_metrics(data: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Every metric of a saved result's dict as ``{name: (kind, value)}``, in report order."""
    out: dict[str, tuple[str, Any]] = {}

    def put(name: str, kind: str, value: Any) -> None:
        key, n = name, 2
        while key in out:  # two entries with the same labels stay apart
            key, n = f"{name} #{n}", n + 1
        out[key] = (kind, value)

    def tpr(value: Any, fpr: float, ok: bool) -> Any:
        return value if ok or value is None else NotResolved(fpr)

    for c in data.get("comparisons") or []:
        p = f"S2L {c['method']} / {c['attack']} ({c.get('subset', 'all')}): "
        ci = c.get("delta_auc_ci") or [None, None]
        ok = tpr_resolvable(0.01, _comparison_n(data, c), c.get("tpr_at_1fpr_resolvable"))
        for label, kind, value in (
            ("AUC before", "metric", c["auc_before"]),
            ("AUC after", "metric", c["auc_after"]),
            ("ΔAUC", "delta", c["delta_auc"]),
            ("ΔAUC CI low", "delta", ci[0]),
            ("ΔAUC CI high", "delta", ci[1]),
            ("TPR@1%FPR before", "metric", tpr(c["tpr_at_1fpr_before"], 0.01, ok)),
            ("TPR@1%FPR after", "metric", tpr(c["tpr_at_1fpr_after"], 0.01, ok)),
            ("extracted before", "count", c.get("extracted_before")),
            ("extracted after", "count", c.get("extracted_after")),
            ("generations", "count", c.get("n_generations")),
            ("verdict", "verdict", comparison_verdict(c)),
        ):
            put(p + label, kind, value)
    for a in data.get("audits") or []:
        label = a["model"]["label"]
        m = a.get("membership")
        if m:
            put(f"MIA {label}: members", "count", m["n_members"])
            put(f"MIA {label}: non-members", "count", m["n_nonmembers"])
            for t in m.get("attacks") or []:
                p = f"MIA {label} / {t['attack']}: "
                ci = t.get("auc_ci") or [None, None]
                n = _attack_n(t)
                ok1 = tpr_resolvable(0.01, n, t.get("tpr_at_1fpr_resolvable"))
                ok01 = tpr_resolvable(0.001, n, t.get("tpr_at_01fpr_resolvable"))
                for name, value in (
                    ("AUC", t["auc"]), ("AUC CI low", ci[0]), ("AUC CI high", ci[1]), ("TPR@1%FPR", tpr(t["tpr_at_1fpr"], 0.01, ok1)),
                    ("TPR@0.1%FPR", tpr(t["tpr_at_01fpr"], 0.001, ok01)), ("ASR", t["asr"]), ("advantage", t["advantage"]),
                ):
                    put(p + name, "metric", value)
                for sname, sub in (t.get("subsets") or {}).items():
                    p = f"MIA {label} / {t['attack']} [{sname}]: "
                    ci = sub.get("auc_ci") or [None, None]
                    for name, value in (
                        ("AUC", sub.get("auc")), ("AUC CI low", ci[0]), ("AUC CI high", ci[1]),
                        ("TPR@1%FPR", tpr(sub.get("tpr_at_1fpr"), 0.01, ok1)),
                        ("TPR@0.1%FPR", tpr(sub.get("tpr_at_01fpr"), 0.001, ok01)),
                    ):
                        put(p + name, "metric", value)
        e = a.get("extraction")
        if e:
            put(f"extraction {label}: generations", "count", e["n_generations"])
            put(f"extraction {label}: extracted (unique)", "count", e["extracted_total"])
            put(f"extraction {label}: extraction rate", "metric", e["extraction_rate"])
            for prompt, n in (e.get("extracted_unique") or {}).items():
                put(f"extraction {label} / {prompt}: extracted (unique)", "count", n)
        mem = a.get("memorization")
        if mem:
            for s in mem.get("scores") or []:
                put(f"memorization {label} / {s['prompt']}: score", "metric", s["score"])
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[MetricDiff]:
    """Every metric of either run (A's order, then B-only ones), with both values."""
    fa, fb = flatten_metrics(a), flatten_metrics(b)
    names = list(fa) + [n for n in fb if n not in fa]
    return [
        MetricDiff(n, (fa.get(n) or fb.get(n))[0], fa[n][1] if n in fa else None, fb[n][1] if n in fb else None)
        for n in names
    ]


def _value(kind: str, v: Any) -> str:
    if isinstance(v, NotResolved):
        return not_resolved(v.fpr)
    if kind == "count":
        return fmt.count(v)
    if kind == "verdict":
        return v if v is not None else fmt.MISSING
    return fmt.signed(v) if kind == "delta" else fmt.num(v)


def compare_table(diffs: list[MetricDiff], a_name: str, b_name: str) -> Table:
    """The comparison as a report table: Metric | A | B | B − A."""
    rows = []
    for d in diffs:
        if d.kind == "verdict":
            change = fmt.MISSING if d.a is None or d.b is None else ("changed" if d.a != d.b else "same")
            rows.append([Cell(d.name, "key"), Cell(_value("verdict", d.a)), Cell(_value("verdict", d.b)), Cell(change)])
            continue
        delta = fmt.count_delta(d.diff) if d.kind == "count" else fmt.signed(d.diff)
        kinds = [NR_KIND if isinstance(v, NotResolved) else "num" for v in (d.a, d.b)]
        rows.append([Cell(d.name, "key"), Cell(_value(d.kind, d.a), kinds[0]), Cell(_value(d.kind, d.b), kinds[1]), Cell(delta, "num")])
    unresolved = any(isinstance(v, NotResolved) for d in diffs for v in (d.a, d.b))
    return Table(
        "compare",
        f"{a_name} (A) vs {b_name} (B)",
        ["Metric", "A", "B", "B − A"],
        rows,
        note="A metric missing from one run shows —. Differences are of the stored values, then rounded.",
        footnote=(
            f"{NOT_RESOLVED} = not resolvable, not a measurement: a TPR at an FPR below 1/n, the smallest non-zero FPR "
            "that run's n non-members resolve (1% needs ≥ 100 non-members, 0.1% ≥ 1000); it has no difference (—)."
            if unresolved else ""
        ),
    )


def compare_runs(
    run_a: str | Path, run_b: str | Path, out_dir: str | Path | None = None, *, console: Any = None
) -> Path | None:
    """Print the comparison of two saved runs as a console table and write it as ``compare.md``
    into ``out_dir`` (when given). Returns the Markdown path."""
    from s2l_plugin._io import atomic_write_text
    from s2l_plugin.report.console_report import _footnote, _rich_table
    from s2l_plugin.report.markdown_report import markdown_table
    from s2l_plugin.result import load_result_data

    a_name, b_name = Path(run_a).resolve().name, Path(run_b).resolve().name
    if a_name == b_name:
        a_name, b_name = str(run_a), str(run_b)
    table = compare_table(compare(load_result_data(run_a), load_result_data(run_b)), a_name, b_name)
    if console is None:
        from rich.console import Console

        console = Console() if Console().is_terminal else Console(width=200)
    console.print(_rich_table(table, console.width))
    _footnote(table, console)
    if out_dir is None:
        return None
    path = Path(out_dir) / COMPARE_FILE
    atomic_write_text(path, "\n".join([f"## s2l runs compared: {a_name} vs {b_name}", "", *markdown_table(table)]))
    console.print(f"comparison: {path}")
    return path
