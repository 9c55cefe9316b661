#!/usr/bin/env bash
# The main job end to end on the built-in default, Fashion-MNIST (60k train / 10k test):
# train an S=8 x R=4 MLP ensemble on Ray, delete five samples (retraining only the affected
# shards from their last clean slice, erasing the bytes, certifying), verify that every live
# model is bit-identical to a retrain from scratch, check the transparency log, check one deletion
# receipt with the operator's public key alone (the standalone verifier), show the status.
# Sets up .venv and the data itself; safe to re-run (starts from a fresh store each time).
# Extra arguments are config overrides for training, e.g. `bash scripts/quickstart.sh shards=16`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
store=runs/quickstart
receipts=runs/quickstart-receipts  # personal data in real use: each goes to its data subject
rm -rf "$store" "$receipts"
sisa=.venv/bin/sisa
echo "== train"
$sisa train --config configs/fashion_mnist.yaml --store "$store" "$@"
echo "== delete 5 samples"
$sisa delete --store "$store" --ids 17 4242 9001 31337 59999 --receipts "$receipts"
echo "== verify (retrain every shard from scratch, compare weights bit for bit)"
$sisa verify --store "$store"
echo "== audit (the transparency log, its signed checkpoint)"
$sisa audit --store "$store"
echo "== a data subject checks their receipt with the operator's public key only"
.venv/bin/sisa-verify-receipt "$receipts/receipt-17.json" --key "$($sisa keys --public)"
echo "== status"
$sisa status --store "$store"
