#!/usr/bin/env bash
# Install what the tests need (into .venv) and run the suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,cpu
exec .venv/bin/python -m pytest tests "$@"
