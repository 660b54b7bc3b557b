"""``s2l launch [S2L OPTIONS] -- SCRIPT.py [SCRIPT ARGS]``: wrap a training script with S2L."""

from __future__ import annotations

import argparse

#: The CLI passes everything after ``launch`` to :func:`run` untouched: the options after ``--``
#: belong to the training script, and the S2L options come from plugins too.
RAW_ARGS = True


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="run a diffusers/kohya training script with S2L generation before it and an audit after it",
        add_help=False,
    )
    p.set_defaults(func=run)


def run(argv: list[str]) -> int:
    from s2l_plugin.launch import build_parser, launch

    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    result = launch(argv).state.get("result")
    if result is not None:
        from s2l_plugin.report.writers import print_summary

        print_summary(result)
    return 0
