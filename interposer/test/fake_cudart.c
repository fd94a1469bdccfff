/* A stand-in CUDA runtime (built as libcudart.so.13, and linked statically into one test engine),
 * reaching the driver exactly as NVIDIA's runtime does (observed on libcudart.so.13 and
 * libcudart_static.a of CUDA 13.0): dlopen("libcuda.so.1"), dlsym(handle, "cuGetProcAddress_v2"),
 * then every entry point through cuGetProcAddress, the first of them cuGetProcAddress itself. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

#include "../src/cuda_abi.h"

#define EXPORT __attribute__((visibility("default")))
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorUnknown = 999 };

typedef CUresult (*gpa_t)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);
static struct {
    gpa_t gpa;
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuCtxSynchronize)(void);
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
    CUresult (*cuMemFree)(CUdeviceptr);
    CUresult (*cuMemAllocManaged)(CUdeviceptr *, size_t, unsigned);
    CUresult (*cuMemAllocAsync)(CUdeviceptr *, size_t, CUstream);
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t);
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
} drv;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static int init_error;
static CUcontext primary;
static __thread int context_set;

#define GET(field, name, version)                                                        \
    if (drv.gpa(name, (void **)&drv.field, version, 0, NULL) != CUDA_SUCCESS) {           \
        fprintf(stderr, "fake cudart: no %s\n", name);                                  \
        init_error = cudaErrorUnknown;                                                  \
        return;                                                                         \
    }

static void init(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    if (!h || !(drv.gpa = (gpa_t)dlsym(h, "cuGetProcAddress_v2"))) {
        init_error = cudaErrorUnknown;
        return;
    }
    gpa_t first = drv.gpa;
    if (first("cuGetProcAddress", (void **)&drv.gpa, 12000, 0, NULL) != CUDA_SUCCESS) drv.gpa = first;
    GET(cuInit, "cuInit", 2000)
    GET(cuDeviceGet, "cuDeviceGet", 2000)
    GET(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", 7000)
    GET(cuCtxSetCurrent, "cuCtxSetCurrent", 4000)
    GET(cuCtxSynchronize, "cuCtxSynchronize", 2000)
    GET(cuMemAlloc, "cuMemAlloc", 3020)
    GET(cuMemFree, "cuMemFree", 3020)
    GET(cuMemAllocManaged, "cuMemAllocManaged", 6000)
    GET(cuMemAllocAsync, "cuMemAllocAsync", 11020)
    GET(cuMemcpyHtoD, "cuMemcpyHtoD", 3020)
    GET(cuMemcpyDtoH, "cuMemcpyDtoH", 3020)
    CUdevice dev;
    if (drv.cuInit(0) || drv.cuDeviceGet(&dev, 0) || drv.cuDevicePrimaryCtxRetain(&primary, dev))
        init_error = cudaErrorUnknown;
}

static cudaError_t ready(void) {
    pthread_once(&once, init);
    if (init_error) return init_error;
    if (!context_set) {
        if (drv.cuCtxSetCurrent(primary)) return cudaErrorUnknown;
        context_set = 1;
    }
    return cudaSuccess;
}

static cudaError_t from(CUresult r) {
    return r == CUDA_SUCCESS ? cudaSuccess : r == CUDA_ERROR_OUT_OF_MEMORY ? cudaErrorMemoryAllocation : cudaErrorUnknown;
}

EXPORT cudaError_t cudaMalloc(void **p, size_t n) {
    cudaError_t e = ready();
    return e ? e : from(drv.cuMemAlloc((CUdeviceptr *)p, n));
}
EXPORT cudaError_t cudaFree(void *p) {
    cudaError_t e = ready();
    return e ? e : from(drv.cuMemFree((CUdeviceptr)p));
}
EXPORT cudaError_t cudaMallocManaged(void **p, size_t n, unsigned flags) {
    cudaError_t e = ready();
    return e ? e : from(drv.cuMemAllocManaged((CUdeviceptr *)p, n, flags ? flags : CU_MEM_ATTACH_GLOBAL));
}
EXPORT cudaError_t cudaMallocAsync(void **p, size_t n, void *stream) {
    cudaError_t e = ready();
    return e ? e : from(drv.cuMemAllocAsync((CUdeviceptr *)p, n, (CUstream)stream));
}
EXPORT cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, int kind) {
    cudaError_t e = ready();
    if (e) return e;
    if (kind == 1) return from(drv.cuMemcpyHtoD((CUdeviceptr)dst, src, n));
    if (kind == 2) return from(drv.cuMemcpyDtoH(dst, (CUdeviceptr)src, n));
    return cudaErrorInvalidValue;
}
EXPORT cudaError_t cudaDeviceSynchronize(void) {
    cudaError_t e = ready();
    return e ? e : from(drv.cuCtxSynchronize());
}
EXPORT cudaError_t cudaGetDriverEntryPoint(const char *symbol, void **fn, unsigned long long flags, int *status) {
    cudaError_t e = ready();
    return e ? e : from(drv.gpa(symbol, fn, 13000, flags, status));
}
