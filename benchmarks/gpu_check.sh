#!/usr/bin/env bash
# The GPU check of a lent GPU (one H200): throughput and MFU of gpu-125m / gpu-350m, eager and compiled,
# peak memory, FSDP on 1 GPU with one IDEA compaction, IDEA vs scratch on the gpu-125m target (~2 min each).
# Finishes in <= 8 minutes; writes $OUT/gpu_check.json and $OUT/gpu_check.log. Run from the repo root:
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh            # on the GPU
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh --dry-run  # CPU, toy sizes, the same code paths
# Extra flags go to benchmarks/gpu_check.py (--data, --prepared, --train-seconds, --peak-tflops).
set -euo pipefail
OUT=${OUT:?set OUT to the output dir}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# 8 minutes of wall time at most: a leg cut short leaves the legs before it in gpu_check.json
timeout --signal=TERM --kill-after=15 480 "$PYTHON" "$ROOT/benchmarks/gpu_check.py" --out "$OUT" "$@" 2>&1 \
  | tee "$OUT/gpu_check.log"
