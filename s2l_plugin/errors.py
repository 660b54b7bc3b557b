"""Exceptions that mean "the user asked for something we cannot do".

The CLI turns every :class:`S2LError` into one line on stderr and exit code 2. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class S2LError(Exception):
    """Base class: a user mistake or an unusable input, reported in one line."""

    exit_code = 2


class ConfigError(S2LError, ValueError):
    """An option or config value is invalid (the message names the value and what was expected)."""


class InputError(S2LError):
    """An input path, image folder or data file is missing, empty or unreadable."""


class FormatError(S2LError):
    """A checkpoint file is malformed, unsupported, unsafe to load, or incompatible with its base."""


class PluginError(S2LError):
    """A plugin broke a hook's rules (the message names the plugin, the hook and the rule)."""
