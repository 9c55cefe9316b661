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
  # The pin yields the CPU build only where pip is configured with a CPU wheel index (here pip.conf's find-links
  # /opt/wheels holds torch-2.13.0+cpu). Elsewhere `torch==2.13.0` resolves on PyPI to the default CUDA build.
  # The GPU machine keeps its own CUDA torch and never runs this script (README, "GPUs").
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi

# Ray's dashboard and job server (what `ray[default]` adds) for `ray job submit` in the real-cluster tests
# (tests/behaviour/test_cluster.py). Installed beside the venv, not into it: with them every local ray.init() starts
# the full dashboard agent, about 4 s more per start on 2 cores, and the test suite starts Ray many times.
# The cluster test puts this folder on the PYTHONPATH of its own Ray processes only.
ray_version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('ray'))")
extras=.venv/ray-dashboard
if [ ! -f "$extras/.installed-ray-$ray_version" ]; then
  rm -rf "$extras"
  mapfile -t reqs < <(.venv/bin/python - <<'PY'
import importlib.metadata as m
from packaging.requirements import Requirement
for text in m.requires("ray") or []:
    req = Requirement(text)
    if req.marker and req.marker.evaluate({"extra": "default"}) and not req.marker.evaluate({"extra": ""}):
        req.marker = None
        print(req)
PY
)
  .venv/bin/pip install -q --target "$extras" "${reqs[@]}"
  touch "$extras/.installed-ray-$ray_version"
fi

# Ray Serve's own packages (what `ray[serve]` adds beyond ray[default], without numpy: the venv's stays) for
# `sisa serve` and its tests (tests/serve). Beside the venv for the same reason as the dashboard's: in it, every local
# ray.init() would start the full dashboard agent. sisa.serve.deps puts this folder on the path of `sisa serve`.
serve_dir=.venv/ray-serve
if [ ! -f "$serve_dir/.installed-ray-$ray_version" ]; then
  rm -rf "$serve_dir"
  mapfile -t reqs < <(.venv/bin/python - <<'PY'
import importlib.metadata as m
from packaging.requirements import Requirement
def extra(name):
    out = {}
    for text in m.requires("ray") or []:
        req = Requirement(text)
        if req.marker and req.marker.evaluate({"extra": name}) and not req.marker.evaluate({"extra": ""}):
            req.marker = None
            out[req.name.lower()] = str(req)
    return out
default = extra("default")
for name, req in extra("serve").items():
    if name not in default and name != "numpy":
        print(req)
PY
)
  .venv/bin/pip install -q --target "$serve_dir" "${reqs[@]}"
  touch "$serve_dir/.installed-ray-$ray_version"
fi

# Fashion-MNIST from Debian when possible; otherwise sisa downloads it and checks its sha256.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null; then
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) || \
    (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
    echo "note: apt could not install dataset-fashion-mnist; sisa will download Fashion-MNIST instead" >&2
fi
