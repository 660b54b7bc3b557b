"""``s2l run CONFIG.toml`` and ``s2l demo``: a whole S2L experiment, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a whole S2L experiment from a TOML config (generate, fine-tune, audit before/after, report)",
        description="Run a whole S2L experiment from a TOML config. A rerun skips the stages that already finished.",
    )
    p.add_argument("config", type=Path, help="the experiment's TOML config (see s2l_plugin/configs/demo.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set generate.num_images=200 (repeatable)")
    p.add_argument("--out", help="output folder (overrides the config's `out`)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a base model folder whose weights are only pickles (weights-only; the config's allow_pickle)")
    p.add_argument("--full", action="store_true",
                   help="print every table in the terminal (default: a one-screen summary; report.html has everything)")
    p.add_argument("--fail-on", metavar="EXPR", default=None,
                   help="privacy gate over every method's audit: exit 3 and write verdict.json when one meets a "
                   "condition, e.g. 'loss.auc.lower>0.55,extracted>0' (the config's [gate] fail_on; see docs/cli.md)")
    p.set_defaults(func=run)

    d = sub.add_parser(
        "demo",
        help="the S2L experiment on the embedded testbed, every method, HTML report (about 10 minutes on 2 CPU cores)",
        description="Run the shipped demo config on the embedded testbed: the same as `s2l run` with "
        "s2l_plugin/configs/demo.toml.",
    )
    d.add_argument("--out", default="s2l-demo", help="output folder (default ./s2l-demo)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo config value (repeatable)")
    d.add_argument("--full", action="store_true",
                   help="print every table in the terminal (default: a one-screen summary; report.html has everything)")
    d.set_defaults(func=demo)


def _execute(config_path: Path, overrides: list[str], full: bool = False) -> int:
    from s2l_plugin.report.console_report import full_listing
    from s2l_plugin.report.writers import print_summary
    from s2l_plugin.run import run_experiment
    from s2l_plugin.runconfig import load_run_config

    config = load_run_config(config_path, overrides)
    with full_listing(full):  # the console report writer, called by the run's report hook, prints it
        path = run_experiment(config)
    if "console" not in config.report:  # the console report writer already printed it
        print_summary(path, full=full)
    print(f"result: {path}")  # the summary ended with the report files
    return 0


def run(args: argparse.Namespace) -> int:
    import json

    from s2l_plugin.gate import parse

    if args.fail_on is not None:
        parse(args.fail_on)  # named as --fail-on when it is not valid
    gate = [f"gate.fail_on={json.dumps(args.fail_on)}"] if args.fail_on is not None else []
    overrides = list(args.overrides) + gate + ([f'out="{args.out}"'] if args.out else []) + (["allow_pickle=true"] if args.allow_pickle else [])
    return _execute(args.config, overrides, args.full)


def demo(args: argparse.Namespace) -> int:
    from s2l_plugin.runconfig import SHIPPED_CONFIGS

    return _execute(SHIPPED_CONFIGS / "demo.toml", list(args.overrides) + [f'out="{args.out}"'], args.full)
