"""``s2l report RUN_DIR``: re-render a saved result (``--full``: every table in the terminal), or compare two runs (``--compare OTHER_RUN_DIR``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="re-render the report of a saved run, or compare two runs",
        description="Render RUN_DIR/result.json with the registered report writers (html, markdown, console, json, "
        "or a plugin's), or show two runs' metrics side by side with their differences.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder holding result.json (or the result.json itself)")
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        metavar="NAME",
        help="report writer to run: html, markdown, json, console or a plugin's (repeatable; default: html, markdown, console)",
    )
    p.add_argument("--compare", metavar="OTHER_RUN_DIR", help="show RUN_DIR (A) and OTHER_RUN_DIR (B) side by side with B − A")
    p.add_argument("--out", metavar="DIR", help="where report files go (default: RUN_DIR)")
    p.add_argument("--full", action="store_true",
                   help="the console writer prints every table (default: a one-screen summary)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from s2l_plugin.errors import ConfigError
    from s2l_plugin.result import RESULT_FILE, load_result

    run_dir = Path(args.run_dir)
    result_dir = run_dir.parent if run_dir.name == RESULT_FILE else run_dir
    out_dir = Path(args.out) if args.out else result_dir
    if args.compare:
        from s2l_plugin.report.compare import compare_runs

        if args.formats:
            raise ConfigError("--format cannot be combined with --compare (a comparison prints a table and writes compare.md)")
        compare_runs(run_dir, args.compare, out_dir)
        return 0
    from s2l_plugin.report.console_report import full_listing
    from s2l_plugin.report.writers import DEFAULT_FORMATS, write_reports

    load_result(run_dir)  # fail on a missing or unreadable result before any writer runs
    with full_listing(args.full):
        written = write_reports(run_dir, out_dir, args.formats or list(DEFAULT_FORMATS))
    for path in written:
        print(f"wrote {path}")
    return 0
