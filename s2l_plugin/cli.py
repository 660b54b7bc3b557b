"""The ``s2l`` command line: parses, calls the API, maps S2LError to one line and exit code 2.

Subcommands live in ``s2l_plugin/commands/<name>.py``; each module defines
``register(subparsers)`` and sets ``func`` on its parser. Command modules import nothing heavy
at import time so ``s2l --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from s2l_plugin import __version__
from s2l_plugin.errors import S2LError


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line message for usage errors (as argparse already does)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="s2l",
        description="Shake-to-Leak: S2L synthetic-data generation and privacy auditing for diffusion fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"s2l-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from s2l_plugin import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"s2l_plugin.commands.{info.name}")
        module.register(sub)
    return parser


def _raw_command(argv: Sequence[str]) -> object | None:
    """The module of a command that takes its arguments raw (``RAW_ARGS = True``), if argv names one."""
    if not argv or argv[0].startswith("-"):
        return None
    try:
        module = importlib.import_module(f"s2l_plugin.commands.{argv[0]}")
    except ImportError:
        return None
    return module if getattr(module, "RAW_ARGS", False) else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    raw = _raw_command(argv)
    if raw is not None:
        func, call_args = raw.run, argv[1:]
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0
        func, call_args = args.func, args
    try:
        code = func(call_args)
    except S2LError as exc:
        print(f"s2l: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("s2l: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
