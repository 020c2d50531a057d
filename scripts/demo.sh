#!/usr/bin/env bash
# The embedded default: set up .venv, build the tiny task + tokenizer + policy/expert models (cached), print the
# baseline table. Later: a MENTOR training run on CPU ending with a results table and plots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mentor.models.tiny "$@"
