"""pluggy hook specifications and the plugin manager of s2l-plugin (installed as ``s2l_plugin.hooks``)."""

from __future__ import annotations

from .specs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
