/* A stand-in "engine" for the interposer's tests: it allocates device memory every way a real
 * engine does, fills it with a pattern through its pointers (as its kernels would), and then
 * answers commands on stdin, one JSON line each, so a test can sleep and wake it through the
 * interposer's socket and check that the same bytes are back at the same addresses.
 *
 *   fake_engine KIND:BYTES...      kinds:
 *     runtime   cudaMalloc (the runtime, which reaches the driver through dlsym + cuGetProcAddress)
 *     driver    cuMemAlloc, called directly (linked against libcuda.so.1)
 *     proc      cuMemAlloc taken from cuGetProcAddress
 *     entry     cuMemAlloc taken from cudaGetDriverEntryPoint (torch's way to the driver)
 *     pool      a ggml-style VMM pool: one VA reservation grown in 4 steps of cuMemCreate, cuMemMap,
 *               cuMemRelease, cuMemSetAccess (ggml-cuda.cu, ggml_cuda_pool_vmm::alloc)
 *     small     cudaMalloc below the capture threshold
 *     managed   cudaMallocManaged          async  cudaMallocAsync
 *     exported  a VMM allocation exported as a file descriptor
 *   stdin: verify | write SEED | stats | hog BYTES | alloc KIND:BYTES | free | quit */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../src/cuda_abi.h"

typedef int cudaError_t;
cudaError_t cudaMalloc(void **, size_t);
cudaError_t cudaFree(void *);
cudaError_t cudaMallocManaged(void **, size_t, unsigned);
cudaError_t cudaMallocAsync(void **, size_t, void *);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaGetDriverEntryPoint(const char *, void **, unsigned long long, int *);

CUresult cuInit(unsigned);
CUresult cuDeviceGet(CUdevice *, int);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, CUdevice);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuGetProcAddress_v2(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);
CUresult cuMemAddressReserve(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
CUresult cuMemAddressFree(CUdeviceptr, size_t);
CUresult cuMemCreate(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
CUresult cuMemRelease(CUmemGenericAllocationHandle);
CUresult cuMemMap(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
CUresult cuMemUnmap(CUdeviceptr, size_t);
CUresult cuMemSetAccess(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
CUresult cuMemExportToShareableHandle(void *, CUmemGenericAllocationHandle, int, unsigned long long);
CUresult cuMemGetAllocationGranularity(size_t *, const CUmemAllocationProp *, int);
size_t fakecuda_backed_bytes(void);
size_t fakecuda_pinned_bytes(void);
unsigned long fakecuda_host_allocs(void);
size_t fakecuda_max_host_alloc(void);
void fakecuda_hog(size_t);
int fakecuda_accessible(uintptr_t, size_t);

#define MAXA 64
typedef struct {
    char kind[16];
    uintptr_t ptr;
    size_t size;
    CUmemGenericAllocationHandle handle; /* exported */
} alloc_t;
static alloc_t allocs[MAXA];
static int nallocs;
static unsigned seed = 1;
static CUdeviceptr pool_base;
static size_t pool_size;
#define POOL_VA ((size_t)1 << 30)

static void die(const char *what, int code) {
    printf("{\"error\":\"%s\",\"code\":%d}\n", what, code);
    fflush(stdout);
    exit(1);
}

static CUmemAllocationProp device_prop(void) {
    CUmemAllocationProp p;
    memset(&p, 0, sizeof p);
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = 0;
    return p;
}

/* ggml's pool growth, step by step */
static uintptr_t pool_grow(size_t bytes) {
    CUmemAllocationProp prop = device_prop();
    size_t g = 0;
    cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
    size_t step = (bytes / 4 + g - 1) / g * g;
    if (!pool_base && cuMemAddressReserve(&pool_base, POOL_VA, 0, 0, 0)) die("cuMemAddressReserve", 0);
    uintptr_t start = pool_base + pool_size;
    for (int i = 0; i < 4; i++) {
        CUmemGenericAllocationHandle h;
        CUresult r = cuMemCreate(&h, step, &prop, 0);
        if (r) die("cuMemCreate", r);
        CUdeviceptr at = pool_base + pool_size;
        if ((r = cuMemMap(at, step, 0, h, 0))) die("cuMemMap", r);
        if ((r = cuMemRelease(h))) die("cuMemRelease", r); /* the mapping keeps it */
        CUmemAccessDesc a = {{CU_MEM_LOCATION_TYPE_DEVICE, 0}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
        if ((r = cuMemSetAccess(at, step, &a, 1))) die("cuMemSetAccess", r);
        pool_size += step;
    }
    return start;
}

static uintptr_t allocate(const char *kind, size_t size, size_t *actual, CUmemGenericAllocationHandle *handle) {
    void *p = NULL;
    CUdeviceptr d = 0;
    int r = 0;
    *actual = size;
    if (!strcmp(kind, "runtime") || !strcmp(kind, "small")) {
        r = cudaMalloc(&p, size);
        d = (uintptr_t)p;
    } else if (!strcmp(kind, "driver")) {
        r = cuMemAlloc_v2(&d, size);
    } else if (!strcmp(kind, "proc")) {
        CUresult (*fn)(CUdeviceptr *, size_t) = NULL;
        if ((r = cuGetProcAddress_v2("cuMemAlloc", (void **)&fn, 3020, 0, NULL)) == 0) r = fn(&d, size);
    } else if (!strcmp(kind, "entry")) {
        CUresult (*fn)(CUdeviceptr *, size_t) = NULL;
        if ((r = cudaGetDriverEntryPoint("cuMemAlloc", (void **)&fn, 0, NULL)) == 0) r = fn(&d, size);
    } else if (!strcmp(kind, "pool")) {
        d = pool_grow(size);
        *actual = pool_base + pool_size - d;
    } else if (!strcmp(kind, "managed")) {
        r = cudaMallocManaged(&p, size, 0);
        d = (uintptr_t)p;
    } else if (!strcmp(kind, "async")) {
        r = cudaMallocAsync(&p, size, NULL);
        d = (uintptr_t)p;
    } else if (!strcmp(kind, "exported")) {
        CUmemAllocationProp prop = device_prop();
        prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        size = (size + (2u << 20) - 1) / (2u << 20) * (2u << 20);
        *actual = size;
        CUmemAccessDesc a = {{CU_MEM_LOCATION_TYPE_DEVICE, 0}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
        int fd = -1;
        if ((r = cuMemAddressReserve(&d, size, 0, 0, 0)) || (r = cuMemCreate(handle, size, &prop, 0)) ||
            (r = cuMemMap(d, size, 0, *handle, 0)) || (r = cuMemSetAccess(d, size, &a, 1)) ||
            (r = cuMemExportToShareableHandle(&fd, *handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)))
            die("exported", r);
        close(fd);
    } else {
        die("unknown kind", 0);
    }
    if (r) die(kind, r);
    return d;
}

static unsigned char pattern(size_t i, int a) { return (unsigned char)(i * 31u + seed * 7u + (unsigned)a * 13u); }

static void fill(int a) {
    unsigned char *p = (unsigned char *)allocs[a].ptr;
    for (size_t i = 0; i < allocs[a].size; i++) p[i] = pattern(i, a);
}

static void add(const char *spec) {
    char kind[16];
    unsigned long long bytes;
    if (sscanf(spec, "%15[a-z]:%llu", kind, &bytes) != 2 || nallocs == MAXA) die("bad allocation spec", 0);
    alloc_t *a = &allocs[nallocs];
    snprintf(a->kind, sizeof a->kind, "%s", kind);
    a->ptr = allocate(kind, (size_t)bytes, &a->size, &a->handle);
    fill(nallocs);
    nallocs++;
}

static void print_allocs(void) {
    printf("[");
    for (int i = 0; i < nallocs; i++)
        printf("%s{\"kind\":\"%s\",\"ptr\":%llu,\"size\":%zu}", i ? "," : "", allocs[i].kind,
               (unsigned long long)allocs[i].ptr, allocs[i].size);
    printf("]");
}

static void verify(void) {
    size_t mismatches = 0, checked = 0;
    printf("{\"verify\":");
    int inaccessible = 0;
    for (int a = 0; a < nallocs; a++)
        if (!fakecuda_accessible(allocs[a].ptr, allocs[a].size)) inaccessible++;
    if (inaccessible) {
        printf("false,\"inaccessible\":%d}\n", inaccessible);
        return;
    }
    for (int a = 0; a < nallocs; a++) {
        const unsigned char *p = (const unsigned char *)allocs[a].ptr;
        for (size_t i = 0; i < allocs[a].size; i++, checked++) mismatches += p[i] != pattern(i, a);
    }
    printf("%s,\"checked\":%zu,\"mismatches\":%zu,\"allocations\":", mismatches ? "false" : "true", checked,
           mismatches);
    print_allocs();
    printf("}\n");
}

static void stats(void) {
    printf("{\"backed\":%zu,\"pinned\":%zu,\"host_allocs\":%lu,\"max_host_alloc\":%zu,\"accessible\":[",
           fakecuda_backed_bytes(), fakecuda_pinned_bytes(), fakecuda_host_allocs(), fakecuda_max_host_alloc());
    for (int a = 0; a < nallocs; a++)
        printf("%s%s", a ? "," : "", fakecuda_accessible(allocs[a].ptr, allocs[a].size) ? "true" : "false");
    printf("]}\n");
}

static void free_all(void) {
    for (int a = 0; a < nallocs; a++) {
        const char *k = allocs[a].kind;
        if (!strcmp(k, "pool")) continue;
        if (!strcmp(k, "exported")) {
            cuMemUnmap(allocs[a].ptr, allocs[a].size);
            cuMemRelease(allocs[a].handle);
            cuMemAddressFree(allocs[a].ptr, allocs[a].size);
        } else if (!strcmp(k, "driver") || !strcmp(k, "proc") || !strcmp(k, "entry")) {
            cuMemFree_v2(allocs[a].ptr);
        } else {
            cudaFree((void *)allocs[a].ptr);
        }
    }
    if (pool_base) { /* as ggml's pool destructor: one unmap of the whole pool, then the VA */
        cuMemUnmap(pool_base, pool_size);
        cuMemAddressFree(pool_base, POOL_VA);
        pool_base = 0;
        pool_size = 0;
    }
    nallocs = 0;
    printf("{\"freed\":true,\"backed\":%zu}\n", fakecuda_backed_bytes());
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* a context first, as an engine's startup does (the runtime would otherwise make it) */
    CUdevice dev;
    CUcontext ctx;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx))
        die("context", 0);
    for (int i = 1; i < argc; i++) add(argv[i]);
    printf("{\"ready\":true,\"pid\":%d,\"allocations\":", (int)getpid());
    print_allocs();
    printf("}\n");
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        unsigned long long n;
        char spec[64];
        if (!strcmp(line, "verify")) {
            verify();
        } else if (sscanf(line, "write %llu", &n) == 1) {
            seed = (unsigned)n;
            for (int a = 0; a < nallocs; a++) fill(a);
            printf("{\"written\":%u}\n", seed);
        } else if (!strcmp(line, "stats")) {
            stats();
        } else if (sscanf(line, "hog %llu", &n) == 1) {
            fakecuda_hog((size_t)n);
            printf("{\"hog\":%llu}\n", n);
        } else if (sscanf(line, "alloc %63s", spec) == 1) {
            add(spec);
            printf("{\"allocated\":true,\"allocations\":");
            print_allocs();
            printf("}\n");
        } else if (!strcmp(line, "free")) {
            free_all();
        } else if (!strcmp(line, "quit")) {
            break;
        } else {
            printf("{\"error\":\"unknown command\"}\n");
        }
    }
    return 0;
}
