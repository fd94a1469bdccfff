/* The entry points an engine reaches: dlsym, cuGetProcAddress, and the driver's allocation and
 * virtual-memory calls, exported under libcuda's own names so LD_PRELOAD puts them first.
 *
 * Three ways an engine gets to the driver, all three covered:
 *  - a direct call into libcuda.so.1 (ggml's VMM pool links libcuda and calls cuMemCreate, ...):
 *    the dynamic linker binds it to our exported function of the same name;
 *  - the CUDA runtime (libcudart.so, and libcudart_static.a alike) dlopen()s libcuda.so.1, looks up
 *    cuGetProcAddress_v2 with dlsym() and takes every other entry point from it: a dlsym() with a
 *    handle searches that library only, so we interpose dlsym() itself and answer the hooked names
 *    with our functions, and our cuGetProcAddress answers the hooked names the same way;
 *  - cuGetProcAddress called directly (torch's driver API shim, cudaGetDriverEntryPoint): same.
 * And a fourth, for the dynamically linked runtime: cudaMalloc/cudaFree themselves are exported here
 * too (as torch-memory-saver's preload mode does), so an engine's cudaMalloc is backed at the
 * runtime's own entry point whichever private way the runtime would take to the driver
 * (SWAPSERVE_INTERPOSER_RUNTIME_HOOKS=0 leaves them to the runtime, for diagnosis).
 * Everything else goes to the driver untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>

#include "swi.h"

swi_driver swi_real;
swi_hook_counters swi_hooks;

/* ---------------------------------------------------------------- logging */
int swi_log_level(void) {
    static int level = -1;
    if (level < 0) {
        const char *v = getenv("SWAPSERVE_INTERPOSER_LOG");
        level = v && *v ? atoi(v) : 1;
    }
    return level;
}

void swi_log(int level, const char *fmt, ...) {
    if (swi_log_level() < level) return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    char full[1100];
    int m = snprintf(full, sizeof full, SWI_LOG_PREFIX "pid %d: %.*s", (int)getpid(), n, line);
    if (m > 0) {
        ssize_t ignored = write(2, full, (size_t)m < sizeof full ? (size_t)m : sizeof full - 1);
        (void)ignored;
    }
}

/* ---------------------------------------------------------------- the real dlsym */
typedef void *(*dlsym_fn)(void *, const char *);
static dlsym_fn real_dlsym_fn;

static dlsym_fn resolve_real_dlsym(void) {
    dlsym_fn fn = __atomic_load_n(&real_dlsym_fn, __ATOMIC_ACQUIRE);
    if (fn) return fn;
    /* glibc >= 2.34 has dlsym in libc at GLIBC_2.34; the GLIBC_2.2.5 version exists everywhere */
    fn = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!fn) fn = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    if (!fn) {
        swi_log(0, "cannot find the real dlsym: %s", dlerror());
        abort();
    }
    __atomic_store_n(&real_dlsym_fn, fn, __ATOMIC_RELEASE);
    return fn;
}

/* ---------------------------------------------------------------- the real driver */
static pthread_once_t driver_once = PTHREAD_ONCE_INIT;
static int driver_status = -1;

#define RESOLVE(name)                                                    \
    do {                                                                 \
        swi_real.name = (__typeof__(swi_real.name))dl(handle, #name);    \
    } while (0)

static void resolve_driver_once(void) {
    dlsym_fn dl = resolve_real_dlsym();
    /* the instance the process already loaded (the runtime's or the engine's own link) */
    void *handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!handle) handle = dlopen("libcuda.so.1", RTLD_NOW);
    if (!handle) {
        swi_log(0, "libcuda.so.1 not found (%s): every call passes through", dlerror());
        driver_status = 1;
        return;
    }
    RESOLVE(cuGetProcAddress_v2);
    RESOLVE(cuGetProcAddress);
    RESOLVE(cuMemAlloc_v2);
    RESOLVE(cuMemFree_v2);
    RESOLVE(cuMemAllocManaged);
    RESOLVE(cuMemAllocPitch_v2);
    RESOLVE(cuMemAllocAsync);
    RESOLVE(cuMemAllocAsync_ptsz);
    RESOLVE(cuMemAllocFromPoolAsync);
    RESOLVE(cuMemAllocFromPoolAsync_ptsz);
    RESOLVE(cuMemCreate);
    RESOLVE(cuMemRelease);
    RESOLVE(cuMemMap);
    RESOLVE(cuMemUnmap);
    RESOLVE(cuMemSetAccess);
    RESOLVE(cuMemRetainAllocationHandle);
    RESOLVE(cuMemGetAllocationPropertiesFromHandle);
    RESOLVE(cuMemExportToShareableHandle);
    RESOLVE(cuMemAddressReserve);
    RESOLVE(cuMemAddressFree);
    RESOLVE(cuMemGetAllocationGranularity);
    RESOLVE(cuDeviceGetAttribute);
    RESOLVE(cuCtxGetCurrent);
    RESOLVE(cuCtxSetCurrent);
    RESOLVE(cuCtxGetDevice);
    RESOLVE(cuCtxSynchronize);
    RESOLVE(cuDevicePrimaryCtxRetain);
    RESOLVE(cuStreamCreate);
    RESOLVE(cuStreamSynchronize);
    RESOLVE(cuMemcpyDtoHAsync_v2);
    RESOLVE(cuMemcpyHtoDAsync_v2);
    RESOLVE(cuMemHostAlloc);
    RESOLVE(cuMemFreeHost);
    RESOLVE(cuGetErrorName);
    RESOLVE(cuMemHostRegister_v2);
    RESOLVE(cuMemHostUnregister);
    /* what sleep and wake cannot do without */
    const void *needed[] = {swi_real.cuMemAlloc_v2, swi_real.cuMemFree_v2, swi_real.cuMemCreate,
                            swi_real.cuMemRelease, swi_real.cuMemMap, swi_real.cuMemUnmap,
                            swi_real.cuMemSetAccess, swi_real.cuMemAddressReserve, swi_real.cuMemAddressFree,
                            swi_real.cuMemGetAllocationGranularity, swi_real.cuCtxGetCurrent,
                            swi_real.cuCtxSetCurrent, swi_real.cuCtxGetDevice, swi_real.cuCtxSynchronize,
                            swi_real.cuStreamCreate, swi_real.cuStreamSynchronize,
                            swi_real.cuMemcpyDtoHAsync_v2, swi_real.cuMemcpyHtoDAsync_v2,
                            swi_real.cuMemHostAlloc, swi_real.cuMemFreeHost};
    for (size_t i = 0; i < sizeof needed / sizeof needed[0]; i++) {
        if (!needed[i]) {
            swi_log(0, "libcuda.so.1 lacks a virtual-memory entry point (#%zu): every call passes through", i);
            driver_status = 2;
            return;
        }
    }
    driver_status = 0;
}

int swi_resolve_driver(void) {
    pthread_once(&driver_once, resolve_driver_once);
    return driver_status;
}

const char *swi_error_name(CUresult r) {
    const char *name = NULL;
    if (swi_real.cuGetErrorName && swi_real.cuGetErrorName(r, &name) == CUDA_SUCCESS && name) return name;
    static __thread char buf[32];
    snprintf(buf, sizeof buf, "CUDA error %d", r);
    return buf;
}

/* SWAPSERVE_INTERPOSER_SOCKET set: this engine is to be swapped through the library. Without it
 * every hook is a plain pass-through (LD_PRELOAD leaks into child processes; they are left alone). */
static int swi_enabled(void) {
    static int enabled = -1;
    if (enabled < 0) {
        const char *s = getenv("SWAPSERVE_INTERPOSER_SOCKET");
        enabled = s && *s;
    }
    return enabled;
}

/* ---------------------------------------------------------------- the exported hooks */
#define REAL_OR_FAIL(name)                                          \
    do {                                                            \
        if (swi_resolve_driver() == 1 || !swi_real.name) return CUDA_ERROR_NOT_INITIALIZED; \
    } while (0)
/* capture only when the driver resolved completely and this process serves the socket */
static int capture(void) { return swi_enabled() && swi_resolve_driver() == 0 && swi_capturing(); }

SWI_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytes) {
    REAL_OR_FAIL(cuMemAlloc_v2);
    if (!capture()) return swi_real.cuMemAlloc_v2(dptr, bytes);
    return swi_mem_alloc(dptr, bytes);
}

SWI_EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr) {
    REAL_OR_FAIL(cuMemFree_v2);
    if (!swi_enabled() || swi_resolve_driver() != 0) return swi_real.cuMemFree_v2(dptr);
    return swi_mem_free(dptr);
}

SWI_EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytes, unsigned int flags) {
    REAL_OR_FAIL(cuMemAllocManaged);
    CUresult r = swi_real.cuMemAllocManaged(dptr, bytes, flags);
    if (r == CUDA_SUCCESS && capture()) swi_note_passthrough(*dptr, bytes, SWI_PASS_MANAGED);
    return r;
}

SWI_EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height,
                                       unsigned int element) {
    REAL_OR_FAIL(cuMemAllocPitch_v2);
    CUresult r = swi_real.cuMemAllocPitch_v2(dptr, pitch, width, height, element);
    if (r == CUDA_SUCCESS && capture()) swi_note_passthrough(*dptr, *pitch * height, SWI_PASS_PITCH);
    return r;
}

#define ASYNC_HOOK(name, ...)                                          \
    REAL_OR_FAIL(name);                                                \
    CUresult r = swi_real.name(__VA_ARGS__);                           \
    if (r == CUDA_SUCCESS && capture()) swi_note_problem(SWI_PROBLEM_STREAM_ORDERED, bytes); \
    return r;

SWI_EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytes, CUstream stream) {
    ASYNC_HOOK(cuMemAllocAsync, dptr, bytes, stream)
}
SWI_EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytes, CUstream stream) {
    ASYNC_HOOK(cuMemAllocAsync_ptsz, dptr, bytes, stream)
}
SWI_EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytes, CUmemoryPool pool, CUstream stream) {
    ASYNC_HOOK(cuMemAllocFromPoolAsync, dptr, bytes, pool, stream)
}
SWI_EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytes, CUmemoryPool pool,
                                                 CUstream stream) {
    ASYNC_HOOK(cuMemAllocFromPoolAsync_ptsz, dptr, bytes, pool, stream)
}

SWI_EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                                unsigned long long flags) {
    REAL_OR_FAIL(cuMemCreate);
    if (!capture()) return swi_real.cuMemCreate(handle, size, prop, flags);
    return swi_vmm_create(handle, size, prop, flags);
}

/* The calls below take a handle or an address: ours are translated, the rest pass through. */
#define BOOKS_OR_REAL(name, call, ...)                                          \
    REAL_OR_FAIL(name);                                                         \
    if (!swi_enabled() || swi_resolve_driver() != 0) return swi_real.name(__VA_ARGS__); \
    return call(__VA_ARGS__);

SWI_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    BOOKS_OR_REAL(cuMemRelease, swi_vmm_release, handle)
}
SWI_EXPORT CUresult cuMemMap(CUdeviceptr va, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                             unsigned long long flags) {
    BOOKS_OR_REAL(cuMemMap, swi_vmm_map, va, size, offset, handle, flags)
}
SWI_EXPORT CUresult cuMemUnmap(CUdeviceptr va, size_t size) { BOOKS_OR_REAL(cuMemUnmap, swi_vmm_unmap, va, size) }
SWI_EXPORT CUresult cuMemSetAccess(CUdeviceptr va, size_t size, const CUmemAccessDesc *desc, size_t count) {
    BOOKS_OR_REAL(cuMemSetAccess, swi_vmm_set_access, va, size, desc, count)
}
SWI_EXPORT CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr) {
    BOOKS_OR_REAL(cuMemRetainAllocationHandle, swi_vmm_retain, handle, addr)
}
SWI_EXPORT CUresult cuMemGetAllocationPropertiesFromHandle(CUmemAllocationProp *prop,
                                                           CUmemGenericAllocationHandle handle) {
    BOOKS_OR_REAL(cuMemGetAllocationPropertiesFromHandle, swi_vmm_properties, prop, handle)
}
SWI_EXPORT CUresult cuMemExportToShareableHandle(void *out, CUmemGenericAllocationHandle handle, int type,
                                                 unsigned long long flags) {
    BOOKS_OR_REAL(cuMemExportToShareableHandle, swi_vmm_export, out, handle, type, flags)
}

/* ---------------------------------------------------------------- the runtime's cudaMalloc */
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorUnknown = 999 };

static int find_runtime(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    if (info->dlpi_name && strstr(info->dlpi_name, "libcudart.so")) {
        snprintf((char *)data, 4096, "%s", info->dlpi_name);
        return 1;
    }
    return 0;
}

/* the runtime's own function: the next definition after ours, or the loaded libcudart's (a runtime
 * dlopen()ed with RTLD_LOCAL is not in the global scope RTLD_NEXT searches) */
static void *runtime_fn(const char *name) {
    void *fn = resolve_real_dlsym()(RTLD_NEXT, name);
    if (fn) return fn;
    char path[4096] = "";
    if (dl_iterate_phdr(find_runtime, path) && path[0]) {
        void *h = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
        if (h) fn = resolve_real_dlsym()(h, name);
    }
    return fn;
}

static int runtime_hooks(void) {
    static int on = -1;
    if (on < 0) {
        const char *v = getenv("SWAPSERVE_INTERPOSER_RUNTIME_HOOKS");
        on = !(v && !strcmp(v, "0"));
    }
    return on;
}

SWI_EXPORT cudaError_t cudaMalloc(void **ptr, size_t bytes) {
    static cudaError_t (*real_malloc)(void **, size_t);
    static cudaError_t (*real_free)(void *);
    if (!real_malloc) real_malloc = (cudaError_t(*)(void **, size_t))runtime_fn("cudaMalloc");
    if (!real_free) real_free = (cudaError_t(*)(void *))runtime_fn("cudaFree");
    if (!real_malloc || !real_free) return cudaErrorUnknown;
    if (!ptr) return cudaErrorInvalidValue;
    if (!runtime_hooks() || !capture() || bytes < swi_min_bytes()) return real_malloc(ptr, bytes);
    /* cudaFree(NULL): the runtime's idiom to make the current device's context current */
    cudaError_t e = real_free(NULL);
    if (e != cudaSuccess) return e;
    CUdeviceptr d = 0;
    CUresult r = swi_mem_alloc(&d, bytes);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) return cudaErrorMemoryAllocation;
    if (r != CUDA_SUCCESS) return cudaErrorUnknown;
    __atomic_add_fetch(&swi_hooks.runtime_allocations, 1, __ATOMIC_RELAXED);
    *ptr = (void *)(uintptr_t)d;
    return cudaSuccess;
}

SWI_EXPORT cudaError_t cudaFree(void *ptr) {
    static cudaError_t (*real_free)(void *);
    if (!real_free) real_free = (cudaError_t(*)(void *))runtime_fn("cudaFree");
    if (!real_free) return cudaErrorUnknown;
    if (ptr && swi_enabled() && swi_resolve_driver() == 0) {
        int owned = 0;
        CUresult r = swi_mem_free_owned((CUdeviceptr)(uintptr_t)ptr, &owned);
        if (owned) return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorUnknown;
    }
    return real_free(ptr);
}

/* ---------------------------------------------------------------- the lookup table */
SWI_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags,
                                        CUdriverProcAddressQueryResult *status);
SWI_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, cuuint64_t flags);

typedef struct {
    const char *exported; /* libcuda's exported name (what dlsym asks for) */
    const char *base;     /* the name cuGetProcAddress is asked for */
    int min_version;      /* cuGetProcAddress: the first API version of this variant */
    int max_version;      /* ... and the last (exclusive; 0 = none) */
    int per_thread;       /* the _ptsz variant (CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) */
    void *hook;
    void **real;          /* where the driver's own pointer is kept */
} swi_entry;

#define ENTRY(exp, base, minv, maxv, ptsz) {#exp, base, minv, maxv, ptsz, (void *)exp, (void **)&swi_real.exp}
static const swi_entry entries[] = {
    ENTRY(cuGetProcAddress_v2, "cuGetProcAddress", 12000, 0, 0),
    ENTRY(cuGetProcAddress, "cuGetProcAddress", 0, 12000, 0),
    ENTRY(cuMemAlloc_v2, "cuMemAlloc", 3020, 0, 0),
    ENTRY(cuMemFree_v2, "cuMemFree", 3020, 0, 0),
    ENTRY(cuMemAllocManaged, "cuMemAllocManaged", 0, 0, 0),
    ENTRY(cuMemAllocPitch_v2, "cuMemAllocPitch", 3020, 0, 0),
    ENTRY(cuMemAllocAsync, "cuMemAllocAsync", 0, 0, 0),
    ENTRY(cuMemAllocAsync_ptsz, "cuMemAllocAsync", 0, 0, 1),
    ENTRY(cuMemAllocFromPoolAsync, "cuMemAllocFromPoolAsync", 0, 0, 0),
    ENTRY(cuMemAllocFromPoolAsync_ptsz, "cuMemAllocFromPoolAsync", 0, 0, 1),
    ENTRY(cuMemCreate, "cuMemCreate", 0, 0, 0),
    ENTRY(cuMemRelease, "cuMemRelease", 0, 0, 0),
    ENTRY(cuMemMap, "cuMemMap", 0, 0, 0),
    ENTRY(cuMemUnmap, "cuMemUnmap", 0, 0, 0),
    ENTRY(cuMemSetAccess, "cuMemSetAccess", 0, 0, 0),
    ENTRY(cuMemRetainAllocationHandle, "cuMemRetainAllocationHandle", 0, 0, 0),
    ENTRY(cuMemGetAllocationPropertiesFromHandle, "cuMemGetAllocationPropertiesFromHandle", 0, 0, 0),
    ENTRY(cuMemExportToShareableHandle, "cuMemExportToShareableHandle", 0, 0, 0),
};
#define NENTRIES (sizeof entries / sizeof entries[0])

/* the pre-3.2 allocation entry points (32-bit sizes) the library does not back */
static int legacy_allocation_request(const char *symbol, int version) {
    return version < 3020 &&
           (!strcmp(symbol, "cuMemAlloc") || !strcmp(symbol, "cuMemAllocPitch") || !strcmp(symbol, "cuMemFree"));
}

/* the driver handed out *pfn for symbol: replace it with our entry point where we hook it */
static void redirect(const char *symbol, void **pfn, int version, cuuint64_t flags) {
    if (!symbol || !pfn || !*pfn || !swi_enabled() || swi_resolve_driver() != 0) return;
    const swi_entry *hit = NULL;
    /* by pointer: exactly the variant the driver chose */
    for (size_t i = 0; i < NENTRIES && !hit; i++)
        if (*entries[i].real && *pfn == *entries[i].real) hit = &entries[i];
    /* by name and version, where the driver returns pointers of its own */
    for (size_t i = 0; i < NENTRIES && !hit; i++) {
        const swi_entry *e = &entries[i];
        if (strcmp(e->base, symbol) != 0) continue;
        if (version < e->min_version || (e->max_version && version >= e->max_version)) continue;
        if (e->per_thread != ((flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) != 0)) continue;
        hit = e;
    }
    if (!hit) {
        if (legacy_allocation_request(symbol, version)) swi_note_problem(SWI_PROBLEM_LEGACY, 0);
        for (size_t i = 0; i < NENTRIES; i++)
            if (!strcmp(entries[i].base, symbol)) {
                __atomic_add_fetch(&swi_hooks.proc_address_passed, 1, __ATOMIC_RELAXED);
                swi_log(2, "cuGetProcAddress(%s, %d, %llu): left to the driver", symbol, version,
                        (unsigned long long)flags);
                break;
            }
        return;
    }
    *pfn = hit->hook;
    __atomic_add_fetch(&swi_hooks.proc_address_redirects, 1, __ATOMIC_RELAXED);
    swi_log(2, "cuGetProcAddress(%s, %d, %llu) -> %s", symbol, version, (unsigned long long)flags, hit->exported);
}

SWI_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags,
                                        CUdriverProcAddressQueryResult *status) {
    REAL_OR_FAIL(cuGetProcAddress_v2);
    CUresult r = swi_real.cuGetProcAddress_v2(symbol, pfn, version, flags, status);
    if (r == CUDA_SUCCESS) redirect(symbol, pfn, version, flags);
    return r;
}

SWI_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, cuuint64_t flags) {
    if (swi_resolve_driver() == 1) return CUDA_ERROR_NOT_INITIALIZED;
    CUresult r;
    if (swi_real.cuGetProcAddress)
        r = swi_real.cuGetProcAddress(symbol, pfn, version, flags);
    else if (swi_real.cuGetProcAddress_v2)
        r = swi_real.cuGetProcAddress_v2(symbol, pfn, version, flags, NULL);
    else
        return CUDA_ERROR_NOT_INITIALIZED;
    if (r == CUDA_SUCCESS) redirect(symbol, pfn, version, flags);
    return r;
}

/* dlsym: hooked names are answered with our entry points (when the library the caller asked has
 * them); every other lookup is handed on as a tail call, so that glibc still sees the caller's
 * return address and RTLD_NEXT keeps meaning "after the caller" (test: rtld_next in the tests).
 * The tail call needs sibling-call optimisation, forced here whatever CFLAGS say. */
__attribute__((optimize("O2", "optimize-sibling-calls"))) SWI_EXPORT void *dlsym(void *handle, const char *name) {
    const char *n = name; /* glibc declares it nonnull; callers pass NULL anyway */
    __asm__("" : "+r"(n));
    if (n && n[0] == 'c' && n[1] == 'u' && swi_enabled()) {
        for (size_t i = 0; i < NENTRIES; i++) {
            if (strcmp(entries[i].exported, name) != 0) continue;
            void *found = resolve_real_dlsym()(handle, name);
            if (!found || swi_resolve_driver() != 0) return found;
            __atomic_add_fetch(&swi_hooks.dlsym_redirects, 1, __ATOMIC_RELAXED);
            swi_log(2, "dlsym(%s) -> the interposer's entry point", name);
            return entries[i].hook;
        }
    }
    dlsym_fn fn = __atomic_load_n(&real_dlsym_fn, __ATOMIC_ACQUIRE);
    if (__builtin_expect(!fn, 0)) fn = resolve_real_dlsym();
    return fn(handle, name);
}
