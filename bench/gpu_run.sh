#!/usr/bin/env bash
# The one command a GPU machine (the device tool) runs: install the carried wheels, record the
# environment, run the GPU tests and/or the swap-latency benchmark, and leave logs in $OUT.
#   bash bench/gpu_run.sh tests                 # tests/gpu (real Jupyter server, real checkpoints)
#   bash bench/gpu_run.sh bench [ARGS...]       # bench/swap_latency.py ARGS
#   bash bench/gpu_run.sh all [ARGS...]         # both
#   bash bench/gpu_run.sh contention [ARGS...]  # bench/pcie_duplex.py, then bench/contention.py ARGS
#   bash bench/gpu_run.sh interposer ARGS...     # tests/gpu/test_gpu_interposer.py, then bench/interposer_gpu.py ARGS
#                                               # (--llama-server BIN --gguf FILE); carry interposer/build too
#   bash bench/gpu_run.sh engines [ARGS...]     # bench/engines_gpu.py ARGS (vLLM, llama.cpp, reference; issue 25)
#   bash bench/gpu_run.sh engine-tests          # tests/gpu/test_gpu_engines.py (after bench/gpu/device.sh staged them)
#   bash bench/gpu_run.sh hub-kernels           # tests/gpu/test_gpu_hub_kernels.py and test_gpu_kernels.py (issue 21)
# Every mode runs the gate first: the GPU tests of what the virtual device cannot prove (docs/testing.md):
# the driver's answers, memory really leaving the GPU, the weights bit-identical after every swap
# (tests/gpu/test_gpu_checkpoint.py, tests/gpu/test_gpu_swap.py; tests and all run the whole of tests/gpu).
# GATE=0 skips it (said in env.txt); a failed gate fails the run, whatever the benchmark measured.
# Wheels: `bash ../shared/device/make-wheels.sh` here first, then carry [".whl"].
# Every step has its own `timeout`: a device call must never hang.
set -uo pipefail
OUT=${OUT:-/tmp/swapserve-out}
mkdir -p "$OUT"
what=${1:-all}
shift || true
TESTS_TIMEOUT=${TESTS_TIMEOUT:-420}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-540}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
  timeout 60 python3 -c "import torch, transformers; print('torch', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__)"
  timeout 60 python3 -c "import torch_memory_saver; print('torch_memory_saver ok')"
  grep cgroup2 /proc/mounts; nproc; free -g | head -2
  echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
} 2>&1 | tee "$OUT/env.txt"
echo "gate: ${GATE:-1}" | tee -a "$OUT/env.txt"
rc=0
if [ "$what" != tests ] && [ "$what" != all ] && [ "${GATE:-1}" != 0 ]; then
  timeout "${GATE_TIMEOUT:-240}" python3 -m pytest -q -s -rA -p no:cacheprovider -o addopts="" \
    tests/gpu/test_gpu_checkpoint.py tests/gpu/test_gpu_swap.py 2>&1 | tee "$OUT/gpu-gate.log"
  rc=$((rc | ${PIPESTATUS[0]}))
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout "$TESTS_TIMEOUT" python3 -m pytest -q -s -rA -p no:cacheprovider -o addopts="" tests/gpu 2>&1 \
    | tee "$OUT/gpu-tests.log"
  rc=$((rc | ${PIPESTATUS[0]}))
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout "$BENCH_TIMEOUT" python3 bench/swap_latency.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
  rc=$((rc | ${PIPESTATUS[0]}))
fi
if [ "$what" = contention ]; then
  timeout 120 python3 bench/pcie_duplex.py 2>&1 | tee "$OUT/pcie-duplex.log"
  timeout "$BENCH_TIMEOUT" python3 bench/contention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/contention.log"
  rc=$((rc | ${PIPESTATUS[0]}))
fi
if [ "$what" = interposer ]; then
  # the library as carried (interposer/build, built on the CPU machine), or built here
  [ -f interposer/build/libswapserve_interposer.so ] || bash scripts/build-interposer.sh
  timeout 120 python3 -m pytest -q -s -rA -p no:cacheprovider -o addopts="" tests/gpu/test_gpu_interposer.py 2>&1 \
    | tee "$OUT/interposer-gpu-tests.log"
  rc=$((rc | ${PIPESTATUS[0]}))
  timeout "${INTERPOSER_TIMEOUT:-420}" python3 bench/interposer_gpu.py --out "$OUT" --budget 400 "$@" 2>&1 \
    | tee "$OUT/interposer.log"
  rc=$((rc | ${PIPESTATUS[0]}))
fi
if [ "$what" = engines ]; then
  # --budget: the always-on baseline is skipped, and says so, when it would not finish before the timeout
  timeout "${ENGINES_TIMEOUT:-570}" python3 bench/engines_gpu.py --out "$OUT" --budget $(( ${ENGINES_TIMEOUT:-570} - 20 )) \
    "$@" 2>&1 | tee "$OUT/engines.log"
  rc=$((rc | ${PIPESTATUS[0]}))
fi
if [ "$what" = engine-tests ]; then
  timeout "$TESTS_TIMEOUT" python3 -m pytest -q -s -rA -p no:cacheprovider -o addopts="" tests/gpu/test_gpu_engines.py \
    2>&1 | tee "$OUT/gpu-engine-tests.log"
  rc=$((rc | ${PIPESTATUS[0]}))
fi
if [ "$what" = hub-kernels ]; then
  timeout "$TESTS_TIMEOUT" python3 -m pytest -q -s -rA -p no:cacheprovider -o addopts="" \
    tests/gpu/test_gpu_hub_kernels.py tests/gpu/test_gpu_kernels.py 2>&1 | tee "$OUT/gpu-hub-kernels.log"
  rc=$((rc | ${PIPESTATUS[0]}))
fi
# the engines' own logs (startup breakdown, sleep/wake timings, errors), as one file
tar czf "$OUT/engine-logs.tgz" -C /tmp jupyter-swapserve 2>/dev/null || true
exit $rc
