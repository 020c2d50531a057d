#!/usr/bin/env bash
# The embedded default, from nothing: set up .venv, build the tiny task + tokenizer + policy/expert (cached after the
# first time, ~2 min), then train MENTOR on CPU (2 FSDP ranks) and print the results table; plots go to the run dir.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash examples/train_tiny.sh "$@"
