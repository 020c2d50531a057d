#!/usr/bin/env bash
# Tool-use MENTOR (arXiv 2510.18383) as the official scripts/train/train_qwen2.5.sh runs it, on one 8-GPU node:
# Qwen2.5-7B-Instruct, GRPO + the teacher-optimized reward (tool_mentor), lr 1e-6, KL loss low_var_kl 0.001, entropy
# 0.001, clip 0.2, 32 prompts x 10 rollouts per step in mini-batches of 8 prompts, T 0.6 / top-k 20, up to 5 tool
# turns in 8192 tokens, 2 epochs, validation and checkpoints every 10 steps. All of it is configs/mentor_tool.yaml;
# this script adds paths and the flags below.
#
#   # once: MENTOR-data (huggingface.co/datasets/MENTOR-RL/MENTOR-data, data/{train,test}-00000-of-00001.parquet)
#   python -m mentor.data.tool_prep --input train-00000-of-00001.parquet --out data/mentor_tool/train.parquet
#   python -m mentor.data.tool_prep --input test-00000-of-00001.parquet --out data/mentor_tool/test.parquet
#   bash examples/train_tool.sh [--dry-run] [key=value ...]
#
# --dry-run: compose + validate the full config on any machine (CPU, offline), print it with the resource / batch /
# step / memory plan, start nothing. Environment (defaults in brackets):
#   POLICY_PATH [Qwen/Qwen2.5-7B-Instruct]   DATA_DIR [data/mentor_tool]   CONFIG [mentor_tool]
#   TRAIN_FILE [$DATA_DIR/train.parquet]   VAL_FILE [$DATA_DIR/test.parquet]
#   TOOLS_FILE [unset: rows carry their tools; e.g. configs/tools/math_tools.yaml for rows without]
#   SANDBOX_URL [unset: the trainer starts a sandbox on 127.0.0.1]   NNODES [1]  N_GPUS_PER_NODE [8]
#   RAY_ADDRESS [unset: local Ray]   EXPERIMENT [the config's experiment_name]   PYTHON [.venv/bin/python]
# Later key=value arguments override everything, e.g. MENTOR's expert guidance on top of GRPO:
#   bash examples/train_tool.sh algorithm.adv_estimator=mixed_grpo worker.rollout.expert.model_path=/path/to/expert
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

DRY_RUN=false
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=true ;;
    *) ARGS+=("$arg") ;;
  esac
done

CONFIG=${CONFIG:-mentor_tool}
DATA_DIR=${DATA_DIR:-data/mentor_tool}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/train.parquet}
VAL_FILE=${VAL_FILE:-$DATA_DIR/test.parquet}
OVERRIDES=(
  "data.train_files=$TRAIN_FILE"
  "data.val_files=$VAL_FILE"
  "trainer.nnodes=${NNODES:-1}"
  "trainer.n_gpus_per_node=${N_GPUS_PER_NODE:-8}"
  "trainer.dry_run=$DRY_RUN"
)
[[ -n "${POLICY_PATH:-}" ]] && OVERRIDES+=("worker.actor.model_path=$POLICY_PATH")
[[ -n "${TOOLS_FILE:-}" ]] && OVERRIDES+=("data.tools_file=$TOOLS_FILE")
[[ -n "${SANDBOX_URL:-}" ]] && OVERRIDES+=("worker.rollout.multi_turn.sandbox_url=$SANDBOX_URL")
[[ -n "${EXPERIMENT:-}" ]] && OVERRIDES+=("trainer.experiment_name=$EXPERIMENT")
[[ -n "${RAY_ADDRESS:-}" ]] && OVERRIDES+=("trainer.ray.address=$RAY_ADDRESS")

if [[ "$DRY_RUN" == false && ! -e "$TRAIN_FILE" && "$TRAIN_FILE" == *.* ]]; then
  echo "error: $TRAIN_FILE does not exist; prepare MENTOR-data first:" \
       "python -m mentor.data.tool_prep --input <MENTOR-data train parquet> --out $TRAIN_FILE" >&2
  exit 2
fi
export TOKENIZERS_PARALLELISM=false
exec "$PY" -m mentor.trainer.main --config-name "$CONFIG" "${OVERRIDES[@]}" ${ARGS[@]+"${ARGS[@]}"}
