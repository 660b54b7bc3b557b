"""The privacy gate: ``--fail-on EXPR`` — fail the command when the audit finds leakage beyond a bound.

One module does all of it: :func:`parse` (before any work starts; a bad expression is a
ConfigError, one line, exit 2), :func:`evaluate` (a saved :class:`~s2l_plugin.result.RunResult`
against the conditions), :func:`write_verdict` (``verdict.json`` beside ``result.json``) and
:func:`apply` (what :func:`s2l_plugin.flow.publish` calls: evaluate, write, and raise
:class:`GateFailed` — exit code :data:`GATE_EXIT_CODE` — after the reports are written).

Grammar (spaces are ignored)::

    EXPR      = CONDITION { "," CONDITION }          any condition that holds trips the gate
    CONDITION = SELECTOR OP VALUE
    SELECTOR  = [ATTACK "."] [SUBSET "."] METRIC ["." BOUND]
    OP        = ">" | ">=" | "<" | "<="
    BOUND     = "lower" | "upper"                    the ends of the metric's 95% interval
    VALUE     = a number; for scan.severity one of none, info, low, medium, high

``ATTACK`` (``loss``, ``secmi``, ``pia``, ``pian``, ``reference`` or a plugin's; ``*`` or
left out = every attack) and ``SUBSET`` (``all`` when left out; ``duplicated``,
``non-duplicated`` or another member group) only go with the membership metrics and
``delta_auc``. With one prefix, ``all``, ``duplicated`` and ``non-duplicated`` are subsets and
anything else is an attack; another group is named with both, ``*.GROUP.auc``.

A condition applies to every audited model that is not the base (the fine-tuned model; each
method of ``s2l run``; the shaken model of ``s2l audit --shake`` too), and ``delta_auc`` to every
before/after comparison. It trips when any of them meets it. A metric the audit did not measure
(no member/non-member sets, extraction off, an attack not run, ``dataset_p`` without ``--query``) is reported
``not-measured`` and does not trip the gate; so is a TPR at an FPR below 1/n, the smallest FPR the
n non-members resolve (``tpr_at_1fpr`` with fewer than 100 non-members, ``tpr_at_01fpr`` with fewer
than 1000): it is not a measurement, so it neither passes nor fails.

The trained artifact is never read, moved or written here: the gate reads the result only.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_plugin.errors import ConfigError, S2LError

#: The exit code of a command whose gate tripped (1 is a crash, 2 a usage or input error).
GATE_EXIT_CODE = 3
VERDICT_FILE = "verdict.json"
VERDICT_SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "verdict.schema.json"

#: metric -> (kind, has a 95% interval, what it is)
METRICS: dict[str, tuple[str, bool, str]] = {
    "auc": ("membership", True, "membership-inference ROC AUC of the attack"),
    "tpr_at_1fpr": ("membership", True, "true-positive rate at 1% false positives"),
    "tpr_at_01fpr": ("membership", False, "true-positive rate at 0.1% false positives"),
    "asr": ("membership", False, "attack success rate (best balanced accuracy)"),
    "advantage": ("membership", False, "membership advantage, max |TPR - FPR|"),
    "delta_auc": ("comparison", True, "AUC after fine-tuning minus before (paired)"),
    "extracted": ("extraction", False, "unique training images extracted"),
    "extraction_rate": ("extraction", False, "extracted generations / generations"),
    "memorization": ("memorization", False, "highest memorization score over the audit prompts"),
    "scan.severity": ("scan", False, "worst metadata finding (none < info < low < medium < high)"),
    "scan.findings": ("scan", False, "number of metadata findings"),
    "dataset_p": ("query", False, "p-value of the dataset-level test of s2l audit --query (query images vs the null)"),
}
SEVERITIES = ("none", "info", "low", "medium", "high")
OPS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}
BOUNDS = ("lower", "upper")
#: subset names a lone prefix is read as (anything else is an attack)
KNOWN_SUBSETS = ("all", "duplicated", "non-duplicated")
ANY = "*"
_CONDITION_RE = re.compile(r"^([A-Za-z0-9_.*\-]+)(>=|<=|>|<)(.+)$")
_NAME_RE = re.compile(r"^(\*|[A-Za-z0-9_\-]+)$")
EXPECTED = ("conditions like auc>0.6, loss.auc.lower>0.55, duplicated.auc>0.8, delta_auc.lower>0, extracted>0, "
            "scan.severity>=high, joined by commas (docs/cli.md#the-privacy-gate---fail-on)")


@dataclass(frozen=True)
class Condition:
    """One parsed condition: it trips when the metric of a target model ``op`` the threshold."""

    text: str  # as normalised: no spaces
    metric: str
    op: str
    threshold: float | str  # a number, or a severity for scan.severity
    attack: str | None = None  # None: not an attack metric; "*": every attack
    subset: str | None = None  # None: not an attack metric
    bound: str = "value"  # "value" | "lower" | "upper"


@dataclass
class Measurement:
    """One measured value a condition was checked against."""

    model: str  # the audited model's label (a comparison's method for delta_auc)
    value: float | str
    compared: float | str  # what was compared with the threshold: the value or one end of its interval
    tripped: bool
    attack: str | None = None
    subset: str | None = None
    interval: list[float] | None = None  # 95%


@dataclass
class ConditionVerdict:
    """A condition's outcome: ``fail`` (tripped), ``pass``, or ``not-measured``; the worst measurement first."""

    condition: str
    metric: str
    op: str
    threshold: float | str
    status: str  # "pass" | "fail" | "not-measured"
    # model, attack, subset, value, interval: the worst measurement's (the one furthest past, or closest
    # to, the bound); attack and subset are the condition's ("*": any attack) when nothing was measured
    attack: str | None = None
    subset: str | None = None
    bound: str = "value"
    model: str | None = None
    value: float | str | None = None
    interval: list[float] | None = None
    measurements: list[Measurement] = field(default_factory=list)
    note: str = ""


@dataclass
class Verdict:
    """The privacy gate's verdict on one result (``verdict.json``, beside ``result.json``)."""

    verdict: str  # "pass" | "fail"
    fail_on: str
    failed: list[str]
    not_measured: list[str]
    conditions: list[ConditionVerdict]
    exit_code: int  # 0 when it passes, GATE_EXIT_CODE when it fails
    result: str = "result.json"  # relative to this file
    result_created: str = ""
    created: str = ""
    schema_version: int = VERDICT_SCHEMA_VERSION


class GateFailed(S2LError):
    """The gate tripped: the result and ``verdict.json`` are written; the command exits with :data:`GATE_EXIT_CODE`."""

    exit_code = GATE_EXIT_CODE

    def __init__(self, verdict: Verdict, verdict_path: Path | None, result_path: Path | None) -> None:
        self.verdict, self.verdict_path, self.result_path = verdict, verdict_path, result_path
        where = f"; verdict: {verdict_path}" if verdict_path is not None else ""
        super().__init__(f"privacy gate failed on {', '.join(verdict.failed)}{where}")


# -- parsing ---------------------------------------------------------------------------------------


def _bad(source: str, expr: str, part: str, why: str) -> ConfigError:
    return ConfigError(f"{source} {expr!r}: {part!r} {why}; expected {EXPECTED}")


def _selector(name: str, source: str, expr: str, part: str) -> tuple[str, str | None, str | None, str]:
    """(metric, attack, subset, bound) of a SELECTOR."""
    segs = name.split(".")
    if segs[0] == "scan":
        metric = ".".join(segs)
        if metric not in METRICS:
            raise _bad(source, expr, part, "names no scan metric (scan.severity, scan.findings)")
        return metric, None, None, "value"
    bound = "value"
    if len(segs) > 1 and segs[-1] in BOUNDS:
        bound = segs.pop()
    metric, prefix = segs[-1], segs[:-1]
    if metric not in METRICS:
        raise _bad(source, expr, part, f"names no known metric ({', '.join(METRICS)})")
    kind, has_interval, _ = METRICS[metric]
    if bound != "value" and not has_interval:
        with_ci = ", ".join(m for m, (_, ci, _) in METRICS.items() if ci)
        raise _bad(source, expr, part, f"asks for the interval's {bound} bound, but {metric} has no interval (only {with_ci} do)")
    if kind not in ("membership", "comparison"):
        if prefix:
            raise _bad(source, expr, part, f"gives {'.'.join(prefix)!r} before {metric}, which has no attack or subset")
        return metric, None, None, bound
    if len(prefix) > 2 or not all(_NAME_RE.match(p) for p in prefix):
        raise _bad(source, expr, part, "is not [ATTACK.][SUBSET.]METRIC[.lower|.upper]")
    if len(prefix) == 2:
        attack, subset = prefix
    elif len(prefix) == 1:
        attack, subset = (ANY, prefix[0]) if prefix[0] in KNOWN_SUBSETS else (prefix[0], "all")
    else:
        attack, subset = ANY, "all"
    if subset == ANY:
        raise _bad(source, expr, part, "uses * for a subset; name one (all, duplicated, non-duplicated, or a member group)")
    return metric, attack, subset, bound


def parse(expr: str, *, source: str = "--fail-on") -> list[Condition]:
    """The conditions of ``expr``; a ConfigError naming ``source``, the expression and what was expected
    when it is not valid. Reads nothing and loads nothing: call it before any work starts."""
    if not isinstance(expr, str) or not expr.strip():
        raise ConfigError(f"{source} {expr!r} is empty; expected {EXPECTED}")
    conditions = []
    for raw in expr.split(","):
        part = "".join(raw.split())
        if not part:
            raise ConfigError(f"{source} {expr!r} has an empty condition (two commas, or one at an end); expected {EXPECTED}")
        m = _CONDITION_RE.match(part)
        if m is None:
            raise _bad(source, expr, part, "is not SELECTOR OP VALUE with OP one of >, >=, <, <=")
        name, op, raw_value = m.groups()
        metric, attack, subset, bound = _selector(name, source, expr, part)
        threshold: float | str
        if metric == "scan.severity":
            if raw_value not in SEVERITIES:
                raise _bad(source, expr, part, f"compares a severity with {raw_value!r}, not one of {', '.join(SEVERITIES)}")
            threshold = raw_value
        else:
            try:
                threshold = float(raw_value)
            except ValueError:
                raise _bad(source, expr, part, f"compares with {raw_value!r}, which is not a number") from None
            if not math.isfinite(threshold):
                raise _bad(source, expr, part, f"compares with {raw_value!r}; expected a finite number")
        conditions.append(Condition(part, metric, op, threshold, attack, subset, bound))
    return conditions


# -- evaluation --------------------------------------------------------------------------------------


def is_base(label: str) -> bool:
    """The base model's audit (``base``, or ``base/<domain>`` in a several-domain run): never gated."""
    return label == "base" or label.startswith("base/")


def _membership_values(att: Any, subset: str, metric: str) -> tuple[float, list[float] | None] | None:
    if subset == "all":
        row = {"auc": att.auc, "auc_ci": att.auc_ci, "tpr_at_1fpr": att.tpr_at_1fpr, "tpr_at_1fpr_ci": att.tpr_at_1fpr_ci,
               "tpr_at_01fpr": att.tpr_at_01fpr, "asr": att.asr, "advantage": att.advantage}
    else:
        row = att.subsets.get(subset)
    if row is None or row.get(metric) is None:
        return None
    return float(row[metric]), row.get(f"{metric}_ci")


def _unresolvable(att: Any, metric: str) -> bool:
    """Whether ``att``'s ``metric`` is a TPR at an FPR below 1/n, the smallest FPR the attack's n
    non-members resolve (every subset shares them): not a measurement."""
    from s2l_plugin.audit.metrics import TPR_FPR, tpr_resolvable

    fpr = TPR_FPR.get(metric)
    return fpr is not None and not tpr_resolvable(fpr, len(att.nonmember_scores), getattr(att, f"{metric}_resolvable", None))


def _unresolvable_note(metric: str, unresolved: list[tuple[str, int]]) -> str:
    """Why a TPR condition is not measured: the FPR, the non-members it needs, the ones each model had."""
    from s2l_plugin.audit.metrics import TPR_FPR

    fpr = TPR_FPR[metric]
    sizes = sorted({n for _, n in unresolved})
    had = "; ".join(f"{n} (smallest resolvable FPR 1/{n} = {1.0 / n:.3g})" for n in sizes if n)
    who = ", ".join(dict.fromkeys(w for w, _ in unresolved))
    return (f"TPR at {fpr * 100:g}% FPR is not resolvable: it needs ≥ {round(1.0 / fpr)} non-members, the audit has "
            f"{had} ({who})")


def _raw_measurements(
    cond: Condition, result: Any, unresolved: list[tuple[str, int]] | None = None
) -> list[tuple[str, str | None, str | None, float | str, list[float] | None]]:
    """(model, attack, subset, value, interval) for every target model (or comparison) ``cond`` applies to.
    A TPR at an FPR the non-members cannot resolve is left out, its reason appended to ``unresolved``."""
    kind = METRICS[cond.metric][0]
    out: list[tuple[str, str | None, str | None, float | str, list[float] | None]] = []
    if kind == "query":
        query = getattr(result, "query", None)
        p = (query.dataset or {}).get("p_value") if query is not None else None
        if p is not None:
            out.append(("query", query.attack, None, float(p), None))
        return out
    if kind == "comparison":
        for c in result.comparisons:
            if cond.attack in (ANY, c.attack) and c.subset == cond.subset:
                out.append((c.method, c.attack, c.subset, float(c.delta_auc), list(c.delta_auc_ci)))
        return out
    for audit in result.audits:
        label = audit.model.label
        if is_base(label):
            continue
        if kind == "membership" and audit.membership is not None:
            for att in audit.membership.attacks:
                if cond.attack in (ANY, att.attack):
                    if _unresolvable(att, cond.metric):
                        if unresolved is not None and _membership_values(att, cond.subset, cond.metric) is not None:
                            unresolved.append((f"{label} / {att.attack}", len(att.nonmember_scores)))
                        continue
                    got = _membership_values(att, cond.subset, cond.metric)
                    if got is not None:
                        out.append((label, att.attack, cond.subset, got[0], list(got[1]) if got[1] is not None else None))
        elif kind == "extraction" and audit.extraction is not None:
            ex = audit.extraction
            out.append((label, None, None, float(ex.extracted_total if cond.metric == "extracted" else ex.extraction_rate), None))
        elif kind == "memorization" and audit.memorization is not None and audit.memorization.scores:
            out.append((label, None, None, max(float(s.score) for s in audit.memorization.scores), None))
        elif cond.metric == "scan.severity":
            worst = max((SEVERITIES.index(f.severity) for f in audit.findings if f.severity in SEVERITIES), default=0)
            out.append((label, None, None, SEVERITIES[worst], None))
        elif cond.metric == "scan.findings":
            out.append((label, None, None, float(len(audit.findings)), None))
    return out


def _rank(value: float | str) -> float:
    return float(SEVERITIES.index(value)) if isinstance(value, str) else float(value)


def check(cond: Condition, result: Any) -> ConditionVerdict:
    """``cond`` on ``result``'s target models: fail when any measurement meets it."""
    out = ConditionVerdict(cond.text, cond.metric, cond.op, cond.threshold, "not-measured", cond.attack, cond.subset, cond.bound)
    threshold = _rank(cond.threshold)
    unresolved: list[tuple[str, int]] = []
    for model, attack, subset, value, interval in _raw_measurements(cond, result, unresolved):
        if cond.bound == "value":
            compared: float | str = value
        elif interval is not None and len(interval) == 2:
            compared = float(interval[BOUNDS.index(cond.bound)])
        else:
            continue
        if not isinstance(compared, str) and not math.isfinite(compared):
            continue
        tripped = bool(OPS[cond.op](_rank(compared), threshold))
        out.measurements.append(Measurement(model, value, compared, tripped, attack, subset, interval))
    if not out.measurements:
        if unresolved:  # never pass/fail on a TPR the null cannot resolve
            out.note = "not measured: " + _unresolvable_note(cond.metric, unresolved)
            return out
        out.note = ("not measured: it is the dataset-level test of s2l audit --query IMAGES --nonmembers NULL"
                    if METRICS[cond.metric][0] == "query" else
                    "this version of s2l-plugin does not measure it" if METRICS[cond.metric][0] == "unmeasured"
                    else "not measured: the audit has no such value for a fine-tuned model")
        return out
    if unresolved:
        out.note = "also not measured: " + _unresolvable_note(cond.metric, unresolved)
    # The worst: the furthest past the bound in the direction that trips it.
    sign = 1.0 if cond.op.startswith(">") else -1.0
    out.measurements.sort(key=lambda m: -sign * _rank(m.compared))
    worst = out.measurements[0]
    out.status = "fail" if worst.tripped else "pass"
    out.model, out.attack, out.subset = worst.model, worst.attack, worst.subset
    out.value, out.interval = worst.value, worst.interval
    return out


def evaluate(conditions: list[Condition] | str, result: Any, *, source: str = "--fail-on") -> Verdict:
    """The verdict of ``conditions`` (or an expression) on ``result`` (a RunResult)."""
    if isinstance(conditions, str):
        expr, conditions = conditions, parse(conditions, source=source)
    else:
        expr = ",".join(c.text for c in conditions)
    checked = [check(c, result) for c in conditions]
    failed = [c.condition for c in checked if c.status == "fail"]
    return Verdict(
        verdict="fail" if failed else "pass",
        fail_on=expr,
        failed=failed,
        not_measured=[c.condition for c in checked if c.status == "not-measured"],
        conditions=checked,
        exit_code=GATE_EXIT_CODE if failed else 0,
        result_created=getattr(result, "created", "") or "",
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


# -- verdict.json --------------------------------------------------------------------------------------


def write_verdict(verdict: Verdict, out_dir: str | Path) -> Path:
    """Write ``out_dir/verdict.json`` (whole, then renamed); returns its path."""
    from s2l_plugin._io import atomic_write_text
    from s2l_plugin.result import to_dict

    path = Path(out_dir) / VERDICT_FILE
    atomic_write_text(path, json.dumps(to_dict(verdict), indent=2, allow_nan=False) + "\n")
    return path


def load_verdict(folder: str | Path) -> dict[str, Any] | None:
    """The ``verdict.json`` in ``folder`` as a dict, or None when there is none (or it is unreadable)."""
    path = Path(folder) / VERDICT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("verdict") in ("pass", "fail") else None


def discard_verdict(out_dir: str | Path) -> None:
    """Remove a ``verdict.json`` left in ``out_dir`` by an earlier result (it would describe another result)."""
    (Path(out_dir) / VERDICT_FILE).unlink(missing_ok=True)


def _number(value: Any) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def headline(verdict: dict[str, Any]) -> str:
    """The console's first line: the failed conditions with the measured value (and interval), or that it held."""
    conds = verdict.get("conditions", [])
    if verdict.get("verdict") == "fail":
        parts = []
        for c in conds:
            if c.get("status") != "fail":
                continue
            measured = _number(c.get("value"))
            if c.get("interval"):
                measured += f" [{_number(c['interval'][0])}, {_number(c['interval'][1])}]"
            who = " ".join(x for x in (c.get("model"), c.get("attack")) if x)
            parts.append(f"{c['condition']} ({who}: {measured})")
        return f"Privacy gate FAILED (exit {GATE_EXIT_CODE}): " + "; ".join(parts) + _unresolved_suffix(conds)
    line = f"Privacy gate passed: {verdict.get('fail_on', '')}"
    if verdict.get("not_measured"):
        line += f" (not measured: {', '.join(verdict['not_measured'])})"
    return line + _unresolved_suffix(conds)


def _unresolved_suffix(conds: list[dict[str, Any]]) -> str:
    """The reason of each condition on a TPR the non-members cannot resolve (not measured, never pass/fail)."""
    notes = [f"{c['condition']}: {c['note'].removeprefix('not measured: ')}" for c in conds
             if c.get("status") == "not-measured" and "is not resolvable" in (c.get("note") or "")]
    return f". Not measured, {'; '.join(notes)}." if notes else ""


def apply(expr: str | None, result: Any, out_dir: str | Path) -> Verdict | None:
    """What :func:`s2l_plugin.flow.publish` does with ``fail_on``: without it, drop a stale verdict.json;
    with it, evaluate and write verdict.json. Returns the verdict (None without a gate)."""
    if not expr:
        discard_verdict(out_dir)
        return None
    verdict = evaluate(expr, result)
    write_verdict(verdict, out_dir)
    return verdict


def enforce(verdict: Verdict | None, out_dir: str | Path, result_path: Path | None) -> None:
    """Raise :class:`GateFailed` when ``verdict`` failed (after the reports are written)."""
    if verdict is not None and verdict.verdict == "fail":
        raise GateFailed(verdict, Path(out_dir) / VERDICT_FILE, result_path)


def parse_scan(expr: str, *, source: str = "--fail-on") -> list[Condition]:
    """:func:`parse` for ``s2l scan``: only the metadata metrics (``scan.severity``, ``scan.findings``)
    apply to a scan; any other is a ConfigError naming it."""
    conditions = parse(expr, source=source)
    for c in conditions:
        if METRICS[c.metric][0] != "scan":
            raise _bad(source, expr, c.text, "names a metric s2l scan does not measure; expected scan.severity or scan.findings")
    return conditions


def evaluate_scan(conditions: list[Condition], scanned: Any) -> Verdict:
    """The verdict of scan conditions on the checkpoints of ``scanned`` (``(label, findings)`` pairs): each
    checkpoint is measured as an audit's metadata findings are, the worst one counts."""
    from types import SimpleNamespace

    audits = [SimpleNamespace(model=SimpleNamespace(label=label), membership=None, extraction=None, memorization=None,
                              findings=list(findings)) for label, findings in scanned]
    return evaluate(conditions, SimpleNamespace(audits=audits, comparisons=[], created=""))


# -- JSON Schema -------------------------------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``verdict.json``, generated from the dataclasses like result.json's.

    The shipped ``s2l_plugin/schema/verdict.schema.json`` must equal this (a test checks);
    regenerate it with ``python -m s2l_plugin.gate``.
    """
    from s2l_plugin.result import _schema_of

    defs: dict[str, Any] = {}
    root = _schema_of(Verdict, defs)
    defs["Verdict"]["properties"]["schema_version"] = {"const": VERDICT_SCHEMA_VERSION}
    defs["Verdict"]["properties"]["verdict"] = {"enum": ["pass", "fail"]}
    defs["ConditionVerdict"]["properties"]["status"] = {"enum": ["pass", "fail", "not-measured"]}
    defs["ConditionVerdict"]["properties"]["op"] = {"enum": list(OPS)}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://s2l-plugin.dev/schema/verdict-v{VERDICT_SCHEMA_VERSION}.json",
        "title": "s2l-plugin privacy gate verdict",
        **root,
        "$defs": defs,
    }


if __name__ == "__main__":  # pragma: no cover
    from s2l_plugin._io import atomic_write_text

    atomic_write_text(SCHEMA_FILE, json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n")
    print(SCHEMA_FILE)
