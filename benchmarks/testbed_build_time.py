"""Time `s2l testbed build` end to end (a fresh process: imports included), wall and CPU seconds.

    python benchmarks/testbed_build_time.py --preset test
    python benchmarks/testbed_build_time.py --preset demo

The build is single-threaded (recipe knob ``threads`` = 1), so its CPU seconds are what the wall
time would be on an idle machine; the wall time on a shared machine is longer, and the load
average at start and end is printed beside it to say how shared it was. Targets (issue 3):
test <= 60 s, demo <= 10 min on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="test", choices=["test", "demo"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    s2l = Path(sys.executable).with_name("s2l")
    with tempfile.TemporaryDirectory(prefix="s2l-build-time-") as tmp:
        cmd = [str(s2l), "testbed", "build", "--preset", args.preset, "--seed", str(args.seed), "--out", f"{tmp}/tb", "--quiet"]
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = os.getloadavg()
    cpu = usage.ru_utime + usage.ru_stime
    print(f"preset {args.preset}: wall {wall:.1f} s, CPU {cpu:.1f} s (user {usage.ru_utime:.1f} + sys {usage.ru_stime:.1f}); "
          f"load average {load_before[0]:.1f} at start, {load_after[0]:.1f} at end, on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
