#!/usr/bin/env bash
# Evaluate a tool-use policy (configs/mentor_tool.yaml: multi-turn tool loop, up to 5 turns, one sample at T 0.7,
# top-p 0.9, as the official benchmark script) on local benchmark files; accuracy per data_source and per file, plus
# tool match / hallucination rate / turns per response, printed and written as JSON.
#
#   bash examples/eval_tool.sh data/bench/aime24.jsonl data/bench/amc23.parquet [-- key=value ...]
#
# Environment (defaults in brackets):
#   POLICY_PATH [the config's Qwen/Qwen2.5-7B-Instruct]   CHECKPOINT [unset; an HF folder or checkpoints/global_step_N]
#   TOOLS_FILE [configs/tools/math_tools.yaml: tools for rows without their own]   CONFIG [mentor_tool]
#   SANDBOX_URL [unset: a local sandbox]   OUT [<run dir>/eval.json]   N_GPUS_PER_NODE [8]   PYTHON [.venv/bin/python]
# Sampling: worker.rollout.val.{n,temperature,top_p,greedy}; e.g. -- worker.rollout.val.n=8 for avg@8 / pass@8.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

FILES=()
ARGS=()
seen_sep=false
for arg in "$@"; do
  if [[ "$arg" == "--" ]]; then seen_sep=true; continue; fi
  if $seen_sep; then ARGS+=("$arg"); else FILES+=("$arg"); fi
done
if [[ ${#FILES[@]} -eq 0 ]]; then
  echo "usage: bash examples/eval_tool.sh FILE [FILE ...] [-- key=value ...]" >&2
  exit 2
fi

OVERRIDES=(
  "data.tools_file=${TOOLS_FILE:-configs/tools/math_tools.yaml}"
  "trainer.n_gpus_per_node=${N_GPUS_PER_NODE:-8}"
)
[[ -n "${POLICY_PATH:-}" ]] && OVERRIDES+=("worker.actor.model_path=$POLICY_PATH")
[[ -n "${SANDBOX_URL:-}" ]] && OVERRIDES+=("worker.rollout.multi_turn.sandbox_url=$SANDBOX_URL")
EXTRA=()
[[ -n "${CHECKPOINT:-}" ]] && EXTRA+=(--checkpoint "$CHECKPOINT")
[[ -n "${OUT:-}" ]] && EXTRA+=(--out "$OUT")

export TOKENIZERS_PARALLELISM=false
exec "$PY" -m mentor.trainer.evaluate --config-name "${CONFIG:-mentor_tool}" ${EXTRA[@]+"${EXTRA[@]}"} \
  "${OVERRIDES[@]}" ${ARGS[@]+"${ARGS[@]}"} --files "${FILES[@]}"
