"""s2l-plugin: Shake-to-Leak synthetic-data generation and privacy auditing for diffusion fine-tuning.

The public API is re-exported here; importing this package imports no torch.
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("s2l-plugin")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from s2l_plugin.errors import ConfigError, FormatError, InputError, PluginError, S2LError
from s2l_plugin.hooks import hookimpl

__all__ = [
    "ConfigError",
    "FormatError",
    "InputError",
    "PluginError",
    "S2LError",
    "__version__",
    "hookimpl",
]
