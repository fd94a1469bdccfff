#!/usr/bin/env bash
# Runs the whole test suite (after scripts/setup.sh test).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
python -m pytest -q -ra "$@"
