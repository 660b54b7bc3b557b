"""The ``s2l`` command line: parses, calls the API, maps S2LError to one line and exit code 2.

Subcommands live in ``s2l_plugin/commands/<name>.py``; each module defines
``register(subparsers)`` and sets ``func`` on its parser. Command modules import nothing heavy
at import time so ``s2l --help`` stays instant.

Right before a command runs, the ML libraries' warnings and loading bars are silenced
(:func:`s2l_plugin.progress.quiet_libraries`) and bars nested in s2l bars hidden, unless the
global ``-v/--verbose`` is given (before the command, or after it for all but ``launch``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from s2l_plugin import __version__
from s2l_plugin.errors import S2LError

#: the global flag's help; without it the ML libraries' warnings and loading bars are silenced
VERBOSE_HELP = "show the libraries' warnings and loading bars, and progress bars nested in other bars"
#: the global flags that may come before a command
_VERBOSE_FLAGS = ("-v", "--verbose")


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line message for usage errors (as argparse already does)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="s2l",
        description="Shake-to-Leak: S2L synthetic-data generation and privacy auditing for diffusion fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"s2l-plugin {__version__}")
    parser.add_argument(*_VERBOSE_FLAGS, action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from s2l_plugin import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"s2l_plugin.commands.{info.name}")
        before = set(sub.choices)
        module.register(sub)
        if getattr(module, "RAW_ARGS", False):
            continue  # its arguments are all its own: `s2l -v launch …`
        for name in sorted(set(sub.choices) - before):
            # `s2l demo -v` works too; SUPPRESS keeps a -v given before the command.
            with contextlib.suppress(argparse.ArgumentError):  # a command with a -v of its own keeps it
                sub.choices[name].add_argument(*_VERBOSE_FLAGS, action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
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
    flags = 0  # leading -v/--verbose, before the command name
    while flags < len(argv) and argv[flags] in _VERBOSE_FLAGS:
        flags += 1
    raw = _raw_command(argv[flags:])
    if raw is not None:
        func, call_args, verbose = raw.run, argv[flags + 1 :], flags > 0
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0
        func, call_args, verbose = args.func, args, bool(getattr(args, "verbose", False))
    from s2l_plugin import progress

    was_verbose = progress.is_verbose()
    progress.set_verbose(verbose)
    try:
        # Right before the command runs, so `s2l --help` imports none of the libraries.
        with progress.quiet_libraries(enabled=not verbose):
            code = func(call_args)
    except S2LError as exc:
        print(f"s2l: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("s2l: interrupted", file=sys.stderr)
        return 130
    finally:
        progress.set_verbose(was_verbose)
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
