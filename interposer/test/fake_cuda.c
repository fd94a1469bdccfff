/* A stand-in CUDA driver (built as libcuda.so.1) for testing the interposer on machines without a
 * GPU. Device memory is host memory with the driver's rules:
 *   cuMemAddressReserve  = mmap(PROT_NONE) of a range (nothing backed)
 *   cuMemCreate          = a memfd of the size (the "physical" memory; counted as backed)
 *   cuMemMap             = mmap(MAP_FIXED | MAP_SHARED) of that memfd into a reserved range, no access
 *   cuMemSetAccess       = mprotect to read/write
 *   cuMemUnmap           = back to PROT_NONE (the range stays reserved)
 *   cuMemRelease         = the memfd is closed once no mapping holds it (no longer backed)
 *   cuMemAlloc           = an anonymous read/write mapping (the driver's own allocation)
 * so a test engine reads and writes "device" memory through its pointers as a kernel would, an
 * access to a released range faults, and fakecuda_backed_bytes() says how much is backed now.
 * Copies check that the device range is mapped and accessible, as the driver does.
 * Capacity: FAKECUDA_TOTAL_BYTES (default 4 GiB); fakecuda_hog() takes some away (another tenant).
 * Pinned host allocations above FAKECUDA_MAX_PINNED_BYTES (default 2 GiB) are refused, like the
 * newer kernels that refuse large pinned allocations.
 * Faults: FAKECUDA_FAULTS names a file of lines "FUNCTION AFTER [ERROR]": the call of FUNCTION
 * after AFTER more successful ones fails with ERROR (default: out of memory for allocations,
 * unknown otherwise). The file is re-read whenever it changes. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../src/cuda_abi.h"

#define EXPORT __attribute__((visibility("default")))
#define GRAN ((size_t)2 << 20)
#define MAXN 4096

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

typedef struct {
    int used;
    int fd;
    size_t size;
    int handle_live; /* the creator's reference (cuMemRelease drops it) */
    int retains;     /* cuMemRetainAllocationHandle references */
    int maps;        /* live mappings */
    CUmemAllocationProp prop;
} phys_t;

typedef struct {
    int used;
    uintptr_t va;
    size_t size;
} resv_t;

typedef struct {
    int used;
    uintptr_t va;
    size_t size;
    int phys;
    int prot;
} map_t;

typedef struct {
    int used;
    uintptr_t va;
    size_t size;
    int kind; /* 0 cuMemAlloc, 1 managed, 2 pitch, 3 async */
} plain_t;

static phys_t phys[MAXN];
static resv_t resv[MAXN];
static map_t maps[MAXN];
static plain_t plain[MAXN];

static size_t total_bytes, backed_bytes, hog_bytes, pinned_bytes, max_host_alloc, max_pinned;
static unsigned long host_allocs, sync_calls;
static int ndevices = 1, vmm = 1, internal_pointers;
static int configured;

typedef struct {
    int device;
} ctx_t;
static ctx_t contexts[8];
static __thread CUcontext current;

static size_t env_size(const char *name, size_t fallback) {
    const char *v = getenv(name);
    return v && *v ? (size_t)strtoull(v, NULL, 10) : fallback;
}

static void configure(void) {
    if (configured) return;
    total_bytes = env_size("FAKECUDA_TOTAL_BYTES", (size_t)4 << 30);
    max_pinned = env_size("FAKECUDA_MAX_PINNED_BYTES", (size_t)2 << 30);
    ndevices = (int)env_size("FAKECUDA_DEVICES", 1);
    if (ndevices < 1 || ndevices > 8) ndevices = 1;
    vmm = getenv("FAKECUDA_NO_VMM") == NULL;
    const char *p = getenv("FAKECUDA_PROC_POINTERS");
    internal_pointers = p && !strcmp(p, "internal");
    for (int i = 0; i < 8; i++) contexts[i].device = i;
    configured = 1;
}

/* ------------------------------------------------------------------ faults */
typedef struct {
    char name[64];
    long after;
    int error;
} rule_t;
static rule_t rules[32];
static int nrules;
static struct timespec rules_mtime;
static off_t rules_size = -1;
static ino_t rules_ino;

static int fault(const char *name, int default_error) {
    const char *path = getenv("FAKECUDA_FAULTS");
    if (!path) return 0;
    struct stat st;
    if (stat(path, &st) != 0) {
        nrules = 0;
        rules_size = -1;
        return 0;
    }
    if (st.st_mtim.tv_sec != rules_mtime.tv_sec || st.st_mtim.tv_nsec != rules_mtime.tv_nsec ||
        st.st_size != rules_size || st.st_ino != rules_ino) {
        rules_mtime = st.st_mtim;
        rules_size = st.st_size;
        rules_ino = st.st_ino;
        nrules = 0;
        FILE *f = fopen(path, "r");
        if (f) {
            char line[256];
            while (nrules < 32 && fgets(line, sizeof line, f)) {
                rule_t r = {.error = 0};
                int n = sscanf(line, "%63s %ld %d", r.name, &r.after, &r.error);
                if (n >= 2) rules[nrules++] = r;
            }
            fclose(f);
        }
    }
    for (int i = 0; i < nrules; i++) {
        if (strcmp(rules[i].name, name) != 0) continue;
        if (rules[i].after-- > 0) return 0;
        int e = rules[i].error ? rules[i].error : default_error;
        rules[i] = rules[--nrules];
        fprintf(stderr, "[fakecuda] injected failure of %s: %d\n", name, e);
        return e;
    }
    return 0;
}

/* ------------------------------------------------------------------ device ranges */
static int slot(void *arr, size_t elem) {
    for (int i = 0; i < MAXN; i++)
        if (!*(int *)((char *)arr + (size_t)i * elem)) return i;
    return -1;
}

/* is [va, va+n) device memory the caller may read (need_write 0) or write (1)? */
static int device_range_ok(uintptr_t va, size_t n, int need_write) {
    for (int i = 0; i < MAXN; i++)
        if (plain[i].used && va >= plain[i].va && va + n <= plain[i].va + plain[i].size) return 1;
    uintptr_t at = va, end = va + n;
    while (at < end) {
        int found = 0;
        for (int i = 0; i < MAXN; i++) {
            map_t *m = &maps[i];
            if (!m->used || at < m->va || at >= m->va + m->size) continue;
            if (!(m->prot & PROT_READ) || (need_write && !(m->prot & PROT_WRITE))) return 0;
            at = m->va + m->size;
            found = 1;
            break;
        }
        if (!found) return 0;
    }
    return 1;
}

static size_t available(void) {
    size_t used = backed_bytes + hog_bytes;
    return used >= total_bytes ? 0 : total_bytes - used;
}

/* ------------------------------------------------------------------ init, devices, contexts */
EXPORT CUresult cuInit(unsigned int flags) {
    (void)flags;
    configure();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDriverGetVersion(int *v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    configure();
    if (!d || ordinal < 0 || ordinal >= ndevices) return CUDA_ERROR_INVALID_VALUE;
    *d = ordinal;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetCount(int *n) {
    configure();
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = ndevices;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetAttribute(int *value, int attr, CUdevice dev) {
    configure();
    if (!value || dev < 0 || dev >= ndevices) return CUDA_ERROR_INVALID_VALUE;
    *value = attr == CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED ? vmm : 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    configure();
    if (!bytes || dev < 0 || dev >= ndevices) return CUDA_ERROR_INVALID_VALUE;
    *bytes = total_bytes;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
    configure();
    if (!ctx || dev < 0 || dev >= ndevices) return CUDA_ERROR_INVALID_VALUE;
    *ctx = (CUcontext)&contexts[dev];
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    (void)dev;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    current = ctx;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetCurrent(CUcontext *ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = current;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetDevice(CUdevice *dev) {
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    *dev = ((ctx_t *)current)->device;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSynchronize(void) {
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    pthread_mutex_lock(&mu);
    int e = fault("cuCtxSynchronize", CUDA_ERROR_UNKNOWN);
    sync_calls++;
    pthread_mutex_unlock(&mu);
    return e ? e : CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreate(CUstream *s, unsigned int flags) {
    (void)flags;
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    *s = (CUstream)malloc(16);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamDestroy_v2(CUstream s) {
    free(s);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamSynchronize(CUstream s) {
    (void)s;
    return current ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}
EXPORT CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    configure();
    pthread_mutex_lock(&mu);
    if (free_bytes) *free_bytes = available();
    if (total) *total = total_bytes;
    pthread_mutex_unlock(&mu);
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ virtual memory management */
EXPORT CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *prop, int option) {
    (void)option;
    if (!g || !prop) return CUDA_ERROR_INVALID_VALUE;
    *g = GRAN;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t align, CUdeviceptr addr,
                                    unsigned long long flags) {
    (void)flags;
    configure();
    if (!ptr || size == 0 || size % GRAN) return CUDA_ERROR_INVALID_VALUE;
    if (align < GRAN) align = GRAN;
    pthread_mutex_lock(&mu);
    int i = slot(resv, sizeof resv[0]);
    if (i < 0) {
        pthread_mutex_unlock(&mu);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    void *want = (void *)(uintptr_t)addr;
    void *p = mmap(want, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        pthread_mutex_unlock(&mu);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    uintptr_t base = ((uintptr_t)p + align - 1) / align * align;
    if (base > (uintptr_t)p) munmap(p, base - (uintptr_t)p);
    uintptr_t end = (uintptr_t)p + size + align;
    if (end > base + size) munmap((void *)(base + size), end - (base + size));
    resv[i] = (resv_t){1, base, size};
    *ptr = base;
    pthread_mutex_unlock(&mu);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAXN; i++) {
        if (!resv[i].used || resv[i].va != ptr || resv[i].size != size) continue;
        for (int j = 0; j < MAXN; j++)
            if (maps[j].used && maps[j].va >= ptr && maps[j].va < ptr + size) {
                pthread_mutex_unlock(&mu);
                return CUDA_ERROR_ILLEGAL_STATE; /* still mapped */
            }
        munmap((void *)ptr, size);
        resv[i].used = 0;
        pthread_mutex_unlock(&mu);
        return CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&mu);
    return CUDA_ERROR_INVALID_VALUE;
}

#define HANDLE_BASE 0x1000ull
static phys_t *phys_of(CUmemGenericAllocationHandle h) {
    if (h < HANDLE_BASE || h >= HANDLE_BASE + MAXN) return NULL;
    phys_t *p = &phys[h - HANDLE_BASE];
    return p->used ? p : NULL;
}

static void phys_maybe_free(phys_t *p) {
    if (p->handle_live || p->retains || p->maps) return;
    close(p->fd);
    backed_bytes -= p->size;
    p->used = 0;
}

static CUresult impl_cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *prop,
                                 unsigned long long flags) {
    (void)flags;
    configure();
    if (!h || !prop || size == 0 || size % GRAN) return CUDA_ERROR_INVALID_VALUE;
    if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
        prop->location.id < 0 || prop->location.id >= ndevices)
        return CUDA_ERROR_INVALID_VALUE;
    if (!vmm) return CUDA_ERROR_NOT_SUPPORTED;
    pthread_mutex_lock(&mu);
    int e = fault("cuMemCreate", CUDA_ERROR_OUT_OF_MEMORY);
    if (!e && size > available()) e = CUDA_ERROR_OUT_OF_MEMORY;
    int i = e ? -1 : slot(phys, sizeof phys[0]);
    if (!e && i < 0) e = CUDA_ERROR_OUT_OF_MEMORY;
    int fd = -1;
    if (!e) {
        fd = memfd_create("fakecuda-physical", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)size) != 0) e = CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (e) {
        if (fd >= 0) close(fd);
        pthread_mutex_unlock(&mu);
        return e;
    }
    phys[i] = (phys_t){.used = 1, .fd = fd, .size = size, .handle_live = 1, .prop = *prop};
    backed_bytes += size;
    *h = HANDLE_BASE + (unsigned)i;
    pthread_mutex_unlock(&mu);
    return CUDA_SUCCESS;
}

static CUresult impl_cuMemRelease(CUmemGenericAllocationHandle h) {
    pthread_mutex_lock(&mu);
    phys_t *p = phys_of(h);
    int e = p ? fault("cuMemRelease", CUDA_ERROR_UNKNOWN) : CUDA_ERROR_INVALID_VALUE;
    if (!e) {
        if (p->retains > 0)
            p->retains--;
        else if (p->handle_live)
            p->handle_live = 0;
        else
            e = CUDA_ERROR_INVALID_VALUE;
        if (!e) phys_maybe_free(p);
    }
    pthread_mutex_unlock(&mu);
    return e ? e : CUDA_SUCCESS;
}

static int inside_reservation(uintptr_t va, size_t size) {
    for (int i = 0; i < MAXN; i++)
        if (resv[i].used && va >= resv[i].va && va + size <= resv[i].va + resv[i].size) return 1;
    return 0;
}

static CUresult impl_cuMemMap(CUdeviceptr va, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                              unsigned long long flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    phys_t *p = phys_of(h);
    int e = 0;
    if (!p || size == 0 || size % GRAN || offset % GRAN || offset + size > p->size || !inside_reservation(va, size))
        e = CUDA_ERROR_INVALID_VALUE;
    for (int i = 0; !e && i < MAXN; i++)
        if (maps[i].used && maps[i].va < va + size && va < maps[i].va + maps[i].size) e = CUDA_ERROR_INVALID_VALUE;
    if (!e) e = fault("cuMemMap", CUDA_ERROR_UNKNOWN);
    int i = e ? -1 : slot(maps, sizeof maps[0]);
    if (!e && i < 0) e = CUDA_ERROR_OUT_OF_MEMORY;
    if (!e && mmap((void *)va, size, PROT_NONE, MAP_SHARED | MAP_FIXED, p->fd, (off_t)offset) == MAP_FAILED)
        e = CUDA_ERROR_OUT_OF_MEMORY;
    if (!e) {
        maps[i] = (map_t){1, va, size, (int)(p - phys), PROT_NONE};
        p->maps++;
    }
    pthread_mutex_unlock(&mu);
    return e ? e : CUDA_SUCCESS;
}

static CUresult impl_cuMemUnmap(CUdeviceptr va, size_t size) {
    pthread_mutex_lock(&mu);
    /* the range must consist of whole mappings, one or several */
    size_t covered = 0;
    int e = 0;
    for (int i = 0; i < MAXN; i++) {
        map_t *m = &maps[i];
        if (!m->used || !(m->va < va + size && va < m->va + m->size)) continue;
        if (m->va < va || m->va + m->size > va + size) e = CUDA_ERROR_INVALID_VALUE;
        covered += m->size;
    }
    if (!e && covered != size) e = CUDA_ERROR_INVALID_VALUE;
    if (!e) e = fault("cuMemUnmap", CUDA_ERROR_UNKNOWN);
    for (int i = 0; !e && i < MAXN; i++) {
        map_t *m = &maps[i];
        if (!m->used || m->va < va || m->va + m->size > va + size) continue;
        mmap((void *)m->va, m->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
        phys_t *p = &phys[m->phys];
        p->maps--;
        m->used = 0;
        phys_maybe_free(p);
    }
    pthread_mutex_unlock(&mu);
    return e ? e : CUDA_SUCCESS;
}

static CUresult impl_cuMemSetAccess(CUdeviceptr va, size_t size, const CUmemAccessDesc *desc, size_t count) {
    configure();
    if (!desc || count == 0) return CUDA_ERROR_INVALID_VALUE;
    int prot = PROT_NONE;
    for (size_t k = 0; k < count; k++) {
        if (desc[k].location.type != CU_MEM_LOCATION_TYPE_DEVICE || desc[k].location.id < 0 ||
            desc[k].location.id >= ndevices)
            return CUDA_ERROR_INVALID_VALUE;
        if (desc[k].flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE) prot = PROT_READ | PROT_WRITE;
        else if (desc[k].flags == CU_MEM_ACCESS_FLAGS_PROT_READ && prot == PROT_NONE) prot = PROT_READ;
    }
    pthread_mutex_lock(&mu);
    /* every byte of the range must be mapped */
    uintptr_t at = va;
    int e = 0;
    while (!e && at < va + size) {
        int found = 0;
        for (int i = 0; i < MAXN; i++)
            if (maps[i].used && at >= maps[i].va && at < maps[i].va + maps[i].size) {
                at = maps[i].va + maps[i].size;
                found = 1;
                break;
            }
        if (!found) e = CUDA_ERROR_INVALID_VALUE;
    }
    if (!e) e = fault("cuMemSetAccess", CUDA_ERROR_UNKNOWN);
    if (!e && mprotect((void *)va, size, prot) != 0) e = CUDA_ERROR_INVALID_VALUE;
    for (int i = 0; !e && i < MAXN; i++)
        if (maps[i].used && maps[i].va >= va && maps[i].va + maps[i].size <= va + size) maps[i].prot = prot;
    pthread_mutex_unlock(&mu);
    return e ? e : CUDA_SUCCESS;
}

EXPORT CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *h, void *addr) {
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAXN; i++) {
        map_t *m = &maps[i];
        if (m->used && (uintptr_t)addr >= m->va && (uintptr_t)addr < m->va + m->size) {
            phys[m->phys].retains++;
            *h = HANDLE_BASE + (unsigned)m->phys;
            pthread_mutex_unlock(&mu);
            return CUDA_SUCCESS;
        }
    }
    pthread_mutex_unlock(&mu);
    return CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuMemGetAllocationPropertiesFromHandle(CUmemAllocationProp *prop, CUmemGenericAllocationHandle h) {
    pthread_mutex_lock(&mu);
    phys_t *p = phys_of(h);
    if (p && prop) *prop = p->prop;
    pthread_mutex_unlock(&mu);
    return p && prop ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuMemExportToShareableHandle(void *out, CUmemGenericAllocationHandle h, int type,
                                             unsigned long long flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    phys_t *p = phys_of(h);
    int e = !p || !out || type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR ? CUDA_ERROR_INVALID_VALUE : 0;
    if (!e) *(int *)out = dup(p->fd);
    pthread_mutex_unlock(&mu);
    return e ? e : CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ the driver's own allocations */
static CUresult plain_alloc(CUdeviceptr *dptr, size_t size, int kind) {
    configure();
    if (!dptr || size == 0) return CUDA_ERROR_INVALID_VALUE;
    if (kind != 1 && !current) return CUDA_ERROR_INVALID_CONTEXT;
    pthread_mutex_lock(&mu);
    int e = fault("cuMemAlloc", CUDA_ERROR_OUT_OF_MEMORY);
    if (!e && size > available()) e = CUDA_ERROR_OUT_OF_MEMORY;
    int i = e ? -1 : slot(plain, sizeof plain[0]);
    if (!e && i < 0) e = CUDA_ERROR_OUT_OF_MEMORY;
    void *p = MAP_FAILED;
    if (!e) p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!e && p == MAP_FAILED) e = CUDA_ERROR_OUT_OF_MEMORY;
    if (!e) {
        plain[i] = (plain_t){1, (uintptr_t)p, size, kind};
        backed_bytes += size;
        *dptr = (uintptr_t)p;
    }
    pthread_mutex_unlock(&mu);
    return e ? e : CUDA_SUCCESS;
}

static CUresult impl_cuMemAlloc_v2(CUdeviceptr *dptr, size_t size) { return plain_alloc(dptr, size, 0); }

static CUresult impl_cuMemFree_v2(CUdeviceptr dptr) {
    if (dptr == 0) return CUDA_SUCCESS;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAXN; i++)
        if (plain[i].used && plain[i].va == dptr) {
            munmap((void *)dptr, plain[i].size);
            backed_bytes -= plain[i].size;
            plain[i].used = 0;
            pthread_mutex_unlock(&mu);
            return CUDA_SUCCESS;
        }
    pthread_mutex_unlock(&mu);
    return CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t size, unsigned int flags) {
    (void)flags;
    return plain_alloc(dptr, size, 1);
}
EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height, unsigned int elem) {
    (void)elem;
    if (!pitch) return CUDA_ERROR_INVALID_VALUE;
    *pitch = (width + 511) / 512 * 512;
    return plain_alloc(dptr, *pitch * height, 2);
}
EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream s) {
    (void)s;
    return plain_alloc(dptr, size, 3);
}
EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t size, CUstream s) {
    (void)s;
    return plain_alloc(dptr, size, 3);
}
EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream s) {
    (void)s;
    return impl_cuMemFree_v2(dptr);
}

/* ------------------------------------------------------------------ copies */
static CUresult copy(void *dst, const void *src, size_t n, int dst_device, int src_device) {
    pthread_mutex_lock(&mu);
    int e = 0;
    if (dst_device && !device_range_ok((uintptr_t)dst, n, 1)) e = CUDA_ERROR_ILLEGAL_ADDRESS;
    if (src_device && !device_range_ok((uintptr_t)src, n, 0)) e = CUDA_ERROR_ILLEGAL_ADDRESS;
    if (!e) e = fault(dst_device ? (src_device ? "cuMemcpyDtoD" : "cuMemcpyHtoD") : "cuMemcpyDtoH",
                      CUDA_ERROR_UNKNOWN);
    pthread_mutex_unlock(&mu);
    if (e) return e;
    memcpy(dst, src, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) { return copy((void *)dst, src, n, 1, 0); }
EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) { return copy(dst, (void *)src, n, 0, 1); }
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy((void *)dst, (void *)src, n, 1, 1);
}
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
    (void)s;
    return copy((void *)dst, src, n, 1, 0);
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s) {
    (void)s;
    return copy(dst, (void *)src, n, 0, 1);
}

/* ------------------------------------------------------------------ pinned host memory */
EXPORT CUresult cuMemHostAlloc(void **pp, size_t size, unsigned int flags) {
    (void)flags;
    configure();
    /* as the driver: pinned memory is a context's (a thread without a current one gets this; the H200,
     * 2026-12-02, to the interposer's control thread on prepare) */
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    if (!pp || size == 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&mu);
    int e = fault("cuMemHostAlloc", CUDA_ERROR_OUT_OF_MEMORY);
    if (!e && size > max_pinned) e = CUDA_ERROR_OUT_OF_MEMORY;
    void *p = MAP_FAILED;
    if (!e) p = mmap(NULL, size + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (!e && p == MAP_FAILED) e = CUDA_ERROR_OUT_OF_MEMORY;
    if (!e) {
        *(size_t *)p = size; /* the size, in a header page before what the caller gets */
        *pp = (char *)p + 4096;
        pinned_bytes += size;
        host_allocs++;
        if (size > max_host_alloc) max_host_alloc = size;
    }
    pthread_mutex_unlock(&mu);
    return e ? e : CUDA_SUCCESS;
}
EXPORT CUresult cuMemAllocHost_v2(void **pp, size_t size) { return cuMemHostAlloc(pp, size, 0); }
EXPORT CUresult cuMemFreeHost(void *p) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    char *base = (char *)p - 4096;
    size_t size = *(size_t *)base;
    pthread_mutex_lock(&mu);
    pinned_bytes -= size;
    pthread_mutex_unlock(&mu);
    munmap(base, size + 4096);
    return CUDA_SUCCESS;
}

static struct {
    void *p;
    size_t size;
} registered[256];

EXPORT CUresult cuMemHostRegister_v2(void *p, size_t size, unsigned int flags) {
    (void)flags;
    configure();
    /* as the driver: pinned memory is a context's (a thread without a current one gets this; the H200,
     * 2026-12-02, to the interposer's control thread on prepare) */
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    if (!p || size == 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&mu);
    int e = fault("cuMemHostRegister", CUDA_ERROR_OUT_OF_MEMORY);
    if (!e && size > max_pinned) e = CUDA_ERROR_OUT_OF_MEMORY;
    int i = 0;
    while (!e && i < 256 && registered[i].p) i++;
    if (!e && i == 256) e = CUDA_ERROR_OUT_OF_MEMORY;
    if (!e) {
        registered[i].p = p;
        registered[i].size = size;
        pinned_bytes += size;
        host_allocs++;
        if (size > max_host_alloc) max_host_alloc = size;
    }
    pthread_mutex_unlock(&mu);
    return e ? e : CUDA_SUCCESS;
}
EXPORT CUresult cuMemHostUnregister(void *p) {
    pthread_mutex_lock(&mu);
    for (int i = 0; i < 256; i++)
        if (registered[i].p == p) {
            pinned_bytes -= registered[i].size;
            registered[i].p = NULL;
            pthread_mutex_unlock(&mu);
            return CUDA_SUCCESS;
        }
    pthread_mutex_unlock(&mu);
    return CUDA_ERROR_INVALID_VALUE;
}

/* ------------------------------------------------------------------ errors */
EXPORT CUresult cuGetErrorName(CUresult r, const char **name) {
    if (!name) return CUDA_ERROR_INVALID_VALUE;
    switch (r) {
    case CUDA_SUCCESS: *name = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *name = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case CUDA_ERROR_ILLEGAL_STATE: *name = "CUDA_ERROR_ILLEGAL_STATE"; break;
    case CUDA_ERROR_ILLEGAL_ADDRESS: *name = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *name = "CUDA_ERROR_NOT_SUPPORTED"; break;
    case CUDA_ERROR_UNKNOWN: *name = "CUDA_ERROR_UNKNOWN"; break;
    default: *name = "CUDA_ERROR_OTHER"; break;
    }
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGetErrorString(CUresult r, const char **s) { return cuGetErrorName(r, s); }

/* ------------------------------------------------------------------ exported names of the impls */
/* In the default mode the exported function *is* the one cuGetProcAddress hands out (as a real
 * driver's exports are); with FAKECUDA_PROC_POINTERS=internal cuGetProcAddress hands out distinct
 * internal functions, to test the interposer's by-name path. */
#define EXPORT_IMPL(ret, name, params, args) \
    EXPORT ret name params { return impl_##name args; }
EXPORT_IMPL(CUresult, cuMemCreate,
            (CUmemGenericAllocationHandle * h, size_t size, const CUmemAllocationProp *prop, unsigned long long f),
            (h, size, prop, f))
EXPORT_IMPL(CUresult, cuMemRelease, (CUmemGenericAllocationHandle h), (h))
EXPORT_IMPL(CUresult, cuMemMap,
            (CUdeviceptr va, size_t size, size_t off, CUmemGenericAllocationHandle h, unsigned long long f),
            (va, size, off, h, f))
EXPORT_IMPL(CUresult, cuMemUnmap, (CUdeviceptr va, size_t size), (va, size))
EXPORT_IMPL(CUresult, cuMemSetAccess, (CUdeviceptr va, size_t size, const CUmemAccessDesc *d, size_t n),
            (va, size, d, n))
EXPORT_IMPL(CUresult, cuMemAlloc_v2, (CUdeviceptr * d, size_t n), (d, n))
EXPORT_IMPL(CUresult, cuMemFree_v2, (CUdeviceptr d), (d))

EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags,
                                    CUdriverProcAddressQueryResult *status);

typedef struct {
    const char *base;
    void *exported;
    void *internal; /* NULL: same as exported */
    int min_version;
    void *per_thread;
} proc_t;

static const proc_t procs[] = {
    {"cuInit", (void *)cuInit, NULL, 2000, NULL},
    {"cuDriverGetVersion", (void *)cuDriverGetVersion, NULL, 2020, NULL},
    {"cuGetProcAddress", (void *)cuGetProcAddress_v2, NULL, 12000, NULL},
    {"cuDeviceGet", (void *)cuDeviceGet, NULL, 2000, NULL},
    {"cuDeviceGetCount", (void *)cuDeviceGetCount, NULL, 2000, NULL},
    {"cuDeviceGetAttribute", (void *)cuDeviceGetAttribute, NULL, 2000, NULL},
    {"cuDeviceTotalMem", (void *)cuDeviceTotalMem_v2, NULL, 3020, NULL},
    {"cuDevicePrimaryCtxRetain", (void *)cuDevicePrimaryCtxRetain, NULL, 7000, NULL},
    {"cuDevicePrimaryCtxRelease", (void *)cuDevicePrimaryCtxRelease_v2, NULL, 11000, NULL},
    {"cuCtxSetCurrent", (void *)cuCtxSetCurrent, NULL, 4000, NULL},
    {"cuCtxGetCurrent", (void *)cuCtxGetCurrent, NULL, 4000, NULL},
    {"cuCtxGetDevice", (void *)cuCtxGetDevice, NULL, 2000, NULL},
    {"cuCtxSynchronize", (void *)cuCtxSynchronize, NULL, 2000, NULL},
    {"cuStreamCreate", (void *)cuStreamCreate, NULL, 2000, NULL},
    {"cuStreamDestroy", (void *)cuStreamDestroy_v2, NULL, 4000, NULL},
    {"cuStreamSynchronize", (void *)cuStreamSynchronize, NULL, 2000, NULL},
    {"cuMemGetInfo", (void *)cuMemGetInfo_v2, NULL, 3020, NULL},
    {"cuMemAlloc", (void *)cuMemAlloc_v2, (void *)impl_cuMemAlloc_v2, 3020, NULL},
    {"cuMemFree", (void *)cuMemFree_v2, (void *)impl_cuMemFree_v2, 3020, NULL},
    {"cuMemAllocManaged", (void *)cuMemAllocManaged, NULL, 6000, NULL},
    {"cuMemAllocPitch", (void *)cuMemAllocPitch_v2, NULL, 3020, NULL},
    {"cuMemAllocAsync", (void *)cuMemAllocAsync, NULL, 11020, (void *)cuMemAllocAsync_ptsz},
    {"cuMemFreeAsync", (void *)cuMemFreeAsync, NULL, 11020, NULL},
    {"cuMemGetAllocationGranularity", (void *)cuMemGetAllocationGranularity, NULL, 10020, NULL},
    {"cuMemAddressReserve", (void *)cuMemAddressReserve, NULL, 10020, NULL},
    {"cuMemAddressFree", (void *)cuMemAddressFree, NULL, 10020, NULL},
    {"cuMemCreate", (void *)cuMemCreate, (void *)impl_cuMemCreate, 10020, NULL},
    {"cuMemRelease", (void *)cuMemRelease, (void *)impl_cuMemRelease, 10020, NULL},
    {"cuMemMap", (void *)cuMemMap, (void *)impl_cuMemMap, 10020, NULL},
    {"cuMemUnmap", (void *)cuMemUnmap, (void *)impl_cuMemUnmap, 10020, NULL},
    {"cuMemSetAccess", (void *)cuMemSetAccess, (void *)impl_cuMemSetAccess, 10020, NULL},
    {"cuMemRetainAllocationHandle", (void *)cuMemRetainAllocationHandle, NULL, 11000, NULL},
    {"cuMemGetAllocationPropertiesFromHandle", (void *)cuMemGetAllocationPropertiesFromHandle, NULL, 10020, NULL},
    {"cuMemExportToShareableHandle", (void *)cuMemExportToShareableHandle, NULL, 10020, NULL},
    {"cuMemcpyHtoD", (void *)cuMemcpyHtoD_v2, NULL, 3020, NULL},
    {"cuMemcpyDtoH", (void *)cuMemcpyDtoH_v2, NULL, 3020, NULL},
    {"cuMemcpyDtoD", (void *)cuMemcpyDtoD_v2, NULL, 3020, NULL},
    {"cuMemcpyHtoDAsync", (void *)cuMemcpyHtoDAsync_v2, NULL, 3020, NULL},
    {"cuMemcpyDtoHAsync", (void *)cuMemcpyDtoHAsync_v2, NULL, 3020, NULL},
    {"cuMemHostAlloc", (void *)cuMemHostAlloc, NULL, 2020, NULL},
    {"cuMemAllocHost", (void *)cuMemAllocHost_v2, NULL, 3020, NULL},
    {"cuMemFreeHost", (void *)cuMemFreeHost, NULL, 2000, NULL},
    {"cuMemHostRegister", (void *)cuMemHostRegister_v2, NULL, 6050, NULL},
    {"cuMemHostUnregister", (void *)cuMemHostUnregister, NULL, 4000, NULL},
    {"cuGetErrorName", (void *)cuGetErrorName, NULL, 6000, NULL},
    {"cuGetErrorString", (void *)cuGetErrorString, NULL, 6000, NULL},
};

EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags,
                                    CUdriverProcAddressQueryResult *status) {
    configure();
    if (!symbol || !pfn) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof procs / sizeof procs[0]; i++) {
        if (strcmp(procs[i].base, symbol) != 0) continue;
        if (version < procs[i].min_version) {
            *pfn = NULL;
            if (status) *status = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
            return CUDA_ERROR_NOT_FOUND;
        }
        void *p = internal_pointers && procs[i].internal ? procs[i].internal : procs[i].exported;
        if ((flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) && procs[i].per_thread) p = procs[i].per_thread;
        *pfn = p;
        if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
        return CUDA_SUCCESS;
    }
    *pfn = NULL;
    if (status) *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    return CUDA_ERROR_NOT_FOUND;
}

/* ------------------------------------------------------------------ what the tests read */
EXPORT size_t fakecuda_backed_bytes(void) {
    pthread_mutex_lock(&mu);
    size_t b = backed_bytes;
    pthread_mutex_unlock(&mu);
    return b;
}
EXPORT size_t fakecuda_pinned_bytes(void) { return pinned_bytes; }
EXPORT unsigned long fakecuda_host_allocs(void) { return host_allocs; }
EXPORT size_t fakecuda_max_host_alloc(void) { return max_host_alloc; }
EXPORT unsigned long fakecuda_sync_calls(void) { return sync_calls; }
EXPORT void fakecuda_hog(size_t bytes) {
    pthread_mutex_lock(&mu);
    hog_bytes = bytes;
    pthread_mutex_unlock(&mu);
}
/* 1 when [va, va+n) is device memory the engine can read and write now */
EXPORT int fakecuda_accessible(uintptr_t va, size_t n) {
    pthread_mutex_lock(&mu);
    int ok = device_range_ok(va, n, 1);
    pthread_mutex_unlock(&mu);
    return ok;
}
