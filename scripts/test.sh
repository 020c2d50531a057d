#!/usr/bin/env bash
# Install what the tests need (into .venv), build the tiny task once, run the suite on MENTOR_TEST_WORKERS (2)
# pytest-xdist workers. Extra args go to pytest, e.g. `bash scripts/test.sh -m "not slow"` (the fast lane).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,cpu
export MENTOR_TINY_DIR="${MENTOR_TINY_DIR:-$PWD/.cache/tiny}"
workers="${MENTOR_TEST_WORKERS:-2}"
xdist=()
[ "$workers" != "0" ] && xdist=(-n "$workers" --dist loadfile)
# Tests that need the tiny task share one cached build; building it here (not inside a test worker) keeps the
# build out of any test's timeout. The fast lane (-m "not slow") uses none of it, so it skips the build.
if [[ " $* " != *"not slow"* ]]; then
  .venv/bin/python -m mentor.models.tiny --seed 0
fi
# the 20 slowest tests close the log: where CI time goes on the machine that ran it
exec .venv/bin/python -m pytest tests "${xdist[@]}" --durations=20 "$@"
