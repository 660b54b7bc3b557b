"""``s2l scan FILE``: the metadata privacy scan alone -- no model load, no data needed."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="scan a checkpoint's metadata for training-data leaks (captions, dataset folders, tokens)",
        description="Scan a LoRA / embedding / hypernetwork / model file's metadata for privacy leaks. "
        "Findings are not errors: the exit code is 0 unless the file cannot be read.",
    )
    p.add_argument("file", help="checkpoint file or folder (format found from its content)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickled .pt/.ckpt/.bin files (with torch.load(weights_only=True)); refused by default",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from s2l_plugin.audit.metadata import scan_file
    from s2l_plugin.result import to_dict

    findings = scan_file(args.file, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps([to_dict(f) for f in findings], indent=2, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Keys, messages and the file name come from the checkpoint: escape them, never parse them as
    # rich markup (a tag like "[/bold]" in a caption would otherwise crash the scan).
    console = Console()
    if not findings:
        console.print(f"{escape(str(args.file))}: no metadata found")
        return 0
    table = Table(title=f"metadata findings: {escape(str(args.file))}", show_lines=False)
    for col in ("severity", "key", "finding"):
        table.add_column(col, overflow="fold")
    colours = {"high": "bold red", "medium": "yellow", "low": "cyan", "info": "dim"}
    for f in findings:
        table.add_row(f"[{colours.get(f.severity, '')}]{f.severity}[/]", escape(f.key), escape(f.message))
    console.print(table)
    return 0
