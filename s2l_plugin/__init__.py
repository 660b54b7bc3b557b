"""s2l-plugin: Shake-to-Leak synthetic-data generation and privacy auditing for diffusion fine-tuning.

The public API is re-exported here. Importing this package imports no torch: the heavier
entries load on first use.
"""

from __future__ import annotations

from importlib import import_module
from importlib import metadata as _metadata
from typing import Any

try:
    __version__ = _metadata.version("s2l-plugin")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from s2l_plugin.context import AuditSpec, Run
from s2l_plugin.errors import ConfigError, FormatError, InputError, PluginError, S2LError
from s2l_plugin.hooks import hookimpl
from s2l_plugin.integration import add_arguments, after_training, before_training, s2l_training

# name -> module that defines it (imported on first attribute access)
_LAZY = {
    "generate_private_set": "s2l_plugin.generate",
    "GenerationConfig": "s2l_plugin.generate",
    "audit_membership": "s2l_plugin.audit.mia.engine",
    "extract": "s2l_plugin.audit.extraction",
    "memorization_scores": "s2l_plugin.audit.memorization",
    "relative_memorization_scores": "s2l_plugin.audit.memorization",
    "audit_checkpoint": "s2l_plugin.audit.api",
    "scan_file": "s2l_plugin.audit.metadata",
    "scan_tree": "s2l_plugin.audit.metadata",
    "strip_file": "s2l_plugin.audit.metadata",
    "write_model_card": "s2l_plugin.model_card",
    "run_experiment": "s2l_plugin.run",
    "load_run_config": "s2l_plugin.runconfig",
    "load_result": "s2l_plugin.result",
    "save_result": "s2l_plugin.result",
    "load_pipeline": "s2l_plugin.pipeline",
    "Testbed": "s2l_plugin.testbed",
    "TrainConfig": "s2l_plugin.adapters.base",
    "Artifact": "s2l_plugin.adapters.base",
    "Adapter": "s2l_plugin.adapters.base",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 's2l_plugin' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AuditSpec",
    "ConfigError",
    "FormatError",
    "InputError",
    "PluginError",
    "Run",
    "S2LError",
    "__version__",
    "add_arguments",
    "after_training",
    "before_training",
    "hookimpl",
    "s2l_training",
    *sorted(_LAZY),
]
