#!/usr/bin/env bash
# Builds llama.cpp's llama-server with CUDA for sm_90 (H100/H200) on the GPU machine, from the source
# that bench/gpu/stage.sh packed (llama.cpp b11434):
#   bash bench/gpu/build_llama.sh SRC_DIR BUILD_DIR [JOBS]
# cuBLAS: the toolkit's if it has one, else the nvidia-cublas wheel torch brought (nvidia/cu13); the
# binary gets that folder as its RPATH, so it runs with no LD_LIBRARY_PATH. cudart is linked
# dynamically (GGML_STATIC=OFF) so that an LD_PRELOAD interposer sees cudaMalloc; ggml's VMM pool
# calls the driver (libcuda) directly. Prints BUILD_LLAMA {json} last (seconds, size).
set -euo pipefail
SRC=$1
BUILD=$2
JOBS=${3:-$(nproc)}
t0=$(date +%s)
CUDA=${CUDA_HOME:-/usr/local/cuda}
extra=()
if [ ! -f "$CUDA/include/cublas_v2.h" ]; then
  wheel=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))" 2>/dev/null || true)
  [ -f "$wheel/include/cublas_v2.h" ] || wheel=$(dirname "$(dirname "$(find / -name cublas_v2.h -path '*nvidia*' 2>/dev/null | head -1)")")
  [ -f "$wheel/include/cublas_v2.h" ] || { echo "no cuBLAS headers found" >&2; exit 1; }
  links=$BUILD/cuda-links
  mkdir -p "$links"
  ln -sf "$wheel/lib/libcublas.so.13" "$links/libcublas.so"
  ln -sf "$wheel/lib/libcublasLt.so.13" "$links/libcublasLt.so"
  extra+=("-DCUDA_cublas_LIBRARY=$links/libcublas.so" "-DCUDA_cublasLt_LIBRARY=$links/libcublasLt.so"
          "-DCMAKE_CUDA_FLAGS=-I$wheel/include" "-DCMAKE_CXX_FLAGS=-I$wheel/include"
          "-DCMAKE_BUILD_RPATH=$wheel/lib")
fi
if ! ls "$CUDA"/lib64/stubs/libcuda.so "$CUDA"/lib64/libcuda.so >/dev/null 2>&1; then
  driver=$(ldconfig -p | awk '/libcuda\.so\.1 / {print $NF; exit}')
  [ -n "$driver" ] || driver=$(find /usr/local/nvidia /usr/lib* -name 'libcuda.so.1' 2>/dev/null | head -1)
  [ -n "$driver" ] && extra+=("-DCUDA_cuda_driver_LIBRARY=$driver")
fi
mkdir -p "$BUILD"
cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_CUDA_COMPILER="$CUDA/bin/nvcc" -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_CUDA_NCCL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_NUMBER=11434 "${extra[@]}" > "$BUILD/cmake.log" 2>&1 \
  || { tail -40 "$BUILD/cmake.log"; exit 1; }
t1=$(date +%s)
ninja -C "$BUILD" -j "$JOBS" llama-server > "$BUILD/ninja.log" 2>&1 || { tail -60 "$BUILD/ninja.log"; exit 1; }
t2=$(date +%s)
bin=$BUILD/bin/llama-server
strip -o "$bin.stripped" "$bin"
"$bin" --version 2>&1 | tail -2 || true
ldd "$bin" | grep -E "cuda|cublas" || true
printf 'BUILD_LLAMA {"configure_s": %d, "build_s": %d, "jobs": %d, "bytes": %d, "stripped_bytes": %d}\n' \
  $((t1 - t0)) $((t2 - t1)) "$JOBS" "$(stat -c %s "$bin")" "$(stat -c %s "$bin.stripped")"
