#!/usr/bin/env bash
# MENTOR on the embedded tiny task, on CPU: 2 FSDP ranks (gloo), tiny expert guiding tiny policy, ~1-2 minutes.
#   bash examples/train_tiny.sh [key=value ...]        e.g. algorithm.adv_estimator=grpo  trainer.max_steps=60
# Ends with a results table; plots and metrics.jsonl are in outputs/mentor/tiny_cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one torch thread per rank: small CPU ops thrash with more
exec "$PY" -m mentor.trainer.main --config-name tiny_cpu "$@"
