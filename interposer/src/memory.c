/* The books and the two operations on them.
 *
 * Every device allocation the library backs is a *segment* (physical memory: one cuMemCreate)
 * seen through one or more *mappings* (a VA range of it). A segment comes from
 *  - cuMemAlloc / cudaMalloc (own = 1): the library reserves a VA range, creates the memory, maps
 *    it and sets access, as torch-memory-saver does for cudaMalloc;
 *  - the engine's own cuMemCreate (ggml's VMM pool, torch's expandable segments): the engine gets a
 *    handle of ours (SWI_VH_TAG | n), so that a re-created segment keeps the handle it knows.
 *
 * Invariant: while awake every mapping is live (really mapped, with the access it was given);
 * while asleep every releasable segment has real == 0, its contents in the staging buffers
 * (staged), its mappings recorded but not live, and its VA ranges still reserved, so a wake puts
 * the same bytes back at the same addresses.
 *
 * sleep  = sync → stage (pinned chunks, kept across cycles) → copy_out → release (unmap, release)
 * wake   = create → map → access → copy_in
 * Each step is timed; a step that fails is undone with everything before it (restore() of the
 * segments touched), so a failed sleep leaves the engine awake and a failed wake leaves it asleep,
 * never half-mapped. If an undo itself fails the state is "broken" and every later request says so
 * (the service then restarts the engine from its startup snapshot). */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "swi.h"

#define SWI_VH_TAG 0x5357490000000000ULL /* "SWI": the handles the library gives the engine */
#define SWI_VH_MASK 0xffffff0000000000ULL
#define SWI_MAX_ACCESS 8
#define SWI_MAX_DEVICES 64
#define SWI_MAX_STEPS 8
#define SWI_DEFAULT_CHUNK (1ull << 30)
#define SWI_MAX_CHUNK (2ull << 30) /* newer kernels refuse larger pinned allocations */
#define SWI_DEFAULT_MIN_BYTES (1ull << 20)

/* ---------------------------------------------------------------- JSON text */
static void buf_reserve(swi_buf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra + 1) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) abort();
    b->data = p;
    b->cap = cap;
}

void swi_buf_printf(swi_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n > 0) {
        buf_reserve(b, (size_t)n);
        vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap2);
        b->len += (size_t)n;
    }
    va_end(ap2);
}

void swi_buf_json_string(swi_buf *b, const char *s) {
    swi_buf_printf(b, "\"");
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            swi_buf_printf(b, "\\%c", c);
        else if (c < 0x20)
            swi_buf_printf(b, "\\u%04x", c);
        else
            swi_buf_printf(b, "%c", c);
    }
    swi_buf_printf(b, "\"");
}

void swi_buf_free(swi_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

double swi_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------- the books */
typedef struct swi_segment swi_segment;

typedef struct {
    CUdeviceptr va;
    size_t size;
    size_t offset;
    swi_segment *seg; /* NULL: the mapping of a handle the library did not create */
    int live;         /* really mapped now */
    int fresh;        /* mapped by the restore in progress (its undo list) */
    CUmemAccessDesc access[SWI_MAX_ACCESS];
    size_t naccess;
} swi_mapping;

struct swi_segment {
    unsigned long long vhandle;
    CUmemGenericAllocationHandle real;    /* 0 while released */
    CUmemGenericAllocationHandle pending; /* created by the restore in progress */
    size_t size;
    CUmemAllocationProp prop;
    unsigned long long flags;
    CUcontext ctx;
    int own;            /* backs a cuMemAlloc: the library reserved own_va and frees it */
    CUdeviceptr own_va;
    int engine_refs;    /* the engine's references to the handle (create, retain - release) */
    int exported;       /* shared with another process: never released */
    int staged;         /* the staging buffers hold its contents (between a sleep and a wake) */
    size_t stage_offset;
};

typedef struct {
    CUdeviceptr ptr;
    size_t size;
    int kind; /* SWI_PASS_* */
} swi_pass;

static pthread_mutex_t books = PTHREAD_MUTEX_INITIALIZER;
static swi_segment **segs;
static size_t nsegs, capsegs;
static swi_mapping **maps;
static size_t nmaps, capmaps;
static swi_pass *passes;
static size_t npasses, cappasses;
static unsigned long long next_vhandle = 1;

static struct {
    unsigned long count;
    unsigned long long bytes;
} problems[SWI_PROBLEM_COUNT];
static const char *const problem_names[SWI_PROBLEM_COUNT] = {
    "managed", "pitch", "stream_ordered", "foreign_handle", "legacy_entry_point", "no_vmm"};
static const char *const problem_details[SWI_PROBLEM_COUNT] = {
    "managed memory (cuMemAllocManaged/cudaMallocManaged) cannot be released by the interposer",
    "pitched allocations (cuMemAllocPitch/cudaMallocPitch) are left to the driver",
    "stream-ordered allocations (cuMemAllocAsync/cudaMallocAsync, memory pools) stay in their pool",
    "memory mapped from a handle the interposer did not create (imported from another process)",
    "a pre-CUDA-3.2 allocation entry point (32-bit sizes) was requested",
    "the device has no virtual memory management: allocations were left to the driver"};

enum { SWI_AWAKE, SWI_ASLEEP, SWI_BROKEN };
static const char *const state_names[] = {"awake", "asleep", "broken"};
static int state = SWI_AWAKE;
static char broken_reason[1400];
static unsigned long sleeps, wakes, failures;
static swi_buf last_sleep, last_wake;

static struct {
    int known;
    int vmm;
    int rdma;
    size_t granularity;
} devices[SWI_MAX_DEVICES];

static size_t min_bytes = SWI_DEFAULT_MIN_BYTES;

/* the staging: pinned host chunks of chunk_bytes, kept across cycles (pinning is the slow part) */
static pthread_mutex_t staging = PTHREAD_MUTEX_INITIALIZER;
typedef struct {
    void *host;
    size_t size; /* chunk_bytes, or less for the last one a growth needed */
    int registered; /* 1: an mmap of transparent huge pages, cuMemHostRegister'ed; 0: cuMemHostAlloc */
} swi_chunk;
static swi_chunk *chunks;
static size_t nchunks, capchunks;
static int staging_hugepages = 1;   /* SWAPSERVE_INTERPOSER_STAGING=hugepages (default) | pinned */
static unsigned long hugepage_fallbacks; /* chunks that fell back to cuMemHostAlloc */
static size_t chunk_bytes = SWI_DEFAULT_CHUNK; /* the largest chunk */
static size_t staging_total;                   /* bytes of all chunks */
static unsigned long chunk_allocations; /* cuMemHostAlloc calls ever made */
static double pin_seconds;              /* time they took */

/* one stream per context for the copies */
static struct {
    CUcontext ctx;
    CUstream stream;
} streams[SWI_MAX_DEVICES];
static size_t nstreams;

static size_t env_size(const char *name, size_t fallback) {
    const char *v = getenv(name);
    if (!v || !*v) return fallback;
    char *end = NULL;
    unsigned long long n = strtoull(v, &end, 10);
    if (end == v) {
        swi_log(0, "%s=%s is not a number of bytes: using %zu", name, v, fallback);
        return fallback;
    }
    return (size_t)n;
}

/* ---------------------------------------------------------------- who captures */
static pthread_once_t capture_once = PTHREAD_ONCE_INIT;
static int serving;

static void after_fork_in_child(void) { serving = 0; } /* the control thread stays with the parent */

static void start_capturing(void) {
    min_bytes = env_size("SWAPSERVE_INTERPOSER_MIN_BYTES", SWI_DEFAULT_MIN_BYTES);
    chunk_bytes = env_size("SWAPSERVE_INTERPOSER_CHUNK_BYTES", SWI_DEFAULT_CHUNK);
    if (chunk_bytes > SWI_MAX_CHUNK) {
        swi_log(1, "SWAPSERVE_INTERPOSER_CHUNK_BYTES=%zu is above 2 GiB: using 2 GiB chunks", chunk_bytes);
        chunk_bytes = SWI_MAX_CHUNK;
    }
    if (chunk_bytes < (1u << 20)) chunk_bytes = 1u << 20;
    const char *kind = getenv("SWAPSERVE_INTERPOSER_STAGING");
    staging_hugepages = !(kind && !strcmp(kind, "pinned"));
    pthread_atfork(NULL, NULL, after_fork_in_child);
    serving = swi_control_start();
}

int swi_capturing(void) {
    pthread_once(&capture_once, start_capturing);
    return serving;
}

/* ---------------------------------------------------------------- book keeping */
#define PUSH(arr, n, cap, item)                                                   \
    do {                                                                          \
        if ((n) == (cap)) {                                                       \
            size_t c = (cap) ? (cap) * 2 : 64;                                    \
            void *p = realloc((arr), c * sizeof *(arr));                          \
            if (!p) abort();                                                      \
            (arr) = p;                                                            \
            (cap) = c;                                                            \
        }                                                                         \
        (arr)[(n)++] = (item);                                                    \
    } while (0)

static swi_segment *segment_by_handle(unsigned long long vh) {
    if ((vh & SWI_VH_MASK) != SWI_VH_TAG) return NULL;
    for (size_t i = 0; i < nsegs; i++)
        if (segs[i]->vhandle == vh) return segs[i];
    return NULL;
}

static swi_segment *new_segment(CUmemGenericAllocationHandle real, size_t size, const CUmemAllocationProp *prop,
                                unsigned long long flags, CUcontext ctx) {
    swi_segment *s = calloc(1, sizeof *s);
    if (!s) abort();
    s->vhandle = SWI_VH_TAG | next_vhandle++;
    s->real = real;
    s->size = size;
    s->prop = *prop;
    s->flags = flags;
    s->ctx = ctx;
    PUSH(segs, nsegs, capsegs, s);
    return s;
}

static void drop_segment(swi_segment *s) {
    for (size_t i = 0; i < nsegs; i++)
        if (segs[i] == s) {
            segs[i] = segs[--nsegs];
            break;
        }
    free(s);
}

static swi_mapping *new_mapping(CUdeviceptr va, size_t size, size_t offset, swi_segment *seg) {
    swi_mapping *m = calloc(1, sizeof *m);
    if (!m) abort();
    m->va = va;
    m->size = size;
    m->offset = offset;
    m->seg = seg;
    m->live = 1;
    PUSH(maps, nmaps, capmaps, m);
    return m;
}

static void drop_mapping_at(size_t i) {
    free(maps[i]);
    maps[i] = maps[--nmaps];
}

static size_t mapping_count(const swi_segment *s) {
    size_t n = 0;
    for (size_t i = 0; i < nmaps; i++) n += maps[i]->seg == s;
    return n;
}

/* the mapping through which a segment's bytes are copied: one that shows all of it */
static swi_mapping *covering_mapping(const swi_segment *s) {
    for (size_t i = 0; i < nmaps; i++)
        if (maps[i]->seg == s && maps[i]->offset == 0 && maps[i]->size == s->size) return maps[i];
    return NULL;
}

/* can a sleep release it? (all of it visible through one mapping, not shared, mapped now) */
static const char *not_releasable(const swi_segment *s) {
    if (s->exported) return "exported";
    if (!covering_mapping(s)) return mapping_count(s) ? "partly_mapped" : "unmapped";
    return NULL;
}

void swi_note_problem(int kind, size_t bytes) {
    pthread_mutex_lock(&books);
    problems[kind].count++;
    problems[kind].bytes += bytes;
    pthread_mutex_unlock(&books);
    swi_log(1, "cannot capture: %s (%zu bytes)", problem_details[kind], bytes);
}

CUresult swi_note_passthrough(CUdeviceptr ptr, size_t bytes, int kind) {
    pthread_mutex_lock(&books);
    swi_pass p = {ptr, bytes, kind};
    PUSH(passes, npasses, cappasses, p);
    pthread_mutex_unlock(&books);
    if (kind == SWI_PASS_MANAGED) swi_note_problem(SWI_PROBLEM_MANAGED, bytes);
    if (kind == SWI_PASS_PITCH) swi_note_problem(SWI_PROBLEM_PITCH, bytes);
    return CUDA_SUCCESS;
}

/* per device: does it do VMM, its granularity, GPUDirect RDMA with VMM (as torch-memory-saver) */
static int device_info(CUdevice dev, size_t *granularity, int *rdma) {
    if (dev < 0 || dev >= SWI_MAX_DEVICES) return 0;
    if (!devices[dev].known) {
        int vmm = 0, flag = 0;
        if (!swi_real.cuDeviceGetAttribute ||
            swi_real.cuDeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev) !=
                CUDA_SUCCESS)
            vmm = 0;
        if (swi_real.cuDeviceGetAttribute &&
            swi_real.cuDeviceGetAttribute(&flag, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED, dev) !=
                CUDA_SUCCESS)
            flag = 0;
        CUmemAllocationProp prop;
        memset(&prop, 0, sizeof prop);
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = dev;
        size_t g = 0;
        if (vmm && (swi_real.cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) !=
                        CUDA_SUCCESS ||
                    g == 0))
            vmm = 0;
        devices[dev].vmm = vmm;
        devices[dev].rdma = flag;
        devices[dev].granularity = g;
        devices[dev].known = 1;
    }
    *granularity = devices[dev].granularity;
    *rdma = devices[dev].rdma;
    return devices[dev].vmm;
}

/* ---------------------------------------------------------------- cuMemAlloc / cuMemFree */
CUresult swi_mem_alloc(CUdeviceptr *dptr, size_t bytes) {
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    if (bytes < min_bytes || bytes == 0) {
        /* small ones stay with the driver (a VMM allocation is a granule, 2 MiB, at least) */
        CUresult r = swi_real.cuMemAlloc_v2(dptr, bytes);
        if (r == CUDA_SUCCESS) swi_note_passthrough(*dptr, bytes, SWI_PASS_SMALL);
        return r;
    }
    CUcontext ctx = NULL;
    CUresult r = swi_real.cuCtxGetCurrent(&ctx);
    if (r != CUDA_SUCCESS) return r;
    if (!ctx) return CUDA_ERROR_INVALID_CONTEXT;
    CUdevice dev = 0;
    r = swi_real.cuCtxGetDevice(&dev);
    if (r != CUDA_SUCCESS) return r;
    size_t gran = 0;
    int rdma = 0;
    pthread_mutex_lock(&books);
    int vmm = device_info(dev, &gran, &rdma);
    pthread_mutex_unlock(&books);
    if (!vmm) {
        r = swi_real.cuMemAlloc_v2(dptr, bytes);
        if (r == CUDA_SUCCESS) {
            swi_note_passthrough(*dptr, bytes, SWI_PASS_SMALL);
            swi_note_problem(SWI_PROBLEM_NO_VMM, bytes);
        }
        return r;
    }
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev;
    if (rdma) prop.allocFlags.gpuDirectRDMACapable = 1;
    if (bytes > (size_t)-1 - gran) return CUDA_ERROR_OUT_OF_MEMORY;
    size_t size = (bytes + gran - 1) / gran * gran;

    /* reserve → create → map → access, each undone if a later one fails */
    CUdeviceptr va = 0;
    CUmemGenericAllocationHandle h = 0;
    r = swi_real.cuMemAddressReserve(&va, size, 0, 0, 0);
    if (r != CUDA_SUCCESS) return r;
    r = swi_real.cuMemCreate(&h, size, &prop, 0);
    if (r != CUDA_SUCCESS) goto free_va;
    r = swi_real.cuMemMap(va, size, 0, h, 0);
    if (r != CUDA_SUCCESS) goto release;
    CUmemAccessDesc access;
    memset(&access, 0, sizeof access);
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = dev;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    r = swi_real.cuMemSetAccess(va, size, &access, 1);
    if (r != CUDA_SUCCESS) goto unmap;

    pthread_mutex_lock(&books);
    swi_segment *s = new_segment(h, size, &prop, 0, ctx);
    s->own = 1;
    s->own_va = va;
    swi_mapping *m = new_mapping(va, size, 0, s);
    m->access[0] = access;
    m->naccess = 1;
    pthread_mutex_unlock(&books);
    swi_log(2, "cuMemAlloc(%zu) -> 0x%llx (%zu bytes, VMM-backed)", bytes, va, size);
    *dptr = va;
    return CUDA_SUCCESS;

unmap:
    swi_real.cuMemUnmap(va, size);
release:
    swi_real.cuMemRelease(h);
free_va:
    swi_real.cuMemAddressFree(va, size);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) return r; /* the engine's allocator frees its cache and retries */
    /* anything else (e.g. a call not allowed during a stream capture): the driver's own way, resident */
    swi_log(1, "backing %zu bytes with releasable memory failed (%s): left to the driver", bytes, swi_error_name(r));
    r = swi_real.cuMemAlloc_v2(dptr, bytes);
    if (r == CUDA_SUCCESS) swi_note_passthrough(*dptr, bytes, SWI_PASS_FALLBACK);
    return r;
}

size_t swi_min_bytes(void) { return min_bytes; }

CUresult swi_mem_free(CUdeviceptr dptr) {
    int owned = 0;
    CUresult r = swi_mem_free_owned(dptr, &owned);
    return owned ? r : swi_real.cuMemFree_v2(dptr);
}

CUresult swi_mem_free_owned(CUdeviceptr dptr, int *owned) {
    *owned = 0;
    pthread_mutex_lock(&books);
    swi_segment *s = NULL;
    for (size_t i = 0; i < nsegs; i++)
        if (segs[i]->own && segs[i]->own_va == dptr) {
            s = segs[i];
            break;
        }
    if (!s) {
        for (size_t i = 0; i < npasses; i++)
            if (passes[i].ptr == dptr) {
                passes[i] = passes[--npasses];
                break;
            }
        pthread_mutex_unlock(&books);
        return CUDA_SUCCESS;
    }
    *owned = 1;
    /* cuMemFree waits for the device; an unmap does not, so wait first as cudaFree would, in the
     * allocation's context (a cudaFree caller's thread may have none current yet) */
    CUcontext caller = NULL;
    swi_real.cuCtxGetCurrent(&caller);
    if (s->ctx && s->ctx != caller) swi_real.cuCtxSetCurrent(s->ctx);
    CUresult r = swi_real.cuCtxSynchronize();
    if (s->ctx && s->ctx != caller) swi_real.cuCtxSetCurrent(caller);
    if (r != CUDA_SUCCESS && r != CUDA_ERROR_INVALID_CONTEXT) {
        pthread_mutex_unlock(&books);
        return r;
    }
    for (size_t i = 0; i < nmaps;) {
        if (maps[i]->seg == s) {
            if (maps[i]->live) swi_real.cuMemUnmap(maps[i]->va, maps[i]->size);
            drop_mapping_at(i);
        } else {
            i++;
        }
    }
    if (s->real) swi_real.cuMemRelease(s->real);
    r = swi_real.cuMemAddressFree(s->own_va, s->size);
    drop_segment(s);
    pthread_mutex_unlock(&books);
    return r;
}

/* ---------------------------------------------------------------- the engine's own VMM calls */
CUresult swi_vmm_create(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                        unsigned long long flags) {
    if (!handle || !prop) return CUDA_ERROR_INVALID_VALUE;
    CUmemGenericAllocationHandle h = 0;
    CUresult r = swi_real.cuMemCreate(&h, size, prop, flags);
    if (r != CUDA_SUCCESS) return r;
    CUcontext ctx = NULL;
    swi_real.cuCtxGetCurrent(&ctx);
    pthread_mutex_lock(&books);
    swi_segment *s = new_segment(h, size, prop, flags, ctx);
    s->engine_refs = 1;
    *handle = s->vhandle;
    pthread_mutex_unlock(&books);
    swi_log(2, "cuMemCreate(%zu) -> handle 0x%llx", size, s->vhandle);
    return CUDA_SUCCESS;
}

/* a segment with no mapping and no reference of the engine's is gone */
static void forget_if_unused(swi_segment *s) {
    if (s->engine_refs > 0 || s->own || mapping_count(s) > 0) return;
    if (s->real) swi_real.cuMemRelease(s->real);
    drop_segment(s);
}

CUresult swi_vmm_release(CUmemGenericAllocationHandle handle) {
    pthread_mutex_lock(&books);
    swi_segment *s = segment_by_handle(handle);
    if (!s) {
        pthread_mutex_unlock(&books);
        return swi_real.cuMemRelease(handle);
    }
    if (s->engine_refs <= 0) {
        pthread_mutex_unlock(&books);
        return CUDA_ERROR_INVALID_VALUE;
    }
    s->engine_refs--;
    forget_if_unused(s);
    pthread_mutex_unlock(&books);
    return CUDA_SUCCESS;
}

CUresult swi_vmm_map(CUdeviceptr va, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                     unsigned long long flags) {
    pthread_mutex_lock(&books);
    swi_segment *s = segment_by_handle(handle);
    CUresult r;
    if (!s) {
        r = swi_real.cuMemMap(va, size, offset, handle, flags);
        if (r == CUDA_SUCCESS && serving) {
            new_mapping(va, size, offset, NULL);
            problems[SWI_PROBLEM_FOREIGN].count++;
            problems[SWI_PROBLEM_FOREIGN].bytes += size;
        }
        pthread_mutex_unlock(&books);
        return r;
    }
    if (!s->real) { /* asleep: the service promised an idle engine */
        pthread_mutex_unlock(&books);
        return CUDA_ERROR_ILLEGAL_STATE;
    }
    r = swi_real.cuMemMap(va, size, offset, s->real, flags);
    if (r == CUDA_SUCCESS) new_mapping(va, size, offset, s);
    pthread_mutex_unlock(&books);
    return r;
}

CUresult swi_vmm_unmap(CUdeviceptr va, size_t size) {
    pthread_mutex_lock(&books);
    /* one call may cover several mappings (ggml unmaps its whole pool at once) */
    int any_live = 0, any_known = 0;
    for (size_t i = 0; i < nmaps; i++) {
        swi_mapping *m = maps[i];
        if (m->va >= va && m->va + m->size <= va + size) {
            any_known = 1;
            any_live |= m->live;
        }
    }
    CUresult r = CUDA_SUCCESS;
    if (any_live || !any_known) r = swi_real.cuMemUnmap(va, size);
    if (r == CUDA_SUCCESS) {
        for (size_t i = 0; i < nmaps;) {
            swi_mapping *m = maps[i];
            if (m->va >= va && m->va + m->size <= va + size) {
                swi_segment *s = m->seg;
                drop_mapping_at(i);
                if (s) forget_if_unused(s);
            } else {
                i++;
            }
        }
    }
    pthread_mutex_unlock(&books);
    return r;
}

CUresult swi_vmm_set_access(CUdeviceptr va, size_t size, const CUmemAccessDesc *desc, size_t count) {
    pthread_mutex_lock(&books);
    int all_released = 1, overlaps = 0;
    for (size_t i = 0; i < nmaps; i++) {
        swi_mapping *m = maps[i];
        if (m->va < va + size && va < m->va + m->size) {
            overlaps = 1;
            if (m->live) all_released = 0;
        }
    }
    CUresult r = CUDA_SUCCESS;
    if (!overlaps || !all_released) r = swi_real.cuMemSetAccess(va, size, desc, count);
    if (r == CUDA_SUCCESS && desc) {
        for (size_t i = 0; i < nmaps; i++) {
            swi_mapping *m = maps[i];
            if (m->va < va + size && va < m->va + m->size) {
                size_t n = count < SWI_MAX_ACCESS ? count : SWI_MAX_ACCESS;
                memcpy(m->access, desc, n * sizeof *desc);
                m->naccess = n;
            }
        }
    }
    pthread_mutex_unlock(&books);
    return r;
}

CUresult swi_vmm_retain(CUmemGenericAllocationHandle *handle, void *addr) {
    pthread_mutex_lock(&books);
    CUdeviceptr a = (CUdeviceptr)(uintptr_t)addr;
    for (size_t i = 0; i < nmaps; i++) {
        swi_mapping *m = maps[i];
        if (m->seg && a >= m->va && a < m->va + m->size) {
            if (!handle) {
                pthread_mutex_unlock(&books);
                return CUDA_ERROR_INVALID_VALUE;
            }
            m->seg->engine_refs++;
            *handle = m->seg->vhandle;
            pthread_mutex_unlock(&books);
            return CUDA_SUCCESS;
        }
    }
    pthread_mutex_unlock(&books);
    return swi_real.cuMemRetainAllocationHandle(handle, addr);
}

CUresult swi_vmm_properties(CUmemAllocationProp *prop, CUmemGenericAllocationHandle handle) {
    pthread_mutex_lock(&books);
    swi_segment *s = segment_by_handle(handle);
    if (s) {
        if (prop) *prop = s->prop;
        pthread_mutex_unlock(&books);
        return prop ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    }
    pthread_mutex_unlock(&books);
    return swi_real.cuMemGetAllocationPropertiesFromHandle(prop, handle);
}

CUresult swi_vmm_export(void *out, CUmemGenericAllocationHandle handle, int type, unsigned long long flags) {
    pthread_mutex_lock(&books);
    swi_segment *s = segment_by_handle(handle);
    if (!s) {
        pthread_mutex_unlock(&books);
        return swi_real.cuMemExportToShareableHandle(out, handle, type, flags);
    }
    if (!s->real) {
        pthread_mutex_unlock(&books);
        return CUDA_ERROR_ILLEGAL_STATE;
    }
    CUresult r = swi_real.cuMemExportToShareableHandle(out, s->real, type, flags);
    if (r == CUDA_SUCCESS) s->exported = 1; /* another process may map it: never released */
    pthread_mutex_unlock(&books);
    return r;
}

/* ---------------------------------------------------------------- staging */
/* One chunk of pinned host memory. Huge pages (the reference engine's --staging hugepages, measured
 * on the H100: 16 GB pinned in 5.9 s instead of 13 s, and 512x fewer pages for a checkpoint of the
 * residual to re-map) unless they are not to be had; then cuMemHostAlloc. */
static CUresult pin_chunk(swi_chunk *c, size_t size) {
    c->size = size;
    if (staging_hugepages && swi_real.cuMemHostRegister_v2 && swi_real.cuMemHostUnregister) {
        /* 2 MiB aligned, so that every page of it can be a huge page */
        const size_t huge = 2u << 20;
        char *raw = mmap(NULL, size + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        void *p = MAP_FAILED;
        if (raw != MAP_FAILED) {
            char *aligned = (char *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
            if (aligned > raw) munmap(raw, (size_t)(aligned - raw));
            if (aligned + size < raw + size + huge) munmap(aligned + size, (size_t)(raw + size + huge - aligned - size));
            p = aligned;
        }
        if (p != MAP_FAILED) {
            madvise(p, size, MADV_HUGEPAGE);
            if (swi_real.cuMemHostRegister_v2(p, size, CU_MEMHOSTREGISTER_PORTABLE) == CUDA_SUCCESS) {
                c->host = p;
                c->registered = 1;
                return CUDA_SUCCESS;
            }
            munmap(p, size);
        }
        hugepage_fallbacks++;
    }
    c->registered = 0;
    c->host = NULL;
    CUresult r = swi_real.cuMemHostAlloc(&c->host, size, CU_MEMHOSTALLOC_PORTABLE);
    if (r == CUDA_SUCCESS && !c->host) r = CUDA_ERROR_OUT_OF_MEMORY;
    return r;
}

static void unpin_chunk(swi_chunk *c) {
    if (c->registered) {
        swi_real.cuMemHostUnregister(c->host);
        munmap(c->host, c->size);
    } else {
        swi_real.cuMemFreeHost(c->host);
    }
    c->host = NULL;
}

/* makes the staging hold at least `need` bytes (chunks of chunk_bytes, the last one only as large
 * as needed, in 2 MiB steps); 0 or the failing call's result */
static CUresult ensure_staging(size_t need, char *err, size_t errlen) {
    /* grows without holding the books: pinning 16 GB takes seconds, the engine may allocate meanwhile */
    pthread_mutex_lock(&staging);
    while (staging_total < need) {
        size_t size = need - staging_total;
        size = (size + (2u << 20) - 1) / (2u << 20) * (2u << 20);
        if (size > chunk_bytes) size = chunk_bytes;
        swi_chunk c;
        double t = swi_now();
        CUresult r = pin_chunk(&c, size);
        pin_seconds += swi_now() - t;
        if (r != CUDA_SUCCESS) {
            snprintf(err, errlen, "pinning chunk %zu of the staging (%zu bytes, cuMemHostAlloc): %s", nchunks, size,
                     swi_error_name(r));
            pthread_mutex_unlock(&staging);
            return r;
        }
        chunk_allocations++;
        staging_total += size;
        PUSH(chunks, nchunks, capchunks, c);
    }
    pthread_mutex_unlock(&staging);
    return CUDA_SUCCESS;
}

static CUstream stream_for(CUcontext ctx, CUresult *r) {
    for (size_t i = 0; i < nstreams; i++)
        if (streams[i].ctx == ctx) return streams[i].stream;
    CUstream s = NULL;
    *r = swi_real.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
    if (*r != CUDA_SUCCESS) return NULL;
    if (nstreams < SWI_MAX_DEVICES) {
        streams[nstreams].ctx = ctx;
        streams[nstreams].stream = s;
        nstreams++;
    }
    return s;
}

/* a context to copy a segment in: its creator's, else another segment's on the same device, else
 * the device's primary context (cuMemCreate needs no current context) */
static CUcontext context_of(swi_segment *s) {
    if (s->ctx) return s->ctx;
    for (size_t i = 0; i < nsegs; i++)
        if (segs[i]->ctx && segs[i]->prop.location.id == s->prop.location.id) return s->ctx = segs[i]->ctx;
    CUcontext primary = NULL;
    if (swi_real.cuDevicePrimaryCtxRetain &&
        swi_real.cuDevicePrimaryCtxRetain(&primary, s->prop.location.id) == CUDA_SUCCESS)
        s->ctx = primary;
    return s->ctx;
}

/* queues the copies of one segment between its covering mapping and its staging range */
static CUresult copy_segment(swi_segment *s, int to_host, char *err, size_t errlen) {
    swi_mapping *m = covering_mapping(s);
    if (!m) {
        snprintf(err, errlen, "segment 0x%llx has no mapping that covers it", s->vhandle);
        return CUDA_ERROR_ILLEGAL_STATE;
    }
    CUcontext ctx = context_of(s);
    if (!ctx) {
        snprintf(err, errlen, "no context to copy segment 0x%llx in", s->vhandle);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    CUresult r = swi_real.cuCtxSetCurrent(ctx);
    if (r != CUDA_SUCCESS) {
        snprintf(err, errlen, "cuCtxSetCurrent: %s", swi_error_name(r));
        return r;
    }
    CUstream stream = stream_for(ctx, &r);
    if (!stream) {
        snprintf(err, errlen, "cuStreamCreate: %s", swi_error_name(r));
        return r;
    }
    size_t ci = 0, chunk_start = 0; /* the chunk that holds stage_offset + done */
    for (size_t done = 0; done < s->size;) {
        size_t g = s->stage_offset + done;
        while (ci < nchunks && chunk_start + chunks[ci].size <= g) chunk_start += chunks[ci++].size;
        if (ci == nchunks) {
            snprintf(err, errlen, "the staging is smaller than the books (%zu bytes)", staging_total);
            return CUDA_ERROR_ILLEGAL_STATE;
        }
        size_t within = g - chunk_start;
        size_t n = s->size - done;
        if (n > chunks[ci].size - within) n = chunks[ci].size - within;
        char *host = (char *)chunks[ci].host + within;
        r = to_host ? swi_real.cuMemcpyDtoHAsync_v2(host, m->va + done, n, stream)
                    : swi_real.cuMemcpyHtoDAsync_v2(m->va + done, host, n, stream);
        if (r != CUDA_SUCCESS) {
            snprintf(err, errlen, "%s of %zu bytes at 0x%llx: %s", to_host ? "cuMemcpyDtoHAsync" : "cuMemcpyHtoDAsync",
                     n, m->va + done, swi_error_name(r));
            return r;
        }
        done += n;
    }
    return CUDA_SUCCESS;
}

static CUresult sync_streams(char *err, size_t errlen) {
    for (size_t i = 0; i < nstreams; i++) {
        CUresult r = swi_real.cuCtxSetCurrent(streams[i].ctx);
        if (r == CUDA_SUCCESS) r = swi_real.cuStreamSynchronize(streams[i].stream);
        if (r != CUDA_SUCCESS) {
            snprintf(err, errlen, "cuStreamSynchronize: %s", swi_error_name(r));
            return r;
        }
    }
    return CUDA_SUCCESS;
}

/* ---------------------------------------------------------------- steps and their report */
typedef struct {
    const char *name[SWI_MAX_STEPS];
    double seconds[SWI_MAX_STEPS];
    int n;
    double started;
    double t;
} swi_steps;

static void steps_begin(swi_steps *st) {
    memset(st, 0, sizeof *st);
    st->started = st->t = swi_now();
}

static void step_done(swi_steps *st, const char *name) {
    double now = swi_now();
    if (st->n < SWI_MAX_STEPS) {
        st->name[st->n] = name;
        st->seconds[st->n] = now - st->t;
        st->n++;
    }
    st->t = now;
}

static void write_steps(swi_buf *out, const swi_steps *st) {
    swi_buf_printf(out, "\"steps\":[");
    for (int i = 0; i < st->n; i++)
        swi_buf_printf(out, "%s{\"step\":\"%s\",\"seconds\":%.6f}", i ? "," : "", st->name[i], st->seconds[i]);
    swi_buf_printf(out, "],\"seconds\":%.6f", swi_now() - st->started);
}

static void write_result(swi_buf *out, const char *op, int ok, const swi_steps *st, size_t bytes, size_t count,
                         const char *failed_step, const char *error, int undone, int noop) {
    swi_buf_printf(out, "{\"ok\":%s,\"op\":\"%s\",\"state\":\"%s\",", ok ? "true" : "false", op, state_names[state]);
    if (noop) swi_buf_printf(out, "\"noop\":true,");
    swi_buf_printf(out, "\"bytes\":%zu,\"allocations\":%zu,", bytes, count);
    if (!ok) {
        swi_buf_printf(out, "\"failed_step\":\"%s\",\"undone\":%s,\"error\":", failed_step, undone ? "true" : "false");
        swi_buf_json_string(out, error);
        swi_buf_printf(out, ",");
    }
    write_steps(out, st);
    swi_buf_printf(out, "}");
}

static void keep_last(swi_buf *last, const swi_buf *out) {
    last->len = 0;
    swi_buf_printf(last, "%.*s", (int)out->len, out->data);
}

/* ---------------------------------------------------------------- restore: wake and undo */
/* Brings the given segments back: create what was released, map every mapping not live, set its
 * access, copy back what was re-created. All or nothing: on failure everything it did is undone
 * and *failed names the step; returns the failing result, or a second failure of its own undo as
 * CUDA_ERROR_UNKNOWN with *undo_failed = 1. */
static CUresult restore(swi_segment **list, size_t n, swi_steps *st, const char **failed, char *err, size_t errlen,
                        int *undo_failed) {
    CUresult r = CUDA_SUCCESS;
    *undo_failed = 0;
    for (size_t i = 0; i < n; i++) {
        swi_segment *s = list[i];
        if (s->real) continue;
        r = swi_real.cuMemCreate(&s->pending, s->size, &s->prop, s->flags);
        if (r != CUDA_SUCCESS) {
            s->pending = 0;
            *failed = "create";
            snprintf(err, errlen, "cuMemCreate(%zu bytes): %s", s->size, swi_error_name(r));
            goto undo;
        }
    }
    if (st) step_done(st, "create");
    for (size_t j = 0; j < nmaps; j++) {
        swi_mapping *m = maps[j];
        if (!m->seg || m->live) continue;
        int listed = 0;
        for (size_t i = 0; i < n && !listed; i++) listed = list[i] == m->seg;
        if (!listed) continue;
        CUmemGenericAllocationHandle h = m->seg->real ? m->seg->real : m->seg->pending;
        r = swi_real.cuMemMap(m->va, m->size, m->offset, h, 0);
        if (r != CUDA_SUCCESS) {
            *failed = "map";
            snprintf(err, errlen, "cuMemMap(0x%llx, %zu bytes): %s", m->va, m->size, swi_error_name(r));
            goto undo;
        }
        m->live = 1;
        m->fresh = 1;
    }
    if (st) step_done(st, "map");
    for (size_t j = 0; j < nmaps; j++) {
        swi_mapping *m = maps[j];
        if (!m->fresh || !m->naccess) continue;
        r = swi_real.cuMemSetAccess(m->va, m->size, m->access, m->naccess);
        if (r != CUDA_SUCCESS) {
            *failed = "access";
            snprintf(err, errlen, "cuMemSetAccess(0x%llx, %zu bytes): %s", m->va, m->size, swi_error_name(r));
            goto undo;
        }
    }
    if (st) step_done(st, "access");
    for (size_t i = 0; i < n; i++) {
        swi_segment *s = list[i];
        if (!s->pending) continue;
        r = copy_segment(s, 0, err, errlen);
        if (r != CUDA_SUCCESS) {
            *failed = "copy_in";
            goto undo;
        }
    }
    r = sync_streams(err, errlen);
    if (r != CUDA_SUCCESS) {
        *failed = "copy_in";
        goto undo;
    }
    if (st) step_done(st, "copy_in");
    for (size_t i = 0; i < n; i++) {
        swi_segment *s = list[i];
        if (s->pending) {
            s->real = s->pending;
            s->pending = 0;
        }
        s->staged = 0;
    }
    for (size_t j = 0; j < nmaps; j++) maps[j]->fresh = 0;
    return CUDA_SUCCESS;

undo:
    for (size_t j = 0; j < nmaps; j++) {
        swi_mapping *m = maps[j];
        if (!m->fresh) continue;
        if (swi_real.cuMemUnmap(m->va, m->size) != CUDA_SUCCESS) *undo_failed = 1;
        m->live = 0;
        m->fresh = 0;
    }
    for (size_t i = 0; i < n; i++) {
        swi_segment *s = list[i];
        if (!s->pending) continue;
        if (swi_real.cuMemRelease(s->pending) != CUDA_SUCCESS) *undo_failed = 1;
        s->pending = 0;
    }
    return r;
}

static void go_broken(const char *op, const char *step, const char *err) {
    state = SWI_BROKEN;
    snprintf(broken_reason, sizeof broken_reason, "%s failed at %s (%s) and could not be undone", op, step, err);
    swi_log(0, "%s", broken_reason);
}

/* ---------------------------------------------------------------- sleep */
void swi_op_sleep(swi_buf *out) {
    swi_steps st;
    steps_begin(&st);
    char err[512] = "";
    pthread_mutex_lock(&books);
    if (state == SWI_BROKEN) {
        write_result(out, "sleep", 0, &st, 0, 0, "state", broken_reason, 0, 0);
        pthread_mutex_unlock(&books);
        return;
    }
    if (state == SWI_ASLEEP) {
        write_result(out, "sleep", 1, &st, 0, 0, NULL, NULL, 0, 1);
        pthread_mutex_unlock(&books);
        return;
    }
    swi_segment **list = calloc(nsegs ? nsegs : 1, sizeof *list);
    if (!list) abort();
    size_t n = 0, bytes = 0;
    for (size_t i = 0; i < nsegs; i++)
        if (segs[i]->real && !not_releasable(segs[i])) {
            list[n++] = segs[i];
            bytes += segs[i]->size;
        }
    const char *failed = NULL;
    CUresult r = CUDA_SUCCESS;
    int undone = 1;

    /* sync: every context the books know has finished its work */
    for (size_t i = 0; i < nsegs; i++) context_of(segs[i]);
    for (size_t i = 0; i < nsegs && r == CUDA_SUCCESS; i++) {
        int seen = 0;
        for (size_t k = 0; k < i && !seen; k++) seen = segs[k]->ctx == segs[i]->ctx;
        if (seen || !segs[i]->ctx) continue;
        r = swi_real.cuCtxSetCurrent(segs[i]->ctx);
        if (r == CUDA_SUCCESS) r = swi_real.cuCtxSynchronize();
        if (r != CUDA_SUCCESS) snprintf(err, sizeof err, "cuCtxSynchronize: %s", swi_error_name(r));
    }
    if (r != CUDA_SUCCESS) {
        failed = "sync";
        goto fail;
    }
    step_done(&st, "sync");

    /* stage: enough pinned chunks (kept from earlier cycles; grown only when the books grew) */
    r = ensure_staging(bytes, err, sizeof err);
    if (r != CUDA_SUCCESS) {
        failed = "stage";
        goto fail;
    }
    step_done(&st, "stage");

    /* copy_out: every byte to the staging (the device copy stays valid until release) */
    pthread_mutex_lock(&staging);
    size_t offset = 0;
    for (size_t i = 0; i < n; i++) {
        list[i]->stage_offset = offset;
        offset += list[i]->size;
    }
    for (size_t i = 0; i < n && r == CUDA_SUCCESS; i++) r = copy_segment(list[i], 1, err, sizeof err);
    if (r == CUDA_SUCCESS) r = sync_streams(err, sizeof err);
    pthread_mutex_unlock(&staging);
    if (r != CUDA_SUCCESS) {
        failed = "copy_out";
        goto fail;
    }
    for (size_t i = 0; i < n; i++) list[i]->staged = 1;
    step_done(&st, "copy_out");

    /* release: unmap every mapping, release the memory; the VA ranges stay reserved */
    for (size_t i = 0; i < n && r == CUDA_SUCCESS; i++) {
        swi_segment *s = list[i];
        for (size_t j = 0; j < nmaps && r == CUDA_SUCCESS; j++) {
            swi_mapping *m = maps[j];
            if (m->seg != s || !m->live) continue;
            r = swi_real.cuMemUnmap(m->va, m->size);
            if (r == CUDA_SUCCESS)
                m->live = 0;
            else
                snprintf(err, sizeof err, "cuMemUnmap(0x%llx, %zu bytes): %s", m->va, m->size, swi_error_name(r));
        }
        if (r != CUDA_SUCCESS) break;
        r = swi_real.cuMemRelease(s->real);
        if (r == CUDA_SUCCESS)
            s->real = 0;
        else
            snprintf(err, sizeof err, "cuMemRelease(%zu bytes): %s", s->size, swi_error_name(r));
    }
    if (r != CUDA_SUCCESS) {
        failed = "release";
        /* undo: bring back what was already unmapped or released, from the staging */
        char undo_err[512] = "";
        const char *undo_step = NULL;
        int undo_failed = 0;
        pthread_mutex_lock(&staging);
        CUresult u = restore(list, n, NULL, &undo_step, undo_err, sizeof undo_err, &undo_failed);
        pthread_mutex_unlock(&staging);
        if (u != CUDA_SUCCESS) {
            undone = 0;
            char both[1100];
            snprintf(both, sizeof both, "%s; undo: %s", err, undo_err);
            go_broken("sleep", "release", both);
        }
        goto fail;
    }
    step_done(&st, "release");
    state = SWI_ASLEEP;
    sleeps++;
    write_result(out, "sleep", 1, &st, bytes, n, NULL, NULL, 0, 0);
    keep_last(&last_sleep, out);
    swi_log(1, "sleep: %zu bytes in %zu allocations released in %.3f s", bytes, n, swi_now() - st.started);
    free(list);
    pthread_mutex_unlock(&books);
    return;

fail:
    for (size_t i = 0; i < n; i++) list[i]->staged = 0;
    failures++;
    write_result(out, "sleep", 0, &st, bytes, n, failed, err, undone, 0);
    keep_last(&last_sleep, out);
    swi_log(0, "sleep failed at %s: %s (%s)", failed, err, undone ? "undone: the engine is awake" : "NOT undone");
    free(list);
    pthread_mutex_unlock(&books);
}

/* ---------------------------------------------------------------- wake */
void swi_op_wake(swi_buf *out) {
    swi_steps st;
    steps_begin(&st);
    char err[512] = "";
    pthread_mutex_lock(&books);
    if (state == SWI_BROKEN) {
        write_result(out, "wake", 0, &st, 0, 0, "state", broken_reason, 0, 0);
        pthread_mutex_unlock(&books);
        return;
    }
    if (state == SWI_AWAKE) {
        write_result(out, "wake", 1, &st, 0, 0, NULL, NULL, 0, 1);
        pthread_mutex_unlock(&books);
        return;
    }
    swi_segment **list = calloc(nsegs ? nsegs : 1, sizeof *list);
    if (!list) abort();
    size_t n = 0, bytes = 0;
    for (size_t i = 0; i < nsegs; i++)
        if (!segs[i]->real && segs[i]->staged) {
            list[n++] = segs[i];
            bytes += segs[i]->size;
        }
    const char *failed = "create";
    int undo_failed = 0;
    pthread_mutex_lock(&staging);
    CUresult r = restore(list, n, &st, &failed, err, sizeof err, &undo_failed);
    pthread_mutex_unlock(&staging);
    if (r != CUDA_SUCCESS) {
        failures++;
        if (undo_failed) go_broken("wake", failed, err);
        write_result(out, "wake", 0, &st, bytes, n, failed, err, !undo_failed, 0);
        keep_last(&last_wake, out);
        swi_log(0, "wake failed at %s: %s (%s)", failed, err,
                undo_failed ? "NOT undone" : "undone: the engine stays asleep, nothing mapped");
    } else {
        state = SWI_AWAKE;
        wakes++;
        write_result(out, "wake", 1, &st, bytes, n, NULL, NULL, 0, 0);
        keep_last(&last_wake, out);
        swi_log(1, "wake: %zu bytes in %zu allocations back in %.3f s", bytes, n, swi_now() - st.started);
    }
    free(list);
    pthread_mutex_unlock(&books);
}

/* ---------------------------------------------------------------- prepare / release_staging */
/* Pinned host memory is a context's, and the control thread has none of its own: the sleep's sync
 * makes the engine's current before it stages, prepare and release_staging must too (without it the
 * driver answers CUDA_ERROR_INVALID_CONTEXT: the H200, 2026-12-02). Called with the books held;
 * 0 when there is no segment yet (nothing to pin). */
static CUresult make_engine_context_current(char *err, size_t errlen) {
    CUcontext ctx = NULL;
    for (size_t i = 0; i < nsegs && !ctx; i++) ctx = context_of(segs[i]);
    if (!ctx) return CUDA_SUCCESS;
    CUresult r = swi_real.cuCtxSetCurrent(ctx);
    if (r != CUDA_SUCCESS) snprintf(err, errlen, "cuCtxSetCurrent: %s", swi_error_name(r));
    return r;
}

void swi_op_prepare(swi_buf *out) {
    swi_steps st;
    steps_begin(&st);
    char err[512] = "";
    pthread_mutex_lock(&books);
    size_t bytes = 0, n = 0;
    for (size_t i = 0; i < nsegs; i++)
        if (!not_releasable(segs[i])) {
            bytes += segs[i]->size;
            n++;
        }
    int st_now = state;
    CUresult r = st_now == SWI_BROKEN ? CUDA_SUCCESS : make_engine_context_current(err, sizeof err);
    pthread_mutex_unlock(&books);
    if (st_now == SWI_BROKEN) {
        write_result(out, "prepare", 0, &st, bytes, n, "state", broken_reason, 0, 0);
        return;
    }
    if (r == CUDA_SUCCESS) r = ensure_staging(bytes, err, sizeof err);
    step_done(&st, "stage");
    if (r != CUDA_SUCCESS)
        write_result(out, "prepare", 0, &st, bytes, n, "stage", err, 1, 0);
    else
        write_result(out, "prepare", 1, &st, bytes, n, NULL, NULL, 0, 0);
}

void swi_op_release_staging(swi_buf *out) {
    swi_steps st;
    steps_begin(&st);
    pthread_mutex_lock(&books);
    if (state != SWI_AWAKE) {
        write_result(out, "release_staging", 0, &st, 0, 0, "state",
                     "the staging holds an asleep engine's memory: wake it first", 1, 0);
        pthread_mutex_unlock(&books);
        return;
    }
    char err[512] = "";
    (void)make_engine_context_current(err, sizeof err); /* best effort: the frees report nothing */
    pthread_mutex_lock(&staging);
    size_t freed = staging_total, count = nchunks;
    for (size_t i = 0; i < nchunks; i++) unpin_chunk(&chunks[i]);
    nchunks = 0;
    staging_total = 0;
    pthread_mutex_unlock(&staging);
    step_done(&st, "free");
    write_result(out, "release_staging", 1, &st, freed, count, NULL, NULL, 0, 0);
    pthread_mutex_unlock(&books);
}

/* ---------------------------------------------------------------- status */
void swi_op_status(swi_buf *out) {
    pthread_mutex_lock(&books);
    size_t cap_n = 0, cap_bytes = 0, rel_n = 0, rel_bytes = 0, own_n = 0, vmm_n = 0;
    size_t res_counts[3] = {0}, res_bytes[3] = {0}; /* exported, partly_mapped, unmapped */
    for (size_t i = 0; i < nsegs; i++) {
        swi_segment *s = segs[i];
        const char *why = not_releasable(s);
        if (why) {
            int k = !strcmp(why, "exported") ? 0 : !strcmp(why, "partly_mapped") ? 1 : 2;
            res_counts[k]++;
            res_bytes[k] += s->size;
            continue;
        }
        cap_n++;
        cap_bytes += s->size;
        own_n += s->own;
        vmm_n += !s->own;
        if (!s->real) {
            rel_n++;
            rel_bytes += s->size;
        }
    }
    size_t fallback_n = 0, fallback_bytes = 0;
    size_t small_n = 0, small_bytes = 0, managed_n = 0, managed_bytes = 0, pitch_n = 0, pitch_bytes = 0;
    for (size_t i = 0; i < npasses; i++) {
        if (passes[i].kind == SWI_PASS_SMALL) small_n++, small_bytes += passes[i].size;
        if (passes[i].kind == SWI_PASS_MANAGED) managed_n++, managed_bytes += passes[i].size;
        if (passes[i].kind == SWI_PASS_PITCH) pitch_n++, pitch_bytes += passes[i].size;
        if (passes[i].kind == SWI_PASS_FALLBACK) fallback_n++, fallback_bytes += passes[i].size;
    }
    size_t foreign_n = 0, foreign_bytes = 0;
    for (size_t i = 0; i < nmaps; i++)
        if (!maps[i]->seg) foreign_n++, foreign_bytes += maps[i]->size;

    /* live problems: what a sleep could not release right now (and each kind ever seen) */
    size_t live_n[SWI_PROBLEM_COUNT] = {0}, live_bytes[SWI_PROBLEM_COUNT] = {0};
    live_n[SWI_PROBLEM_MANAGED] = managed_n, live_bytes[SWI_PROBLEM_MANAGED] = managed_bytes;
    live_n[SWI_PROBLEM_PITCH] = pitch_n, live_bytes[SWI_PROBLEM_PITCH] = pitch_bytes;
    live_n[SWI_PROBLEM_FOREIGN] = foreign_n, live_bytes[SWI_PROBLEM_FOREIGN] = foreign_bytes;
    /* a pool keeps what it was given; a legacy entry point or a device without VMM stays a problem */
    live_n[SWI_PROBLEM_STREAM_ORDERED] = problems[SWI_PROBLEM_STREAM_ORDERED].count;
    live_bytes[SWI_PROBLEM_STREAM_ORDERED] = problems[SWI_PROBLEM_STREAM_ORDERED].bytes;
    live_n[SWI_PROBLEM_LEGACY] = problems[SWI_PROBLEM_LEGACY].count;
    live_n[SWI_PROBLEM_NO_VMM] = problems[SWI_PROBLEM_NO_VMM].count;
    live_bytes[SWI_PROBLEM_NO_VMM] = problems[SWI_PROBLEM_NO_VMM].bytes;
    int capturable = 1;
    for (int k = 0; k < SWI_PROBLEM_COUNT; k++)
        if (live_n[k]) capturable = 0;

    swi_buf_printf(out, "{\"ok\":true,\"op\":\"status\",\"version\":1,\"pid\":%d,\"state\":\"%s\",",
                   (int)getpid(), state_names[state]);
    if (state == SWI_BROKEN) {
        swi_buf_printf(out, "\"broken\":");
        swi_buf_json_string(out, broken_reason);
        swi_buf_printf(out, ",");
    }
    swi_buf_printf(out, "\"capturable\":%s,\"problems\":[", capturable ? "true" : "false");
    int first = 1;
    for (int k = 0; k < SWI_PROBLEM_COUNT; k++) {
        if (!live_n[k] && !problems[k].count) continue;
        swi_buf_printf(out, "%s{\"kind\":\"%s\",\"live\":%s,\"count\":%zu,\"bytes\":%zu,\"seen\":%lu,\"detail\":",
                       first ? "" : ",", problem_names[k], live_n[k] ? "true" : "false", live_n[k], live_bytes[k],
                       problems[k].count);
        swi_buf_json_string(out, problem_details[k]);
        swi_buf_printf(out, "}");
        first = 0;
    }
    swi_buf_printf(out,
                   "],\"captured\":{\"count\":%zu,\"bytes\":%zu,\"runtime_allocations\":%zu,\"vmm_allocations\":%zu,"
                   "\"released_count\":%zu,\"released_bytes\":%zu,\"mapped_bytes\":%zu},",
                   cap_n, cap_bytes, own_n, vmm_n, rel_n, rel_bytes, cap_bytes - rel_bytes);
    swi_buf_printf(out,
                   "\"resident\":{\"bytes\":%zu,\"small\":{\"count\":%zu,\"bytes\":%zu},"
                   "\"fallback\":{\"count\":%zu,\"bytes\":%zu},"
                   "\"exported\":{\"count\":%zu,\"bytes\":%zu},\"partly_mapped\":{\"count\":%zu,\"bytes\":%zu},"
                   "\"unmapped\":{\"count\":%zu,\"bytes\":%zu},\"min_bytes\":%zu},",
                   small_bytes + fallback_bytes + managed_bytes + pitch_bytes + foreign_bytes + res_bytes[0] +
                       res_bytes[1] + res_bytes[2],
                   small_n, small_bytes, fallback_n, fallback_bytes, res_counts[0], res_bytes[0], res_counts[1], res_bytes[1], res_counts[2],
                   res_bytes[2], min_bytes);
    pthread_mutex_lock(&staging);
    swi_buf_printf(out,
                   "\"staging\":{\"chunks\":%zu,\"chunk_bytes\":%zu,\"bytes\":%zu,\"chunk_allocations\":%lu,"
                   "\"pin_seconds\":%.6f,\"kind\":\"%s\",\"hugepage_fallbacks\":%lu},",
                   nchunks, chunk_bytes, staging_total, chunk_allocations, pin_seconds,
                   staging_hugepages ? "hugepages" : "pinned", hugepage_fallbacks);
    pthread_mutex_unlock(&staging);
    swi_buf_printf(out,
                   "\"hooks\":{\"dlsym\":%lu,\"proc_address\":%lu,\"proc_address_passed\":%lu,\"runtime\":%lu},"
                   "\"cycles\":{\"sleeps\":%lu,\"wakes\":%lu,\"failures\":%lu},",
                   __atomic_load_n(&swi_hooks.dlsym_redirects, __ATOMIC_RELAXED),
                   __atomic_load_n(&swi_hooks.proc_address_redirects, __ATOMIC_RELAXED),
                   __atomic_load_n(&swi_hooks.proc_address_passed, __ATOMIC_RELAXED),
                   __atomic_load_n(&swi_hooks.runtime_allocations, __ATOMIC_RELAXED), sleeps, wakes, failures);
    swi_buf_printf(out, "\"last_sleep\":%.*s,\"last_wake\":%.*s,\"socket\":",
                   last_sleep.len ? (int)last_sleep.len : 4, last_sleep.len ? last_sleep.data : "null",
                   last_wake.len ? (int)last_wake.len : 4, last_wake.len ? last_wake.data : "null");
    swi_buf_json_string(out, swi_control_socket_path());
    swi_buf_printf(out, "}");
    pthread_mutex_unlock(&books);
}
