"""``s2l plugins``: list registered plugins and the hooks each implements."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list registered plugins and their hooks")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--hook", help="only plugins that implement this hook")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from s2l_plugin.hooks.manager import plugin_table

    rows = plugin_table()
    if args.hook:
        rows = [r for r in rows if args.hook in r["hooks"]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="s2l plugins")
    for col in ("name", "kind", "hooks", "version"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "built-in" if r["builtin"] else (r["distribution"] or "local"), ", ".join(r["hooks"]), r["version"] or "")
    Console().print(table)
    return 0
