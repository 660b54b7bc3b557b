"""What a report shows, decided once: the verdict and the tables, built from a saved result's JSON.

Every writer (HTML, Markdown, console) renders this view, so they show the same numbers with
the same rounding (:mod:`s2l_plugin.report.numbers`). Nothing here computes a metric: every
number in a cell is a value of ``result.json``, and a numeric cell records the JSON path it
shows as a JSON Pointer (``/comparisons/0/auc_before``), which the HTML keeps as a ``data-json`` attribute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from s2l_plugin.audit.metrics import nonmembers_needed, tpr_resolvable
from s2l_plugin.report import numbers as fmt

AMPLIFIED = "amplified"
REDUCED = "reduced"
NO_CHANGE = "no significant change"
NO_INTERVAL = "no interval"

# How many extraction matches a report lists per model (closest first); result.json has all.
MAX_MATCH_ROWS = 24


@dataclass
class Cell:
    """One table cell. ``kind``: "num" (a formatted JSON number), "key" (a row label from the JSON)
    or "text" (a string from the JSON, shown verbatim)."""

    text: str
    kind: str = "text"
    path: str = ""


@dataclass
class Table:
    id: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    note: str = ""
    # Said under the table in every format when a cell is a placeholder (:data:`NOT_RESOLVED`): the
    # smallest FPR the non-members resolve. Empty when every TPR in the table is a measurement.
    footnote: str = ""


@dataclass
class Verdict:
    headline: str
    level: str  # "amplified" | "not-established" | "signal" | "no-signal" | "empty"
    lines: list[str] = field(default_factory=list)
    # Said above the headline in every format: the member and non-member sets are distinguishable
    # without the model (result "shift"), so an AUC may be shift, not membership. Empty when not.
    alert: str = ""


@dataclass
class ReportView:
    title: str
    kind: str
    created: str
    schema_version: int
    verdict: Verdict
    tables: list[Table]
    config_json: str
    versions_json: str
    seeds_json: str
    warnings: list[str]

    def table(self, table_id: str) -> Table | None:
        return next((t for t in self.tables if t.id == table_id), None)


def _n(value: float | None, path: str) -> Cell:
    return Cell(fmt.num(value), "num", path)


def _d(value: float | None, path: str) -> Cell:
    return Cell(fmt.signed(value), "num", path)


def _c(value: int | None, path: str) -> Cell:
    return Cell(fmt.count(value), "num", path)


def _ci(ci: list[float] | None, path: str, *, sign: bool = False) -> Cell:
    return Cell(fmt.interval(ci, sign=sign), "num", path)


# -- TPR at an FPR the non-members cannot resolve ----------------------------------------------

#: What a TPR at an FPR below 1/n (n non-members) shows instead of its number: it is not a measurement.
NOT_RESOLVED = "n/r"
#: Cell kind of such a placeholder (its ``path`` still names the JSON number it stands for).
NR_KIND = "nr"
def not_resolved(fpr: float) -> str:
    """The placeholder of a TPR at ``fpr`` that the non-members cannot resolve."""
    return f"{NOT_RESOLVED} (needs ≥ {nonmembers_needed(fpr)} non-members)"


def _attack_n(t: dict[str, Any]) -> int | None:
    """The number of non-members behind an attack's ROC (1 / ``min_resolvable_fpr`` when stored)."""
    if t.get("min_resolvable_fpr"):
        return int(round(1.0 / t["min_resolvable_fpr"]))
    return len(t.get("nonmember_scores") or []) or None


def _comparison_n(data: dict[str, Any], c: dict[str, Any]) -> int | None:
    """The number of non-members behind a comparison: stored, else the audits' when they all agree."""
    if c.get("min_resolvable_fpr"):
        return int(round(1.0 / c["min_resolvable_fpr"]))
    ns = {(a.get("membership") or {}).get("n_nonmembers") for a in data.get("audits") or [] if a.get("membership")}
    return ns.pop() if len(ns) == 1 else None


def resolution_footnote(ns: set[int]) -> str:
    """The footnote under a table with :data:`NOT_RESOLVED` cells: the smallest FPR the null resolves."""
    sizes = sorted(n for n in ns if n)
    if not sizes:
        return ""
    said = "; ".join(f"with {n} non-members it is 1/{n} = {1.0 / n:.3g} ({100.0 / n:.3g}%)" for n in sizes)
    return (
        f"{NOT_RESOLVED} = not resolvable, not a measurement: the smallest non-zero FPR the non-members resolve is 1/n; "
        f"{said}. A TPR at a lower FPR (1% needs ≥ 100 non-members, 0.1% ≥ 1000) is shown as {NOT_RESOLVED}; "
        "result.json keeps its number, flagged tpr_at_1fpr_resolvable / tpr_at_01fpr_resolvable false."
    )


def _tpr(value: float | None, path: str, fpr: float, ok: bool) -> Cell:
    return _n(value, path) if ok or value is None else Cell(not_resolved(fpr), NR_KIND, path)


def _tpr_ci(ci: list[float] | None, path: str, fpr: float, ok: bool) -> Cell:
    return _ci(ci, path) if ok or not ci else Cell(not_resolved(fpr), NR_KIND, path)


def comparison_verdict(comparison: dict[str, Any]) -> str:
    """``amplified`` only when the paired ΔAUC 95% interval lies entirely above 0; ``reduced`` when
    entirely below; otherwise ``no significant change`` (``no interval`` when none was computed)."""
    ci = comparison.get("delta_auc_ci") or []
    if len(ci) != 2:
        return NO_INTERVAL
    if ci[0] > 0:
        return AMPLIFIED
    if ci[1] < 0:
        return REDUCED
    return NO_CHANGE


def moves_toward_chance(comparison: dict[str, Any]) -> bool:
    """True when the ΔAUC interval lies above zero but the attack ranked members *below* non-members
    before (AUC < 0.5) and ends no further from chance than it started (|AUC_after − 0.5| <
    |AUC_before − 0.5|, e.g. 0.30 → 0.40, or 0.07 → 0.66): the rise is mostly an inverted signal
    weakening, not leakage growing, so no report calls it amplified."""
    c = comparison
    before, after = c["auc_before"], c["auc_after"]
    return comparison_verdict(c) == AMPLIFIED and before < 0.5 and abs(after - 0.5) < abs(before - 0.5)


def _comparison_name(c: dict[str, Any]) -> str:
    return f"{c['method']} / {c['attack']} ({c.get('subset', 'all')})"


def _best_attacks(data: dict[str, Any]) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """``(audit index, audit, attack)`` of every fine-tuned (non-base) model's MIA attacks, strongest evidence
    first: by the lower end of the AUC interval, then the AUC."""
    found = [
        (ai, a, t)
        for ai, a in enumerate(data.get("audits") or [])
        if a["model"]["label"] != "base"
        for t in (a.get("membership") or {}).get("attacks") or []
    ]
    return sorted(found, key=lambda x: (-((x[2].get("auc_ci") or [x[2]["auc"]])[0]), -x[2]["auc"]))


def _shift_alert(data: dict[str, Any]) -> str:
    """The distribution-shift warning every report opens with, when the result's diagnostic found the
    member and non-member sets distinguishable without the model (``shift.distinguishable``)."""
    shift = data.get("shift") or {}
    if not shift.get("distinguishable"):
        return ""
    text = (
        f"Distribution shift: these members and non-members can be told apart without the model under audit "
        f"(pooled VAE-latent permutation test p = {shift['p_value']:.3g} < {shift['level']:g}, "
        f"{fmt.count(shift.get('n_members'))} vs {fmt.count(shift.get('n_nonmembers'))} images)."
    )
    if shift.get("classifier_auc") is not None:
        text += (
            f" A linear classifier on those latents alone separates them with AUC {fmt.num(shift['classifier_auc'])}: "
            "an attack AUC up to that much can be the shift, not membership."
        )
    best = _best_attacks(data)
    if best:
        _, a, t = best[0]
        text += f" The audited model's strongest attack: AUC {fmt.num(t['auc'])} ({a['model']['label']} / {t['attack']})"
        base_auc = (shift.get("base_auc") or {}).get(t["attack"])
        text += f"; its base, never trained on these members, {fmt.num(base_auc)}." if base_auc is not None else "."
    return text + " Use non-members from the members' distribution."


def _shift_line(data: dict[str, Any]) -> str:
    """One sentence of the diagnostic for an audit's report, distinguishable or not."""
    shift = data.get("shift") or {}
    if shift.get("p_value") is None:
        return ""
    said = "distinguishable" if shift.get("distinguishable") else "not distinguishable"
    line = (
        f"Shift check (the sets without the model): latent permutation test p = {shift['p_value']:.3g}, "
        f"{said} at p < {shift['level']:g}"
    )
    if shift.get("classifier_auc") is not None:
        line += f"; shift classifier AUC {fmt.num(shift['classifier_auc'])}"
    return line + "."


def _audit_verdict(data: dict[str, Any]) -> Verdict | None:
    """``s2l audit``'s headline: the checkpoint's membership evidence (its strongest attack's AUC and interval),
    its base's AUC on the same images and noise, and the ΔAUC the fine-tune adds. None when the result
    has no base and fine-tuned model both audited with MIA."""
    best = _best_attacks(data)
    audits = data.get("audits") or []
    base = next((a for a in audits if a["model"]["label"] == "base" and a.get("membership")), None)
    if not best or base is None:
        return None
    _, target, t = best[0]
    label = target["model"]["label"]
    base_att = next((x for x in base["membership"].get("attacks") or [] if x["attack"] == t["attack"]), None)
    comps = [c for c in data.get("comparisons") or [] if c["attack"] == t["attack"] and c.get("subset", "all") == "all"]
    comp = next((c for c in comps if c["method"] == label), comps[0] if comps else None)
    ci = t.get("auc_ci") or []
    evidence = len(ci) == 2 and ci[0] > 0.5
    numbers = f"AUC {fmt.num(t['auc'])} {fmt.interval(ci)} ({t['attack']})"
    if evidence:
        headline = f"Membership evidence: the checkpoint separates these members from non-members with {numbers}"
    else:
        headline = f"No membership evidence beyond chance: the checkpoint's strongest attack separates these members from non-members with {numbers}"
    if base_att is not None:
        headline += f"; its base: {fmt.num(base_att['auc'])} {fmt.interval(base_att.get('auc_ci'))}"
    if comp is not None:
        headline += f"; the fine-tune adds {fmt.signed(comp['delta_auc'])} {fmt.interval(comp.get('delta_auc_ci'), sign=True)}"
    headline += "."
    lines: list[str] = []
    n_attacks = len({x[2]["attack"] for x in best if x[1] is target})
    if n_attacks > 1:
        lines.append(
            f"The headline names the strongest of {n_attacks} attacks (highest lower end of its AUC 95% interval); "
            "picking the best of several flatters it a little. Every attack is in the membership table."
        )
    if comp is not None:
        verdict = comparison_verdict(comp)
        if verdict == AMPLIFIED:
            lines.append(f"The fine-tune raised the AUC over its base: the paired ΔAUC 95% interval lies above zero ({t['attack']}).")
        elif verdict == REDUCED:
            lines.append(f"The fine-tune lowered the AUC below its base's: the paired ΔAUC 95% interval lies below zero ({t['attack']}).")
        elif verdict == NO_CHANGE:
            lines.append(
                f"The fine-tune adds no separation its base lacks ({t['attack']}: the ΔAUC interval includes zero); what the "
                "base separates comes from pretraining or from a difference between the sets, not from the fine-tune."
            )
    shift_line = _shift_line(data)
    if shift_line:
        lines.append(shift_line)
    return Verdict(headline, "signal" if evidence else "no-signal", lines)


def query_line(data: dict[str, Any]) -> str:
    """``s2l audit --query``: the dataset-level test in one sentence, with its p-value (empty without --query)."""
    d = (data.get("query") or {}).get("dataset") or {}
    if d.get("p_value") is None:
        return ""
    q = data["query"]
    flagged = sum(1 for im in q.get("images") or [] if im["p_value"] < q["alpha"])
    said = "score above" if d["p_value"] < d["alpha"] else "do not score detectably above"
    return (
        f"Were these images used? The {fmt.count(d['n_query'])} query images as a set {said} the "
        f"{fmt.count(d['n_null'])} null images ({d['test']}, p = {d['p_value']:.3g}, {q['attack']}); "
        f"{fmt.count(flagged)} of them alone have p < {q['alpha']:g}. {d.get('statement', '')}"
    ).strip()


def _verdict(data: dict[str, Any]) -> Verdict:
    verdict = _headline_verdict(data)
    said = query_line(data)
    if said and verdict.level == "empty":  # --query without --members: the dataset test is the headline
        verdict = Verdict(said, "signal" if data["query"]["dataset"]["significant"] else "no-signal", verdict.lines)
    elif said:
        verdict.lines.insert(0, said)
    verdict.lines += _evidence_lines(data)
    verdict.alert = _shift_alert(data)
    return verdict


def _headline_verdict(data: dict[str, Any]) -> Verdict:
    """The headline and its lines: an audit's membership evidence (``s2l audit`` without ``--shake``), else
    S2L amplification when there are before/after comparisons, else the membership signal per model."""
    if data.get("kind") == "audit" and not (data.get("config") or {}).get("shake"):
        audit = _audit_verdict(data)
        if audit is not None:
            return audit
    comparisons = data.get("comparisons") or []
    lines: list[str] = []
    if comparisons:
        by: dict[str, list[str]] = {}
        toward_chance: list[str] = []
        for c in comparisons:
            verdict = comparison_verdict(c)
            if moves_toward_chance(c):
                toward_chance.append(_comparison_name(c))
                continue
            by.setdefault(verdict, []).append(_comparison_name(c))
        if by.get(AMPLIFIED):
            headline = "S2L amplified membership leakage: the ΔAUC 95% interval lies above zero for " + ", ".join(by[AMPLIFIED]) + "."
            level = "amplified"
            if len(comparisons) > 1:
                lines.append(
                    "Each before/after interval can lie above zero by chance alone (about one in twenty at its "
                    "level); with several comparisons, weigh an isolated one accordingly."
                )
        elif toward_chance:
            headline = (
                "S2L amplification not established: the only ΔAUC 95% intervals above zero are inverted attacks "
                "moving toward chance (" + ", ".join(toward_chance) + ")."
            )
            level = "not-established"
        else:
            headline = "S2L amplification not established: no ΔAUC 95% interval lies above zero."
            level = "not-established"
        if toward_chance:
            lines.append(
                "Interval above zero, but the attack scored members below chance before (AUC < 0.5) and ends no "
                "further from chance than it started, so the rise is a move toward chance, not amplification: " + ", ".join(toward_chance) + "."
            )
        if by.get(NO_CHANGE):
            lines.append("No significant change (interval includes zero) for " + ", ".join(by[NO_CHANGE]) + ".")
        if by.get(REDUCED):
            lines.append("Membership leakage fell (interval below zero) for " + ", ".join(by[REDUCED]) + ".")
        if by.get(NO_INTERVAL):
            lines.append("No ΔAUC interval was computed for " + ", ".join(by[NO_INTERVAL]) + ".")
        more, fewer, same = [], [], []
        for c in comparisons:
            before, after = c.get("extracted_before"), c.get("extracted_after")
            if before is None or after is None:
                continue
            name = c["method"]
            (more if after > before else fewer if after < before else same).append(name)
        if more:
            lines.append("More training images were extracted after fine-tuning for " + ", ".join(dict.fromkeys(more)) + ".")
        if fewer:
            lines.append("Fewer training images were extracted after fine-tuning for " + ", ".join(dict.fromkeys(fewer)) + ".")
        if same:
            lines.append("As many training images were extracted before as after fine-tuning for " + ", ".join(dict.fromkeys(same)) + ".")
    else:
        above, below = [], []
        for a in data.get("audits") or []:
            for att in (a.get("membership") or {}).get("attacks") or []:
                ci = att.get("auc_ci") or []
                name = f"{a['model']['label']} / {att['attack']}"
                if len(ci) == 2 and ci[0] > 0.5:
                    above.append(name)
                elif len(ci) == 2 and ci[1] < 0.5:
                    below.append(name)
        if above:
            headline = "Membership signal detected: the AUC 95% interval lies above chance for " + ", ".join(above) + "."
            level = "signal"
        elif any((a.get("membership") or {}).get("attacks") for a in data.get("audits") or []):
            headline = "No membership signal beyond chance: no AUC 95% interval lies above chance level."
            level = "no-signal"
        else:
            headline = "No membership inference was run."
            level = "empty"
        if below:
            lines.append("AUC interval below chance (scores point the wrong way) for " + ", ".join(below) + ".")
    return Verdict(headline, level, lines)


def _evidence_lines(data: dict[str, Any]) -> list[str]:
    """The verdict lines every headline shares: extraction and high-severity metadata findings."""
    lines: list[str] = []
    extracted = [a["model"]["label"] for a in data.get("audits") or [] if (a.get("extraction") or {}).get("extracted_total")]
    audited = [a for a in data.get("audits") or [] if a.get("extraction")]
    if extracted:
        lines.append("Training images were extracted from " + ", ".join(extracted) + ".")
    elif audited:
        lines.append("No training image was extracted from any audited model.")
    high = [a["model"]["label"] for a in data.get("audits") or [] if any(f.get("severity") == "high" for f in a.get("findings") or [])]
    if high:
        lines.append("Checkpoint metadata: high-severity findings in " + ", ".join(high) + ".")
    return lines


def _amplification(data: dict[str, Any]) -> Table | None:
    comparisons = data.get("comparisons") or []
    if not comparisons:
        return None
    rows = []
    unresolved: set[int] = set()
    for i, c in enumerate(comparisons):
        p = f"/comparisons/{i}/"
        n = _comparison_n(data, c)
        ok = tpr_resolvable(0.01, n, c.get("tpr_at_1fpr_resolvable"))
        if not ok:
            unresolved.add(n or 0)
        rows.append(
            [
                Cell(c["method"], "key"),
                Cell(c["attack"], "key"),
                Cell(c.get("subset", "all"), "key"),
                _n(c["auc_before"], p + "auc_before"),
                _n(c["auc_after"], p + "auc_after"),
                _d(c["delta_auc"], p + "delta_auc"),
                _ci(c.get("delta_auc_ci"), p + "delta_auc_ci", sign=True),
                _tpr(c["tpr_at_1fpr_before"], p + "tpr_at_1fpr_before", 0.01, ok),
                _tpr(c["tpr_at_1fpr_after"], p + "tpr_at_1fpr_after", 0.01, ok),
                _c(c.get("extracted_before"), p + "extracted_before"),
                _c(c.get("extracted_after"), p + "extracted_after"),
                _c(c.get("n_generations"), p + "n_generations"),
                Cell(comparison_verdict(c), "key"),
            ]
        )
    plain_audit = data.get("kind") == "audit" and not (data.get("config") or {}).get("shake")
    return Table(
        "amplification",
        "Checkpoint vs its base" if plain_audit else "S2L amplification",
        [
            "Method", "Attack", "Subset", "AUC before", "AUC after", "ΔAUC", "ΔAUC 95% CI",
            "TPR@1%FPR before", "TPR@1%FPR after", "Extracted before", "Extracted after", "Generations", "Verdict",
        ],
        rows,
        note="Before = the base model, after = fine-tuned, on the same images and noise draws; the interval is a paired bootstrap. "
        "Extracted = unique training images matched by a generation.",
        footnote=resolution_footnote(unresolved) if unresolved else "",
    )


def _membership(data: dict[str, Any]) -> Table | None:
    rows = []
    unresolved: set[int] = set()
    for ai, a in enumerate(data.get("audits") or []):
        m = a.get("membership")
        if not m:
            continue
        for ti, t in enumerate(m.get("attacks") or []):
            p = f"/audits/{ai}/membership/attacks/{ti}/"
            # The subsets score their members against the same non-members: the attack's resolution holds for them.
            n = _attack_n(t)
            ok1 = tpr_resolvable(0.01, n, t.get("tpr_at_1fpr_resolvable"))
            ok01 = tpr_resolvable(0.001, n, t.get("tpr_at_01fpr_resolvable"))
            if not (ok1 and ok01):
                unresolved.add(n or 0)
            rows.append(
                [
                    Cell(a["model"]["label"], "key"),
                    Cell(t["attack"], "key"),
                    Cell("all", "key"),
                    _n(t["auc"], p + "auc"),
                    _ci(t.get("auc_ci"), p + "auc_ci"),
                    _tpr(t["tpr_at_1fpr"], p + "tpr_at_1fpr", 0.01, ok1),
                    _tpr_ci(t.get("tpr_at_1fpr_ci"), p + "tpr_at_1fpr_ci", 0.01, ok1),
                    _tpr(t["tpr_at_01fpr"], p + "tpr_at_01fpr", 0.001, ok01),
                    _n(t["asr"], p + "asr"),
                    _n(t["advantage"], p + "advantage"),
                    _c(m["n_members"], f"/audits/{ai}/membership/n_members"),
                    _c(m["n_nonmembers"], f"/audits/{ai}/membership/n_nonmembers"),
                ]
            )
            for name, sub in (t.get("subsets") or {}).items():
                q = f"{p}subsets/{_escape(name)}/"
                indices = sub.get("member_indices")
                rows.append(
                    [
                        Cell(a["model"]["label"], "key"),
                        Cell(t["attack"], "key"),
                        Cell(name, "key"),
                        _n(sub.get("auc"), q + "auc"),
                        _ci(sub.get("auc_ci"), q + "auc_ci"),
                        _tpr(sub.get("tpr_at_1fpr"), q + "tpr_at_1fpr", 0.01, ok1),
                        _tpr_ci(sub.get("tpr_at_1fpr_ci"), q + "tpr_at_1fpr_ci", 0.01, ok1),
                        _tpr(sub.get("tpr_at_01fpr"), q + "tpr_at_01fpr", 0.001, ok01),
                        _n(sub.get("asr"), q + "asr"),
                        _n(sub.get("advantage"), q + "advantage"),
                        # the subset's size: the length of its stored member_indices
                        _c(len(indices) if indices is not None else None, q + "member_indices"),
                        _c(m["n_nonmembers"], f"/audits/{ai}/membership/n_nonmembers"),
                    ]
                )
    if not rows:
        return None
    return Table(
        "membership",
        "Membership inference",
        ["Model", "Attack", "Subset", "AUC", "AUC 95% CI", "TPR@1%FPR", "TPR@1%FPR 95% CI", "TPR@0.1%FPR", "ASR", "Advantage", "Members", "Non-members"],
        rows,
        note="Scores point one way: higher = more likely a member. ASR = best balanced accuracy over thresholds; advantage = max |TPR − FPR|. "
        "A subset row scores those members against all non-members.",
        footnote=resolution_footnote(unresolved) if unresolved else "",
    )


def _extraction(data: dict[str, Any]) -> Table | None:
    rows = []
    for ai, a in enumerate(data.get("audits") or []):
        e = a.get("extraction")
        if not e:
            continue
        p = f"/audits/{ai}/extraction/"
        rows.append(
            [
                Cell(a["model"]["label"], "key"),
                _c(e["n_generations"], p + "n_generations"),
                _c(e["n_per_prompt"], p + "n_per_prompt"),
                _n(e["delta"], p + "delta"),
                _c(e["extracted_total"], p + "extracted_total"),
                _n(e["extraction_rate"], p + "extraction_rate"),
                _c(e.get("n_references"), p + "n_references"),
            ]
        )
    if not rows:
        return None
    return Table(
        "extraction",
        "Extraction",
        ["Model", "Generations", "Per prompt", "δ", "Extracted (unique)", "Extraction rate", "References"],
        rows,
        note="A generation counts as extracted when its normalized ℓ2 distance to a training image is below δ.",
    )


def _extraction_prompts(data: dict[str, Any]) -> Table | None:
    rows = []
    for ai, a in enumerate(data.get("audits") or []):
        e = a.get("extraction")
        if not e:
            continue
        for prompt, n in (e.get("extracted_unique") or {}).items():
            rows.append([Cell(a["model"]["label"], "key"), Cell(prompt, "key"), _c(n, f"/audits/{ai}/extraction/extracted_unique/{_escape(prompt)}")])
    if not rows:
        return None
    return Table("extraction-prompts", "Extracted per prompt", ["Model", "Prompt", "Extracted (unique)"], rows)


def _matches(data: dict[str, Any]) -> Table | None:
    rows = []
    for ai, a in enumerate(data.get("audits") or []):
        e = a.get("extraction")
        if not e:
            continue
        ordered = sorted(enumerate(e.get("matches") or []), key=lambda im: (not im[1]["extracted"], im[1]["distance_l2"]))
        for mi, m in ordered[:MAX_MATCH_ROWS]:
            p = f"/audits/{ai}/extraction/matches/{mi}/"
            rows.append(
                [
                    Cell(a["model"]["label"], "key"),
                    Cell(m["prompt"], "key"),
                    _c(m["generation_index"], p + "generation_index"),
                    _c(m["seed"], p + "seed"),
                    Cell(m.get("reference_id") or fmt.MISSING, "text"),
                    _n(m["distance_l2"], p + "distance_l2"),
                    _n(m["distance_tiled"], p + "distance_tiled"),
                    _c(m.get("clique_size", 1), p + "clique_size"),
                    Cell("yes" if m["extracted"] else "no", "key"),
                ]
            )
    if not rows:
        return None
    return Table(
        "matches",
        "Closest extraction matches",
        ["Model", "Prompt", "Generation", "Seed", "Reference", "ℓ2 distance", "Tiled distance", "Clique", "Extracted"],
        rows,
        note="Extracted matches first, then by distance; result.json lists every match.",
    )


def _memorization(data: dict[str, Any]) -> Table | None:
    rows = []
    for ai, a in enumerate(data.get("audits") or []):
        mem = a.get("memorization")
        if not mem:
            continue
        for si, s in enumerate(mem.get("scores") or []):
            rows.append(
                [
                    Cell(a["model"]["label"], "key"),
                    Cell(s["prompt"], "key"),
                    _n(s["score"], f"/audits/{ai}/memorization/scores/{si}/score"),
                    _c(mem["steps"], f"/audits/{ai}/memorization/steps"),
                    _c(mem["n_generations"], f"/audits/{ai}/memorization/n_generations"),
                ]
            )
    if not rows:
        return None
    return Table(
        "memorization",
        "Memorization score",
        ["Model", "Prompt", "Score", "Steps", "Generations"],
        rows,
        note="Wen et al.'s text-conditional noise magnitude; higher = more memorized. Needs no training data.",
    )


def _query(data: dict[str, Any]) -> Table | None:
    """``s2l audit --query``: each query image's score and p-value against the null."""
    q = data.get("query")
    if not q:
        return None
    rows = [
        [Cell(im["id"], "text"), _n(im["score"], f"/query/images/{i}/score"),
         Cell(f"{im['p_value']:.3g}", "num", f"/query/images/{i}/p_value"),
         Cell("yes" if im["p_value"] < q["alpha"] else "no", "text")]
        for i, im in enumerate(q.get("images") or [])
    ]
    return Table(
        "query", f"Query images ({q['attack']})", ["Image", "Score", "p-value", f"p < {q['alpha']:g}"], rows,
        note=f"{q['statistic']}; {len(q.get('null_scores') or [])} null images, smallest possible p {q['min_p_value']:.3g}. "
        "Higher score = more likely a member; each p-value is calibrated against the null, not corrected for the number of images.",
    )


def _query_dataset(data: dict[str, Any]) -> Table | None:
    """``s2l audit --query``: the dataset-level test of the query set against the null."""
    d = (data.get("query") or {}).get("dataset")
    if not d:
        return None
    row = [Cell(d["test"], "text"), _c(d["n_query"], "/query/dataset/n_query"), _c(d["n_null"], "/query/dataset/n_null"),
           _n(d["auc"], "/query/dataset/auc"), Cell(f"{d['p_value']:.3g}", "num", "/query/dataset/p_value")]
    return Table("query-dataset", "Were these images used? (dataset-level test)",
                 ["Test", "Query images", "Null images", "AUC (U / n·m)", "p-value"], [row], note=d.get("statement", ""))


def _findings(data: dict[str, Any]) -> Table | None:
    rows = []
    for a in data.get("audits") or []:
        for f in a.get("findings") or []:
            rows.append(
                [Cell(a["model"]["label"], "key"), Cell(f["severity"], "key"), Cell(f["key"], "text"), Cell(f["message"], "text"), Cell(f.get("value", ""), "text")]
            )
    if not rows:
        return None
    return Table("findings", "Metadata findings", ["Model", "Severity", "Key", "Message", "Value"], rows)


def _models(data: dict[str, Any]) -> Table | None:
    rows = [
        [
            Cell(a["model"]["label"], "key"),
            Cell(a["model"].get("method") or fmt.MISSING, "text"),
            Cell(a["model"].get("path") or fmt.MISSING, "text"),
            Cell(a["model"].get("sha256") or fmt.MISSING, "text"),
        ]
        for a in data.get("audits") or []
    ]
    if not rows:
        return None
    return Table("models", "Models", ["Model", "Method", "Path", "SHA-256"], rows)


def build_view(data: dict[str, Any]) -> ReportView:
    """The report of a saved result (the dict of ``result.json``), ready for any writer."""
    builders = (_amplification, _membership, _query_dataset, _query, _extraction, _extraction_prompts, _matches, _memorization, _findings, _models)
    tables = [t for t in (b(data) for b in builders) if t is not None]
    kind = data.get("kind", "run")
    return ReportView(
        title=f"s2l {kind} report",
        kind=kind,
        created=data.get("created", ""),
        schema_version=data.get("schema_version"),
        verdict=_verdict(data),
        tables=tables,
        config_json=json.dumps(data.get("config") or {}, indent=2, sort_keys=True),
        versions_json=json.dumps(data.get("versions") or {}, indent=2, sort_keys=True),
        seeds_json=json.dumps(data.get("seeds") or {}, indent=2, sort_keys=True),
        warnings=list(data.get("warnings") or [])
        + [w for a in data.get("audits") or [] for w in ((a.get("membership") or {}).get("warnings") or [])],
    )


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def json_path(data: Any, pointer: str) -> Any:
    """The value at a JSON Pointer (RFC 6901) such as ``/comparisons/0/auc_before`` (a :class:`Cell`'s path)."""
    value = data
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


@dataclass
class FigureSpec:
    """A plot of stored values: ``kind`` "roc" (one per attack and axes, a curve per model) or "hist"
    (score histogram of one model and attack)."""

    id: str
    kind: str
    title: str
    attack: str
    axes: str = ""  # "linear" | "loglog" for ROC
    curves: list[tuple[str, list[float], list[float], float]] = field(default_factory=list)
    member_scores: list[float] = field(default_factory=list)
    nonmember_scores: list[float] = field(default_factory=list)
    floor: float | None = None  # log-log axes: where zero rates are drawn

    def png(self) -> bytes:
        """The figure as PNG bytes (cached by content: the HTML and Markdown writers draw the same ROCs)."""
        import hashlib

        from s2l_plugin.report import plots

        fields = [self.kind, self.title, self.axes, self.curves, self.member_scores, self.nonmember_scores, self.floor]
        key = hashlib.sha256(json.dumps(fields).encode()).hexdigest()
        if key not in _PNG_CACHE:
            if self.kind == "roc":
                data = plots.roc_png(self.curves, loglog=self.axes == "loglog", title=self.title, floor=self.floor)
            else:
                data = plots.score_hist_png(self.member_scores, self.nonmember_scores, title=self.title)
            if len(_PNG_CACHE) >= 64:
                _PNG_CACHE.pop(next(iter(_PNG_CACHE)))
            _PNG_CACHE[key] = data
        return _PNG_CACHE[key]


_PNG_CACHE: dict[str, bytes] = {}


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def figure_specs(data: dict[str, Any]) -> list[FigureSpec]:
    """ROC figures (linear and log-log per attack, every audited model as a curve), then score histograms."""
    by_attack: dict[str, list[tuple[str, list[float], list[float], float]]] = {}
    sizes: dict[str, int] = {}
    hists: list[FigureSpec] = []
    for a in data.get("audits") or []:
        label = a["model"]["label"]
        for t in (a.get("membership") or {}).get("attacks") or []:
            by_attack.setdefault(t["attack"], []).append((label, t["roc_fpr"], t["roc_tpr"], t["auc"]))
            n = max(len(t["member_scores"]), len(t["nonmember_scores"]))
            sizes[t["attack"]] = max(sizes.get(t["attack"], 0), n)
            hists.append(
                FigureSpec(
                    f"hist-{_slug(label)}-{_slug(t['attack'])}", "hist", f"{t['attack']} scores, {label}", t["attack"],
                    member_scores=t["member_scores"], nonmember_scores=t["nonmember_scores"],
                )
            )
    rocs = [
        FigureSpec(
            f"roc-{_slug(attack)}-{axes}", "roc", f"ROC, {attack}", attack, axes, curves,
            floor=0.5 / sizes[attack] if sizes.get(attack) else None,  # half the finest rate the data resolves
        )
        for attack, curves in by_attack.items()
        for axes in ("linear", "loglog")
    ]
    return rocs + hists


def grid_specs(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(model label, grid PNG path relative to the result folder) of every extraction that saved a grid."""
    return [
        (a["model"]["label"], a["extraction"]["grid_png"])
        for a in data.get("audits") or []
        if a.get("extraction") and a["extraction"].get("grid_png")
    ]
