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
    run_ = launch(argv)
    path = run_.state.get("result_path")
    # The console report writer (a default format) has already printed the summary; print it here
    # only when the run's report formats left it out, from the saved result so it names the folder.
    if path is not None and "console" not in (run_.options.get("report") or []):
        from s2l_plugin.report.writers import print_summary

        print_summary(path)
    return 0
