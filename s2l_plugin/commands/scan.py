"""``s2l scan FILE|DIR``: the metadata privacy scan alone -- no model load, no data needed.

``s2l scan FILE`` lists one checkpoint's findings; ``s2l scan DIR`` scans every checkpoint in a
folder tree into one table (and CSV / JSON files); ``s2l scan FILE --strip OUT`` writes a copy of a
safetensors file with the leaking metadata removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: where ``s2l scan DIR`` writes its table when ``--out`` is not given (and ``--json`` is not either)
DEFAULT_OUT = "s2l-scan"
CSV_FILE = "scan.csv"
JSON_FILE = "scan.json"
_COLOURS = {"high": "bold red", "medium": "yellow", "low": "cyan", "info": "dim"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="scan a checkpoint's (or a folder's) metadata for training-data leaks; --strip removes them",
        description="Scan a LoRA / embedding / hypernetwork / model file's metadata for privacy leaks, or every "
        "checkpoint in a folder tree. Findings are not errors: the exit code is 0 unless the file cannot be read "
        "(a folder scan lists unreadable files as rows and exits 0).",
    )
    p.add_argument("file", help="checkpoint file, or a folder: every checkpoint in its tree is scanned")
    p.add_argument("--json", action="store_true", help="print the findings (a folder: the rows) as JSON")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickled .pt/.ckpt/.bin files (with torch.load(weights_only=True)); refused (a folder: skipped) by default",
    )
    p.add_argument("--artifact", action="store_true",
                   help="scan a folder as the one artifact the loaders read (a LoRA with its embeddings, a PEFT "
                   "folder, a pipeline), as s2l audit does, instead of file by file")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"folder scan: write {CSV_FILE} and {JSON_FILE} here (default ./{DEFAULT_OUT}; with --json, "
                   "only when given)")
    p.add_argument("--fail-on", metavar="EXPR", default=None,
                   help="privacy gate on the metadata findings, e.g. 'scan.severity>=high' or 'scan.findings>0': exit 3 "
                   "(and verdict.json in --out) when a scanned checkpoint meets it")
    strip = p.add_argument_group("metadata clean-up")
    strip.add_argument("--strip", metavar="OUT", default=None,
                       help="write a copy of the (safetensors) FILE to OUT without the leaking metadata; tensors "
                       "are copied byte for byte, the input is never modified")
    strip.add_argument("--strip-all", action="store_true",
                       help="with --strip: also remove kohya's minimum keys (ss_network_*, ss_base_model_version, "
                       "ss_v2) and modelspec.*; only the keys loaders need to read the file stay")
    strip.add_argument("--keep", metavar="KEY", action="append", default=[],
                       help="with --strip: keep this metadata key too (repeatable)")
    strip.add_argument("--overwrite", action="store_true", help="with --strip: replace an existing OUT (never FILE)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from s2l_plugin.errors import ConfigError

    path = Path(args.file)
    if args.strip is None and (args.strip_all or args.keep or args.overwrite):
        raise ConfigError("--strip-all, --keep and --overwrite go with --strip OUT")
    if args.strip is not None:
        if args.fail_on is not None:
            raise ConfigError("--fail-on goes with a scan, not with --strip OUT")
        return _strip(args)
    conditions = None
    if args.fail_on is not None:
        from s2l_plugin.gate import parse_scan

        conditions = parse_scan(args.fail_on)  # a bad expression fails before anything is read
    if path.is_dir() and not args.artifact:
        scan = scan_folder(path, allow_pickle=args.allow_pickle)
        _report_folder(scan, args)
        return _gate(conditions, [(row.file, row.findings) for row in scan.rows], args)
    findings = _scan_file(args)
    return _gate(conditions, [(str(args.file), findings)], args)


def _gate(conditions: Any, scanned: list[tuple[str, list[Any]]], args: argparse.Namespace) -> int:
    """0 without a gate or when it holds; the gate's exit code (verdict.json in --out, the verdict on stderr) when it trips."""
    if conditions is None:
        return 0
    from s2l_plugin.gate import evaluate_scan, headline, write_verdict
    from s2l_plugin.result import to_dict

    verdict = evaluate_scan(conditions, scanned)
    if args.out is not None:
        write_verdict(verdict, args.out)
    print(headline(to_dict(verdict)), file=sys.stderr)
    return verdict.exit_code


def scan_folder(path: str | Path, *, allow_pickle: bool = False) -> Any:
    """The batch scan of a folder tree: its rows and the worst severity over them
    (:class:`s2l_plugin.audit.metadata.TreeScan`). A gate reads ``.worst``; the exit status stays the caller's."""
    from s2l_plugin.audit.metadata import scan_tree

    return scan_tree(path, allow_pickle=allow_pickle)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _scan_file(args: argparse.Namespace) -> list[Any]:
    """Print one checkpoint's findings (a table, or JSON with --json); returns them."""
    from s2l_plugin.audit.metadata import scan_file
    from s2l_plugin.result import to_dict

    findings = scan_file(args.file, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps([to_dict(f) for f in findings], indent=2, ensure_ascii=False))
        return findings
    from rich.console import Console
    from rich.table import Table

    # Keys, messages and the file name come from the checkpoint: escape them, never parse them as
    # rich markup (a tag like "[/bold]" in a caption would otherwise crash the scan).
    console = Console()
    if not findings:
        console.print(f"{_escape(str(args.file))}: no metadata found")
        return findings
    table = Table(title=f"metadata findings: {_escape(str(args.file))}", show_lines=False)
    for col in ("severity", "key", "finding"):
        table.add_column(col, overflow="fold")
    for f in findings:
        table.add_row(f"[{_COLOURS.get(f.severity, '')}]{f.severity}[/]", _escape(f.key), _escape(f.message))
    console.print(table)
    return findings


def _report_folder(scan: Any, args: argparse.Namespace) -> None:
    from s2l_plugin._io import atomic_write_text
    from s2l_plugin.audit.metadata import SEVERITIES, scan_tree_csv

    data = scan.to_dict()
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    out = args.out if args.out is not None else (None if args.json else DEFAULT_OUT)
    if out is not None:
        atomic_write_text(Path(out) / CSV_FILE, scan_tree_csv(scan))
        atomic_write_text(Path(out) / JSON_FILE, text)
    if args.json:
        print(text, end="")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"metadata scan: {_escape(str(args.file))}", show_lines=False)
    for col in ("file", "format", "base", *SEVERITIES, "note"):
        table.add_column(col, overflow="fold", justify="right" if col in SEVERITIES else "left")
    for row in scan.rows:
        counts = [f"[{_COLOURS[s]}]{row.counts[s]}[/]" if row.counts[s] else "0" for s in SEVERITIES]
        note = f"{row.status}: {row.error}" if row.error else ""
        table.add_row(_escape(row.file), _escape(row.format), row.base, *counts, _escape(note))
    console.print(table)
    errors = sum(r.status == "error" for r in scan.rows)
    skipped = sum(r.status == "skipped" for r in scan.rows)
    line = f"{len(scan.rows)} checkpoint(s), worst finding: {scan.worst or 'none'}"
    if errors or skipped:
        line += f"; {errors} unreadable, {skipped} skipped"
    if out is not None:
        line += f" · {Path(out) / CSV_FILE} · {Path(out) / JSON_FILE}"
    console.print(_escape(line), soft_wrap=True)


def _strip(args: argparse.Namespace) -> int:
    from s2l_plugin.audit.metadata import strip_file
    from s2l_plugin.result import to_dict

    result = strip_file(args.file, args.strip, strip_all=args.strip_all, keep=args.keep, overwrite=args.overwrite)
    left = [f for f in result.findings if f.severity != "info"]
    if args.json:
        print(json.dumps({"out": str(result.path), "removed": result.removed, "kept": sorted(result.kept),
                          "findings": [to_dict(f) for f in result.findings]}, indent=2, ensure_ascii=False))
        return 0
    from rich.console import Console

    console = Console()
    console.print(_escape(f"wrote {result.path}: removed {len(result.removed)} metadata key(s)"
                          + (f" ({', '.join(result.removed)})" if result.removed else "")
                          + f"; kept {len(result.kept)}" + (f" ({', '.join(sorted(result.kept))})" if result.kept else "")),
                  soft_wrap=True)
    for f in left:
        console.print(_escape(f"still in the copy ({f.severity}): {f.key}: {f.message}"), soft_wrap=True)
    return 0
