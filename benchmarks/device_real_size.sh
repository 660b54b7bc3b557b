#!/usr/bin/env bash
# Real-size MIA benchmark at fp16 on one GPU (issue 19): the same measurement as the CPU run in
# docs/benchmarks.md ("Real-size models on this CPU"), with the package's default attack settings
# (loss 16, secmi 16, pia 2, pian 2 UNet calls per image), 4 images, batch 1, 5 bare forwards.
# SD 1.5 and SDXL 1.0 with random weights, built in code (no download; the machine needs no network).
# Expected under 8 minutes on an H100/H200-class GPU (most of it is building the models on the CPU).
#
#   bash benchmarks/device_real_size.sh            # writes $OUT/real_size_cuda_fp16.{json,md}
#
# Copy the JSON/markdown back into benchmarks/results/ and the table into docs/benchmarks.md.
set -euo pipefail
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
"$PY" -c "import torch, diffusers; print(torch.__version__, torch.cuda.is_available(), diffusers.__version__)" | tee "$OUT/versions.txt"
timeout 470 "$PY" benchmarks/bench_real_size.py \
  --cases sd15@512,sdxl@1024,sd15@1024,sdxl@512 \
  --device cuda --dtype float16 --attack-params default --images 4 --bare-repeats 5 --sdxl-text real \
  --out "$OUT/real_size_cuda_fp16.json" 2>&1 | tee "$OUT/real_size_cuda_fp16.log"
