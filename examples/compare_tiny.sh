#!/usr/bin/env bash
# On-policy GRPO vs MENTOR on the embedded tiny task, equal steps and seeds; table + plots in outputs/compare_tiny/.
#   bash examples/compare_tiny.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m mentor.trainer.compare --config-name tiny_cpu --out outputs/compare_tiny "$@"
