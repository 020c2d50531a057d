#!/usr/bin/env bash
# Tool-use MENTOR on the embedded tiny tool task, on CPU: multi-turn rollouts against the sandbox (started as a child
# process on 127.0.0.1), the teacher-optimized reward, 2 FSDP ranks (gloo). Builds the task on first use (~5 min).
#   bash examples/train_tool_tiny.sh [key=value ...]
#     e.g. worker.reward.reward_function=tool_sparse
#          algorithm.adv_estimator=mixed_grpo worker.rollout.n=4 algorithm.mentor.n_mix=4   (expert guidance)
# Ends with a results table; plots and metrics.jsonl are in outputs/mentor/tiny_tool/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m mentor.trainer.main --config-name tiny_tool "$@"
