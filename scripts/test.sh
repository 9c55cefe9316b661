#!/usr/bin/env bash
# Run the whole test suite (unit, Ray integration, CLI), after setting up .venv and the data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
