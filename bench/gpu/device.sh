#!/usr/bin/env bash
# The GPU machine's side of issue 25, one subcommand a device call (bench/gpu/PLAN.md lists the calls):
#   bash bench/gpu/device.sh start      # call 1: wheels to /tmp/site; llama.cpp source unpacked; the
#                                       #   llama-server build and the 8B models started in the background
#   bash bench/gpu/device.sh status     # what the background work has done so far
#   bash bench/gpu/device.sh vllm       # last staging call: parts reassembled, checked, installed to
#                                       #   /tmp/site-vllm, `import vllm` and its server checked
#   bash bench/gpu/device.sh wait [S]   # block until the build and the models are done (at most S s)
# Background work runs in its own session (setsid): it outlives the call and runs while the machine is
# warm. GPU25_SHAPE=tiny GPU25_DRY=1: a dry run of the mechanics on a CPU (no wheels, no build).
# Everything it leaves is under /tmp/gpu25 (W); logs are copied to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
W=${GPU25:-/tmp/gpu25}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
what=${1:-status}

install_wheels() {
  [ -d .whl ] && [ -z "${GPU25_DRY:-}" ] || return 0
  [ -f "$W/site.done" ] && return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 && touch "$W/site.done" || { echo "wheel install failed"; return 1; }
}

report() {
  for f in build models; do
    echo "== $f: $([ -f "$W/$f.rc" ] && echo "done, rc $(cat "$W/$f.rc")" || echo running)"
    tail -n 3 "$W/$f.log" 2>/dev/null
  done
  df -h /tmp | tail -1
  cp "$W"/build.log "$W"/models.log "$OUT/" 2>/dev/null || true
}

case $what in
start)
  rm -f "$W"/build.rc "$W"/models.rc
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee "$OUT/env.txt"
  install_wheels || exit 1
  (cd .stage && sha256sum -c --ignore-missing SHA256SUMS) || exit 1
  rm -rf "$W/llama.cpp" && tar xJf .stage/llama-src.tar.xz -C "$W" || exit 1
  # the build takes most cores; the model maker is one thread writing 15 GiB twice
  if [ -n "${GPU25_DRY:-}" ]; then echo skipped > "$W/build.log"; echo 0 > "$W/build.rc"; else
  setsid bash -c "bash bench/gpu/build_llama.sh $W/llama.cpp $W/llama-build $(( $(nproc) - 2 )) > $W/build.log 2>&1; echo \$? > $W/build.rc" \
    < /dev/null > /dev/null 2>&1 &
  fi
  setsid bash -c "python3 bench/gpu/make_models.py $W/models --shape ${GPU25_SHAPE:-llama-3.1-8b} --gguf $W/llama.cpp > $W/models.log 2>&1; echo \$? > $W/models.rc" \
    < /dev/null > /dev/null 2>&1 &
  sleep 5
  { python3 -c "import torch, transformers; print('torch', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__)"
    python3 -m pip list 2>/dev/null | grep -iE "^(numba|typing.extensions|anyio|triton|sentencepiece|safetensors|huggingface) "
    which gcc cc nvcc; nproc; free -g | head -2; }
  report
  ;;
status)
  report
  ;;
vllm)
  install_wheels || exit 1
  ls .stage/vllm.tar.part* || exit 1
  cat .stage/vllm.tar.part* > "$W/vllm.tar"
  (cd "$W" && grep vllm.tar "$OLDPWD/.stage/SHA256SUMS" | sha256sum -c -) || { echo "vllm.tar: parts missing or damaged"; exit 1; }
  rm -rf "$W/vllm-wheels" && mkdir -p "$W/vllm-wheels" && tar xf "$W/vllm.tar" -C "$W/vllm-wheels" && rm -f "$W/vllm.tar"
  # ONE pip call for every wheel: a later `pip install --target DIR --upgrade` of any wheel that has a
  # console script (apache-tvm-ffi has two) moves its own bin/ over DIR/bin and so deletes vllm's script.
  # The engines do not need that script (bench/engines_gpu.py starts `python3 -m vllm.entrypoints.cli.main`).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-vllm \
    "$W"/vllm-wheels/vllm/*.whl "$W"/vllm-wheels/deps/*.whl || exit 1
  # the imports `vllm serve` makes before it touches the GPU (the server, the engine core and its GPU
  # worker, the Llama model, structured output's lazy modules), the CUDA platform's kernels, and the
  # sampler's question to FlashInfer: FlashInfer is not staged (its kernels compile on first use), so
  # the engines run with VLLM_USE_FLASHINFER_SAMPLER=0 (PyTorch's top-k/top-p; bench/engines_gpu.py sets
  # it), without which vllm/v1/sample/ops/topk_topp_sampler.py imports FlashInfer's backend and the
  # engine core dies at start (the H200, 2026-12-02). No file of vLLM is patched.
  PYTHONPATH=/tmp/site-vllm VLLM_USE_FLASHINFER_SAMPLER=0 timeout 300 python3 -c "
import time; t = time.perf_counter()
import vllm, vllm.entrypoints.openai.api_server, vllm.entrypoints.cli.main
import vllm.v1.engine.core, vllm.v1.worker.gpu_worker, vllm.model_executor.models.llama, vllm.v1.structured_output
from vllm.platforms import current_platform
print('vllm', vllm.__version__, current_platform.device_name, f'{time.perf_counter() - t:.1f} s to import')
import vllm.vllm_flash_attn as fa
print('FA3', fa.is_fa_version_supported(3))
from vllm.v1.sample.ops.topk_topp_sampler import flashinfer_sampler_supported
print('FlashInfer sampler', flashinfer_sampler_supported(), '(False: PyTorch sampling, as the engines run)')
" 2>&1 | tail -6 | tee "$OUT/vllm-import.txt"
  imported=${PIPESTATUS[0]}
  report
  exit "$imported"
  ;;
wait)
  deadline=$(( $(date +%s) + ${2:-540} ))
  while { [ ! -f "$W/build.rc" ] || [ ! -f "$W/models.rc" ]; } && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
  report
  [ "$(cat "$W/build.rc" 2>/dev/null)" = 0 ] && [ "$(cat "$W/models.rc" 2>/dev/null)" = 0 ]
  ;;
*)
  echo "usage: $0 start|status|vllm|wait [SECONDS]" >&2; exit 2
  ;;
esac
