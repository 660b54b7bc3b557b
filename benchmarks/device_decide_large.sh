#!/usr/bin/env bash
# Issue #21's experiment (docs/results.md section 6) at a larger testbed, on a machine with a GPU:
# the demo recipe with a UNet of twice the channels, (64, 128), about 4x the parameters, and 64 members per
# domain instead of 50. The testbed is trained on the GPU (benchmarks/decide_large.py build: the
# recipe's own draws; passes on the device). Then arms S (guidance-3.0 synthetic set) and C (fresh
# real control) run for dreambooth and lora on all 10 domains, one CPU process per domain
# (16 cores: 10 at a time, one torch thread each).
#
# Expected wall time on the lent machine (H200, 16 cores), about 9 minutes in all:
#   - build: about 1–2 min (2,300 small steps, mostly Python overhead and imports);
#   - run: about 6–7 min. Per domain this CPU measured about 130 CPU s for S + C at the default
#     width (docs/results.md section 6). The (64, 128) UNet costs about 2.5x, so about 300 s per
#     domain, with the 10 domains in parallel.
# A run cut short by the time limit resumes: rerunning skips finished stages and cells.
#
#   bash benchmarks/device_decide_large.sh     # writes $OUT/s2l_decide_large*.{json,md}, $OUT/build.json, logs
#
# Copy $OUT/s2l_decide_large-*.json into benchmarks/results/, then
# `python benchmarks/s2l_experiments.py tables --grid-name decide_large` writes s2l_decide_large.md.
set -euo pipefail
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
mkdir -p "$OUT"
WORK="${WORK:-decide-large-work}"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -f "$WORK/testbed/manifest.json" ]; then
  mkdir -p "$WORK"
  timeout 240 "$PY" benchmarks/decide_large.py build --out "$WORK/testbed" --device cuda 2>&1 | tail -5 | tee "$OUT/decide_large_build.log"
fi
cp "$WORK/testbed/build.json" "$OUT/decide_large_build.json"
timeout 420 "$PY" benchmarks/decide_large.py run --base "$WORK/testbed" --work "$WORK" --jobs 10 --arms S,C 2>&1 | tee "$OUT/decide_large_run.log" || true
cp benchmarks/results/s2l_decide_large*.json benchmarks/results/s2l_decide_large.md "$OUT"/ 2>/dev/null || true
tail -n 30 benchmarks/results/s2l_decide_large.md 2>/dev/null || true
