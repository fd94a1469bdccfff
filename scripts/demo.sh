#!/usr/bin/env bash
# The demo: installs what it needs (first run: about 6 minutes, llama.cpp builds from source),
# then starts JupyterLab with the swap service and two real CPU models (gemma, smollm2) on a
# virtual device with room for one of them; a third, smollm2-vllm, when vLLM is installed
# (SWAPSERVE_VLLM=1 bash scripts/demo.sh installs it: about 2 more minutes and 3.4 GB, once).
# Extra arguments go to `jupyter lab`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
. .venv/bin/activate
export HF_HUB_OFFLINE=1
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-root)
models="$(python scripts/demo_models.py .venv/demo-models.yaml)"
exec jupyter lab --SwapServe.models_file="$models" --ip=127.0.0.1 --no-browser "${extra[@]}" "$@"
