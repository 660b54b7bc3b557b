"""``s2l testbed build`` / ``s2l testbed info``: build the embedded tiny Stable Diffusion, or describe one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _knob(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("testbed", help="build or describe the embedded testbed (tiny Stable Diffusion on digits)")
    tsub = p.add_subparsers(dest="testbed_command", metavar="ACTION")
    b = tsub.add_parser("build", help="run the seeded testbed recipe into a folder")
    b.add_argument("--preset", default="demo", choices=["demo", "test"], help="demo (calibrated, <= 10 min) or test (<= 60 s); default demo")
    b.add_argument("--out", type=Path, default=None, help="output folder (default ./s2l-testbed-<preset>)")
    b.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default 0)")
    b.add_argument("--set", dest="knobs", action="append", type=_knob, default=[], metavar="KNOB=VALUE",
                   help="override a recipe knob, e.g. --set steps=1000 (repeatable; see docs/testbed.md)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=run_build)
    i = tsub.add_parser("info", help="describe a testbed (default: the shipped demo testbed)")
    i.add_argument("path", nargs="?", type=Path, default=None, help="testbed folder (default: shipped demo)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _parse_knobs(pairs: list[tuple[str, str]]) -> dict[str, object]:
    """KEY=VALUE strings typed after the recipe's own field types (ConfigError for unknown keys or bad values)."""
    import dataclasses

    from s2l_plugin.errors import ConfigError
    from s2l_plugin.testbed.corpus import RecipeConfig

    types = {f.name: f.type for f in dataclasses.fields(RecipeConfig)}
    knobs: dict[str, object] = {}
    for key, value in pairs:
        if key not in types:
            raise ConfigError(f"unknown testbed knob {key!r}; expected one of: {', '.join(sorted(types))}")
        kind = str(types[key])
        try:
            if kind.startswith("tuple"):
                knobs[key] = tuple(int(v) for v in value.split(",") if v.strip())
            elif kind == "int":
                knobs[key] = int(value)
            elif kind == "str":
                knobs[key] = value
            else:
                knobs[key] = float(value)
        except ValueError:
            expected = {"int": "an integer", "float": "a number"}.get(kind, "comma-separated integers")
            raise ConfigError(f"{key}={value!r} is not valid; expected {expected}") from None
    return knobs


def run_build(args: argparse.Namespace) -> int:
    from s2l_plugin.testbed import build_testbed

    tb = build_testbed(args.preset, out=args.out, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet,
                       **_parse_knobs(args.knobs))
    info = tb.build_info
    print(f"testbed ({tb.preset}, seed {tb.seed}) written to {tb.path} in {info['seconds']['total_s']:.0f} s "
          f"(weights {info['pipeline_hash']})")
    return 0


def summary(path: Path | None) -> dict[str, object]:
    """What ``s2l testbed info`` shows: paths, recipe, per-domain counts, build facts."""
    from s2l_plugin.testbed.layout import Testbed

    tb = Testbed.load(path)
    return {
        "path": str(tb.path),
        "pipeline": str(tb.pipeline_dir),
        "preset": tb.preset,
        "seed": tb.seed,
        "recipe": tb.manifest["recipe"],
        "domains": [
            {"name": d.name, "prompt": d.prompt, "members": len(tb.members(d)), "duplicated": len(tb.duplicates(d)),
             "nonmembers": len(tb.nonmembers(d))}
            for d in tb.domains
        ],
        "build": {k: v for k, v in tb.build_info.items() if k != "versions"},
    }


def run_info(args: argparse.Namespace) -> int:
    data = summary(args.path)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"testbed [bold]{data['path']}[/] (preset {data['preset']}, seed {data['seed']})")
    console.print(f"pipeline: {data['pipeline']}")
    build = data["build"]
    if build:
        cpu = build["seconds"].get("total_cpu_s")
        cpu_text = f", {cpu:.0f} s CPU" if cpu is not None else ""
        console.print(f"built in {build['seconds']['total_s']:.0f} s wall{cpu_text}; weights {build['pipeline_hash']}")
    table = Table()
    for col in ("domain", "prompt", "members", "duplicated", "non-members"):
        table.add_column(col)
    for d in data["domains"]:
        table.add_row(d["name"], d["prompt"], str(d["members"]), str(d["duplicated"]), str(d["nonmembers"]))
    console.print(table)
    return 0
