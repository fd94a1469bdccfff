#!/usr/bin/env bash
# TypeScript unit tests of the sidebar (formatting, state, client, DOM patching), for CI.
# Usage: labextension/run-tests.sh [jest args]   (node >= 20.19; jlpm from jupyter_builder or jupyterlab)
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v jlpm >/dev/null && [ -f ../.venv/bin/activate ]; then
  . ../.venv/bin/activate
fi
command -v jlpm >/dev/null || { echo "jlpm not found: pip install jupyter_builder (or jupyterlab)" >&2; exit 1; }
jlpm install --immutable   # the committed yarn.lock, exactly
jlpm typecheck             # the sources and the tests type-check
jlpm test --ci "$@"
