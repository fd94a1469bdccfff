#!/usr/bin/env bash
# Builds the allocation interposer (interposer/build/libswapserve_interposer.so, loaded into engines
# with LD_PRELOAD for `swap: interposer`) and its CPU test kit (a stand-in CUDA driver and runtime,
# test engines), and checks its CUDA ABI against cuda.h when one is installed. Idempotent (make).
# Needs a C compiler and make, nothing of CUDA: the library dlopen()s libcuda.so.1 at run time.
# Usage: scripts/build-interposer.sh [CUDA_HOME=...] (extra arguments go to make)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v make >/dev/null || ! command -v "${CC:-cc}" >/dev/null; then
  echo "note: make or a C compiler (${CC:-cc}) is missing: the interposer is not built; swap: interposer" \
       "models use the checkpoint path and its tests skip" >&2
  exit 0
fi
make -s -C interposer all test-kit check-abi "$@"
