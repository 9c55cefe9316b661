#!/usr/bin/env bash
# The main job end to end on the built-in default: Fashion-MNIST, S=8 x R=4 MLP ensemble on Ray.
# Sets up .venv and the data itself; safe to re-run (starts from a fresh store each time).
# Extra arguments are config overrides, e.g. `bash scripts/quickstart.sh shards=16`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
store=runs/quickstart
rm -rf "$store"
.venv/bin/sisa train --config configs/fashion_mnist.yaml --store "$store" "$@"
.venv/bin/sisa status --store "$store"
