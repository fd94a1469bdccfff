/* jupyter-swapserve's allocation interposer: shared declarations of its three parts.
 *   hooks.c    the entry points the engine calls (dlsym, cuGetProcAddress, the driver's allocation
 *              and virtual-memory calls) and the real driver's entry points behind them
 *   memory.c   the books (every device allocation the library backs), sleep, wake, the staging
 *   control.c  the control socket: a thread serving status / prepare / sleep / wake
 * The approach (reserve a VA range, cuMemCreate + cuMemMap into it, so that a release and a
 * re-map at the same address keep every pointer valid) is torch-memory-saver's (MIT,
 * github.com/fzyzcjy/torch_memory_saver, csrc/core.cpp); see docs/interposer.md for what was
 * reused and what this library adds. */
#pragma once
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda_abi.h"

#define SWI_EXPORT __attribute__((visibility("default")))

/* Bind the few glibc functions that got new symbol versions in glibc 2.32-2.34 to their old
 * versions, so the library built on a new system loads into engines (and container images) with
 * glibc 2.28 or later; the Makefile keeps libdl and libpthread as dependencies for the systems
 * where these functions still live there. `objdump -T` of the library shows nothing above 2.28. */
#if defined(__x86_64__)
__asm__(".symver dlopen,dlopen@GLIBC_2.2.5");
__asm__(".symver dlerror,dlerror@GLIBC_2.2.5");
__asm__(".symver dlvsym,dlvsym@GLIBC_2.2.5");
__asm__(".symver dl_iterate_phdr,dl_iterate_phdr@GLIBC_2.2.5");
__asm__(".symver pthread_create,pthread_create@GLIBC_2.2.5");
__asm__(".symver pthread_once,pthread_once@GLIBC_2.2.5");
__asm__(".symver pthread_sigmask,pthread_sigmask@GLIBC_2.2.5");
__asm__(".symver pthread_atfork,pthread_atfork@GLIBC_2.2.5");
__asm__(".symver pthread_attr_setdetachstate,pthread_attr_setdetachstate@GLIBC_2.2.5");
#endif
#define SWI_LOG_PREFIX "[swapserve-interposer] "

/* ---- the real driver (resolved from libcuda.so.1, never through our own exported names) ---- */
typedef struct {
    CUresult (*cuGetProcAddress_v2)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);
    CUresult (*cuGetProcAddress)(const char *, void **, int, cuuint64_t);
    CUresult (*cuMemAlloc_v2)(CUdeviceptr *, size_t);
    CUresult (*cuMemFree_v2)(CUdeviceptr);
    CUresult (*cuMemAllocManaged)(CUdeviceptr *, size_t, unsigned int);
    CUresult (*cuMemAllocPitch_v2)(CUdeviceptr *, size_t *, size_t, size_t, unsigned int);
    CUresult (*cuMemAllocAsync)(CUdeviceptr *, size_t, CUstream);
    CUresult (*cuMemAllocAsync_ptsz)(CUdeviceptr *, size_t, CUstream);
    CUresult (*cuMemAllocFromPoolAsync)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
    CUresult (*cuMemAllocFromPoolAsync_ptsz)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
    CUresult (*cuMemCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
    CUresult (*cuMemRelease)(CUmemGenericAllocationHandle);
    CUresult (*cuMemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*cuMemUnmap)(CUdeviceptr, size_t);
    CUresult (*cuMemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*cuMemRetainAllocationHandle)(CUmemGenericAllocationHandle *, void *);
    CUresult (*cuMemGetAllocationPropertiesFromHandle)(CUmemAllocationProp *, CUmemGenericAllocationHandle);
    CUresult (*cuMemExportToShareableHandle)(void *, CUmemGenericAllocationHandle, int, unsigned long long);
    /* used by the library itself, not hooked */
    CUresult (*cuMemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*cuMemAddressFree)(CUdeviceptr, size_t);
    CUresult (*cuMemGetAllocationGranularity)(size_t *, const CUmemAllocationProp *, int);
    CUresult (*cuDeviceGetAttribute)(int *, CUdevice_attribute, CUdevice);
    CUresult (*cuCtxGetCurrent)(CUcontext *);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuCtxGetDevice)(CUdevice *);
    CUresult (*cuCtxSynchronize)(void);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuStreamCreate)(CUstream *, unsigned int);
    CUresult (*cuStreamSynchronize)(CUstream);
    CUresult (*cuMemcpyDtoHAsync_v2)(void *, CUdeviceptr, size_t, CUstream);
    CUresult (*cuMemcpyHtoDAsync_v2)(CUdeviceptr, const void *, size_t, CUstream);
    CUresult (*cuMemHostAlloc)(void **, size_t, unsigned int);
    CUresult (*cuMemFreeHost)(void *);
    CUresult (*cuMemHostRegister_v2)(void *, size_t, unsigned int);
    CUresult (*cuMemHostUnregister)(void *);
    CUresult (*cuGetErrorName)(CUresult, const char **);
} swi_driver;

extern swi_driver swi_real;
/* resolves swi_real once (from the libcuda.so.1 the process has loaded, or loads it); 0 = ok */
int swi_resolve_driver(void);
const char *swi_error_name(CUresult r);
int swi_log_level(void);
void swi_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* hook counters, for the status (which paths the engine's calls took) */
typedef struct {
    unsigned long dlsym_redirects;      /* dlsym() of a hooked name answered with our entry point */
    unsigned long proc_address_redirects; /* cuGetProcAddress() answered with our entry point */
    unsigned long proc_address_passed;  /* cuGetProcAddress() of a hooked name left to the driver */
    unsigned long runtime_allocations;  /* cudaMalloc() calls backed at the runtime's own entry point */
} swi_hook_counters;
extern swi_hook_counters swi_hooks;

/* ---- the books (memory.c) ---- */
/* 1 when this process captures allocations: it serves the control socket (the first process of
 * the engine that allocates device memory binds it; the others pass everything through). */
int swi_capturing(void);

CUresult swi_mem_alloc(CUdeviceptr *dptr, size_t bytes);
CUresult swi_mem_free(CUdeviceptr dptr);
/* frees dptr if the library backs it (*owned = 1); leaves it alone otherwise (*owned = 0) */
CUresult swi_mem_free_owned(CUdeviceptr dptr, int *owned);
size_t swi_min_bytes(void);
CUresult swi_note_passthrough(CUdeviceptr ptr, size_t bytes, int kind);
CUresult swi_vmm_create(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                        unsigned long long flags);
CUresult swi_vmm_release(CUmemGenericAllocationHandle handle);
CUresult swi_vmm_map(CUdeviceptr va, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                     unsigned long long flags);
CUresult swi_vmm_unmap(CUdeviceptr va, size_t size);
CUresult swi_vmm_set_access(CUdeviceptr va, size_t size, const CUmemAccessDesc *desc, size_t count);
CUresult swi_vmm_retain(CUmemGenericAllocationHandle *handle, void *addr);
CUresult swi_vmm_properties(CUmemAllocationProp *prop, CUmemGenericAllocationHandle handle);
CUresult swi_vmm_export(void *out, CUmemGenericAllocationHandle handle, int type, unsigned long long flags);

/* what the library could not capture (reported, never silently ignored) */
enum swi_problem_kind {
    SWI_PROBLEM_MANAGED,        /* cuMemAllocManaged / cudaMallocManaged */
    SWI_PROBLEM_PITCH,          /* cuMemAllocPitch / cudaMallocPitch */
    SWI_PROBLEM_STREAM_ORDERED, /* cuMemAllocAsync / cuMemAllocFromPoolAsync (memory pools) */
    SWI_PROBLEM_FOREIGN,        /* a mapping of a handle the library did not create (imported) */
    SWI_PROBLEM_LEGACY,         /* a pre-3.2 (32-bit size) entry point was requested */
    SWI_PROBLEM_NO_VMM,         /* the device has no virtual memory management */
    SWI_PROBLEM_COUNT
};
void swi_note_problem(int kind, size_t bytes);
/* passthrough kinds (allocations left to the driver, tracked to keep the books) */
enum { SWI_PASS_SMALL = 0, SWI_PASS_MANAGED = 1, SWI_PASS_PITCH = 2, SWI_PASS_FALLBACK = 3 };

/* ---- operations the control channel asks for (memory.c); each writes one JSON object ---- */
typedef struct swi_buf {
    char *data;
    size_t len, cap;
} swi_buf;
void swi_buf_printf(swi_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void swi_buf_json_string(swi_buf *b, const char *s);
void swi_buf_free(swi_buf *b);

void swi_op_status(swi_buf *out);
void swi_op_sleep(swi_buf *out);
void swi_op_wake(swi_buf *out);
void swi_op_prepare(swi_buf *out);
void swi_op_release_staging(swi_buf *out);

/* ---- control.c ---- */
/* binds the socket named by SWAPSERVE_INTERPOSER_SOCKET and starts the serving thread; 1 when
 * this process now serves it, 0 when it does not (unset, refused, or another process serves it) */
int swi_control_start(void);
const char *swi_control_socket_path(void);
double swi_now(void);
