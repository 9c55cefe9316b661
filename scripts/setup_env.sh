#!/usr/bin/env bash
# Create .venv and install sisa with its dependencies; fetch Fashion-MNIST via apt when root.
# Idempotent: re-running with nothing changed takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.sisa-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  # The pinned CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi

# Fashion-MNIST from Debian when possible; otherwise sisa downloads it and checks its sha256.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null; then
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) || \
    (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
    echo "note: apt could not install dataset-fashion-mnist; sisa will download Fashion-MNIST instead" >&2
fi
