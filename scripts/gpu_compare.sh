#!/usr/bin/env bash
# compare-tiny's runs on one GPU at ~16M tokens per run, 3 seeds, inside one 10-minute call on one H200.
# Writes $OUT/gpu_compare.json, $OUT/gpu_compare.md (mean ± std per run) and $OUT/gpu_compare.log.
#   OUT=/tmp/gc bash scripts/gpu_compare.sh             # on the GPU (configs/gpu-compare.yaml)
#   OUT=/tmp/gc bash scripts/gpu_compare.sh --dry-run   # CPU, toy sizes, the same code path
# Extra flags go to scripts/gpu_compare.py (--seeds 0,1,2, --config, --set section.key=value).
set -euo pipefail
OUT=${OUT:?set OUT to the output dir}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# 9.5 minutes at most (one 10-minute device call); the seeds done before a cut stay in gpu_compare.json
timeout --signal=TERM --kill-after=15 570 "$PYTHON" "$ROOT/scripts/gpu_compare.py" --out "$OUT" "$@" 2>&1 \
  | tee "$OUT/gpu_compare.log"
