"""Run every benchmark and collect their results into docs/benchmarks.md.

    python benchmarks/run_all.py [--only generate,train,mia,extraction,real_size] [--skip-run]

Each benchmark script measures its ratio side by side in one process and writes
``benchmarks/results/<name>.md``; this script runs them one after another (so they do not
compete for the CPU) and concatenates their results under a description of the machine.
``--skip-run`` only re-collects the existing result files. Benchmarks are not tests: nothing
here passes or fails on wall time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
BENCHMARKS = {
    "generate": "bench_generate.py",
    "train": "bench_train.py",
    "mia": "bench_mia.py",
    "extraction": "bench_extraction.py",
    "real_size": "bench_real_size.py",
}
TITLES = {
    "generate": "Synthetic-set generation (issue 4)",
    "train": "Built-in trainers (issue 5)",
    "mia": "Membership-inference engine (issue 7)",
    "extraction": "Extraction matching in bounded memory (issue 8)",
    "real_size": "Real-size models on this CPU (issue 19)",
}


def _section(name: str, text: str) -> str:
    """One benchmark's result file under a ``##`` title, its own headings moved one level down."""
    lines = [("#" + line) if line.startswith("#") else line for line in text.strip().splitlines()]
    return f"## {TITLES[name]}\n\n" + "\n".join(lines)


def machine() -> str:
    from importlib import metadata

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "diffusers", "transformers", "peft", "accelerate"))
    return (
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), no GPU (no GPU machine was lent to this session, so nothing here was measured on a GPU)\n"
        f"- Python {platform.python_version()}, {versions}\n"
        f"- collected {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    parser.add_argument("--skip-run", action="store_true", help="do not run; only collect existing result files")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; expected some of {list(BENCHMARKS)}")
    if not args.skip_run:
        for name in names:
            print(f"== {name}", flush=True)
            subprocess.run([sys.executable, str(HERE / BENCHMARKS[name])], check=True, cwd=REPO)
    sections = []
    for name in BENCHMARKS:
        path = RESULTS / f"{name}.md"
        if path.exists():
            sections.append(_section(name, path.read_text()))
        else:
            sections.append(f"## {TITLES[name]}\n\nNot measured yet: run `python benchmarks/{BENCHMARKS[name]}`.")
    text = (
        "# Benchmarks\n\n"
        "Performance is shown by ratios measured side by side in one run on the same machine, never by timed tests.\n"
        "Regenerate everything with `python benchmarks/run_all.py` (or one part with `--only NAME`).\n\n"
        f"{machine()}\n\n" + "\n\n".join(sections) + "\n"
    )
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
