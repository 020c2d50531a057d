#!/usr/bin/env bash
# The paper's MENTOR run (arXiv 2510.04140, App. B) on one 8-GPU node: Qwen2.5-7B policy, OpenR1-Qwen-7B expert,
# MATH levels 3-5 (train), MATH-500 (val), rollout batch 128, lr 1e-6, T 1.0, clip-high 0.28, 8 on-policy + 4 mixed
# rollouts, K = 4, p = 0.95, alpha cosine over 120 steps, responses up to 8192 tokens, SwanLab cloud when
# SWANLAB_API_KEY is set (else local). All of it is configs/mentor.yaml; this script adds paths and the flags below.
#
#   python examples/prepare_data.py --recipe math_l3to5 --out data/math_l3to5     # once, needs the HF Hub
#   bash examples/train.sh [--dry-run] [key=value ...]
#
# --dry-run: compose + validate the full config on any machine (CPU, offline), print it with the resource / batch /
# step plan, start nothing. Environment (defaults in brackets):
#   POLICY_PATH [Qwen/Qwen2.5-7B]   EXPERT_PATH [open-r1/OpenR1-Qwen-7B]   CONFIG [mentor]  (qwen2.5_3b, llama3.1_8b)
#   DATA_DIR [data/math_l3to5; llama3.1_8b: data/openr1_short]
#   TRAIN_FILE [$DATA_DIR/train.jsonl]   VAL_FILE [$DATA_DIR/val.jsonl]
#   NNODES [1]  N_GPUS_PER_NODE [8]  RAY_ADDRESS [unset: local Ray; "auto" on a cluster, see README multi-node]
#   PADDING_FREE [true: pack micro-batches, varlen flash-attention]   EXPERIMENT [the config's experiment_name]
#   SWANLAB_API_KEY [unset: SwanLab local: swanlab watch <run dir>/swanlog]   PYTHON [.venv/bin/python]
# Later key=value arguments override everything, e.g. algorithm.adv_estimator=grpo for the on-policy baseline.
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

CONFIG=${CONFIG:-mentor}
case "$CONFIG" in
  llama*) RECIPE=openr1_short ;;
  *) RECIPE=math_l3to5 ;;
esac
DATA_DIR=${DATA_DIR:-data/$RECIPE}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/train.jsonl}
VAL_FILE=${VAL_FILE:-$DATA_DIR/val.jsonl}
OVERRIDES=(
  "data.train_files=$TRAIN_FILE"
  "data.val_files=$VAL_FILE"
  "trainer.nnodes=${NNODES:-1}"
  "trainer.n_gpus_per_node=${N_GPUS_PER_NODE:-8}"
  "worker.actor.padding_free=${PADDING_FREE:-true}"
  "trainer.dry_run=$DRY_RUN"
)
[[ -n "${POLICY_PATH:-}" ]] && OVERRIDES+=("worker.actor.model_path=$POLICY_PATH")
[[ -n "${EXPERT_PATH:-}" ]] && OVERRIDES+=("worker.rollout.expert.model_path=$EXPERT_PATH")
[[ -n "${EXPERIMENT:-}" ]] && OVERRIDES+=("trainer.experiment_name=$EXPERIMENT")
[[ -n "${RAY_ADDRESS:-}" ]] && OVERRIDES+=("trainer.ray.address=$RAY_ADDRESS")

if [[ "$DRY_RUN" == false && ! -e "$TRAIN_FILE" && "$TRAIN_FILE" == *.* ]]; then
  echo "error: $TRAIN_FILE does not exist; run: python examples/prepare_data.py --recipe $RECIPE --out $DATA_DIR" >&2
  exit 2
fi
export TOKENIZERS_PARALLELISM=false
exec "$PY" -m mentor.trainer.main --config-name "$CONFIG" "${OVERRIDES[@]}" ${ARGS[@]+"${ARGS[@]}"}
