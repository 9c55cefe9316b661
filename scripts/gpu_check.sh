#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): S=8 CNN shards packed on one GPU vs one after
# another; the determinism domain they trained in (printed as "domain: ID (...)"); the packed fit
# repeated (repeat_identical: every stage bit-identical); one deletion vs a monolithic retrain and
# verify on cuda in the live domain (gpu_store_verify); a small gpus_per_shard=0 store fitted and
# verified on the CPU (cpu_store_verify); bf16; a shared core-set backbone with LoRA per shard,
# one deletion and verify on the device (backbone_verify). Estimated well under 8 minutes on one H100/H200;
# not yet run on a GPU, so no GPU numbers exist until someone does. The Python restarts itself once
# pinned to resources.cpu_isa. Exit status 1 unless every entry of the JSON's "checks" holds.
# Without CUDA it fails at once with exit status 2 (never a CPU run that exits 0). With --tiny /
# SISA_GPU_CHECK_TINY=1, a CPU smoke run on tiny settings (about a minute; its "GPU" parts run on
# the CPU, and the JSON's note says they are not GPU numbers). It stops itself at --deadline
# seconds (default 540) and writes what it measured, before an outside 10-minute limit.
# Writes $OUT/gpu_check.json if OUT is set, else docs/bench/gpu_check.json.
#   bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --tiny     # CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" scripts/gpu_check.py "$@"
