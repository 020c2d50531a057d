#!/usr/bin/env bash
# GPU smoke test (see scripts/gpu_smoke.py): the GPU code paths on one GPU with the torch/CUDA already installed.
# Installs nothing. Uses .venv if present, else $PYTHON or python3. Exit 0 = all ran checks passed, 1 = a failure,
# 2 = no CUDA device.   bash scripts/gpu_smoke.sh [--device cpu] [--checks fsdp2,hf\ engine,...] [--timeout S]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/gpu_smoke.py "$@"
