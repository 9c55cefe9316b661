#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): S=8 CNN shards packed on one GPU vs one after
# another, one deletion vs a monolithic retrain, verify. Under 8 minutes on one H100.
# Without CUDA, or with --tiny / SISA_GPU_CHECK_TINY=1, a CPU smoke run on tiny settings.
# Writes $OUT/gpu_check.json if OUT is set, else docs/bench/gpu_check.json.
#   bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --tiny     # CPU smoke run (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" scripts/gpu_check.py "$@"
