#!/usr/bin/env bash
# The test command: installs everything it needs into ./.venv (idempotent, quick once done),
# then runs the linter and the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
bash labextension/run-tests.sh   # the sidebar's TypeScript unit tests (jest)
python -m pytest -q -ra "$@"
