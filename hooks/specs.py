"""Every hook of s2l-plugin, one docstring each. Full documentation: docs/hooks.md.

Rules: hooks are called with keyword arguments only; a hook implementation may accept any
subset of a spec's arguments; arguments are added over time, never renamed or removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "s2l"
ENTRY_POINT_GROUP = "s2l_plugin"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- register-callback hooks: the host validates what plugins register ------------------


@hookspec
def register_adapters(register: Callable[[Any], None]) -> None:
    """Register fine-tuning adapters: call ``register(adapter)`` with an object meeting ``s2l_plugin.adapters.base.Adapter``."""


@hookspec
def register_attacks(register: Callable[[Any], None]) -> None:
    """Register membership-inference attacks: call ``register(attack)`` with an ``s2l_plugin.audit.mia.engine.Attack``."""


@hookspec
def register_extractors(register: Callable[[Any], None]) -> None:
    """Register training-data extraction methods: call ``register(extractor)`` with an ``s2l_plugin.audit.extractor.Extractor``."""


@hookspec
def register_loaders(register: Callable[[Any], None]) -> None:
    """Register checkpoint-format loaders: call ``register(loader)`` with an ``s2l_plugin.formats.loaders.Loader``."""


@hookspec
def register_report_writers(register: Callable[[Any], None]) -> None:
    """Register report writers: call ``register(writer)`` with an ``s2l_plugin.report.writers.ReportWriter``."""


# -- event hooks -------------------------------------------------------------------------


@hookspec(historic=True)
def s2l_add_arguments(parser: Any) -> None:
    """Add command-line options to an argparse parser or argument group (historic: late plugins see it too)."""


@hookspec(firstresult=True)
def s2l_generate_private_set(run: Any, pipeline: Any) -> Any:
    """Generate the synthetic private set for ``run``; return a GeneratedSet, or None to let the next plugin do it."""


@hookspec
def s2l_before_training(run: Any) -> None:
    """Called before training starts; may rewrite ``run.script_args`` (e.g. point the data argument at the set)."""


@hookspec
def s2l_after_training(run: Any, artifact: Any) -> None:
    """Called after training with the trained Artifact; the default implementation audits it."""


@hookspec(firstresult=True)
def s2l_audit(run: Any, target: Any, reference: Any) -> Any:
    """Audit ``target`` (with ``reference`` as the pre-fine-tune base); return an AuditResult. Wrap it to time, redact or veto."""


@hookspec
def s2l_write_report(result: Any, out_dir: Any) -> None:
    """Write report files for a saved result into ``out_dir``."""


