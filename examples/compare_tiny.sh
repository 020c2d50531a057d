#!/usr/bin/env bash
# GRPO-8 vs MENTOR 4+4 (equal rollouts per prompt) on the embedded tiny task over seeds 1,2,3; table.md, curves.png
# and results.json in outputs/compare_tiny/. Extra arguments go to the harness (python -m mentor.trainer.compare -h):
#   bash examples/compare_tiny.sh [--variant hard] [--methods grpo,mentor,luffy,questa] [--jobs 2] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m mentor.trainer.compare --config-name tiny_cpu --methods grpo,mentor --seeds 1,2,3 \
    --out outputs/compare_tiny "$@"
