"""The S2L flow, once: audit a base and a target on the same data and noise, assemble the result, publish it.

``s2l run`` / ``s2l demo`` (through the ``s2l_after_training`` hook), ``s2l launch``, the three-call
Python API and ``s2l audit`` all go through these functions; each entry point keeps only what is
its own (stage resume, argv and the script call, argument parsing, checkpoint detection).

- :func:`audit_pair` fires ``s2l_audit`` for the base (no reference; skipped when the caller
  already holds its audit) and then for the target, with the base as its reference. Both runs
  carry the same :class:`~s2l_plugin.context.AuditSpec`, so they see the same images, noise
  draws and prompts, and a before/after difference is the model's alone.
- :func:`assemble_result` pairs audits into before/after comparisons (paired bootstrap with the
  spec's seed and member groups) and builds the :class:`~s2l_plugin.result.RunResult`, with the
  distribution-shift diagnostic of the sets (:func:`s2l_plugin.audit.shift.shift_summary`) once.
- :func:`publish` saves ``result.json``, applies the privacy gate (``verdict.json``) and fires
  ``s2l_write_report``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2l_plugin.context import AuditSpec, Run


def audit_pair(
    base_run: Run, target_run: Run, base: Any, target: Any, *, before: Any = None
) -> tuple[Any, Any]:
    """``(base audit, target audit)``: ``s2l_audit`` on ``base`` (unless ``before`` is given) and on
    ``target`` with ``base`` as reference. ``base_run`` / ``target_run`` carry the audit spec, the
    plugin manager and each model's ``state`` (label, paths, findings)."""
    pm = target_run.pm
    if pm is None:
        from s2l_plugin.hooks.manager import get_plugin_manager

        pm = target_run.pm = get_plugin_manager()
    if before is None:
        before = pm.hook.s2l_audit(run=base_run, target=base, reference=None)
    after = pm.hook.s2l_audit(run=target_run, target=target, reference=base)
    return before, after


def assemble_result(
    kind: str,
    audits: Sequence[Any],
    *,
    pairs: Sequence[tuple[Any, Any, str]] = (),
    comparisons: Sequence[Any] = (),
    spec: AuditSpec | None = None,
    config: dict[str, Any] | None = None,
    seeds: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
    query: Any = None,
) -> Any:
    """The RunResult of ``audits``: ``comparisons`` (already computed) followed by one paired
    before/after comparison per ``(before, after, method)`` in ``pairs``, computed with ``spec``'s
    member groups and seed; versions and the creation time are stamped here. ``query`` (``s2l audit
    --query``) is the :class:`~s2l_plugin.result.QueryResult` of :func:`audit_query`, None otherwise."""
    from s2l_plugin.audit.compare import compare_audits
    from s2l_plugin.audit.shift import shift_summary
    from s2l_plugin.config import library_versions
    from s2l_plugin.result import RunResult

    spec = spec or AuditSpec()
    out = list(comparisons)
    for before, after, method in pairs:
        out += compare_audits(before, after, method=method, member_groups=spec.member_groups, seed=spec.seed)
    return RunResult(
        kind=kind,
        audits=list(audits),
        comparisons=out,
        config=dict(config or {}),
        versions=library_versions(),
        seeds=dict(seeds or {}),
        warnings=list(warnings),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        shift=shift_summary(audits),
        query=query,
    )


def audit_query(target_run: Run, target: Any, base: Any, query: Any, null: Any) -> Any:
    """``s2l audit --query``: per-image p-values of ``query`` against ``null`` (known non-members) and the
    dataset-level test on ``target``, with ``base`` as reference (:func:`s2l_plugin.audit.query.query_audit`);
    the attack comes from ``target_run.options["query_attack"]`` (default: reference), the seed from its
    audit spec. A query-vs-null latent shift warning is added to ``target_run.state["warnings"]``."""
    from s2l_plugin.audit.query import query_audit

    spec = target_run.audit or AuditSpec()
    result = query_audit(target, query, null, reference=base, attack=target_run.options.get("query_attack"),
                         seed=spec.seed, pm=target_run.pm)
    warning = (result.shift or {}).get("warning")
    if warning is not None and isinstance(target_run.state.get("warnings"), list):  # query and null differ without the model
        target_run.state["warnings"].append(f"--query vs --nonmembers: {warning}")
    return result


def publish(result: Any, out_dir: str | Path, pm: Any, *, reports: bool = True, fail_on: str | None = None) -> Path:
    """Save ``result`` as ``out_dir/result.json`` (written whole, then renamed), with ``fail_on`` (a
    privacy-gate expression, :mod:`s2l_plugin.gate`) write ``verdict.json`` beside it, and, with
    ``reports``, fire ``s2l_write_report`` (the console summary's first line is the verdict); returns
    the result's path. When the gate trips, raises :class:`~s2l_plugin.gate.GateFailed` (exit 3) last."""
    from s2l_plugin import gate
    from s2l_plugin.result import save_result

    path = save_result(result, out_dir)
    verdict = gate.apply(fail_on, result, out_dir)
    if reports:
        pm.hook.s2l_write_report(result=result, out_dir=Path(out_dir))
    gate.enforce(verdict, out_dir, path)
    return path


def with_state(run: Run, **state: Any) -> Run:
    """``run`` with ``state`` merged over its own (the per-model facts an audit reads)."""
    return dataclasses.replace(run, state={**run.state, **state})
