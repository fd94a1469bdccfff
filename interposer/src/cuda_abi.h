/* The slice of the CUDA driver ABI the interposer and its stand-in driver use, written out so the
 * library builds without the CUDA toolkit (the device machine has the driver, not always the
 * headers). Every value and layout here is checked against NVIDIA's cuda.h by test/abi_check.c
 * whenever cuda.h is present (the Makefile's `check-abi` target, run by the build script). */
#pragma once
#include <stddef.h>

/* X(name, value): enum values and flags, identical to cuda.h (CUDA 12 and 13). */
#define SWI_CUDA_VALUES(X) \
    X(CUDA_SUCCESS, 0) \
    X(CUDA_ERROR_INVALID_VALUE, 1) \
    X(CUDA_ERROR_OUT_OF_MEMORY, 2) \
    X(CUDA_ERROR_NOT_INITIALIZED, 3) \
    X(CUDA_ERROR_INVALID_CONTEXT, 201) \
    X(CUDA_ERROR_INVALID_HANDLE, 400) \
    X(CUDA_ERROR_ILLEGAL_STATE, 401) \
    X(CUDA_ERROR_NOT_FOUND, 500) \
    X(CUDA_ERROR_ILLEGAL_ADDRESS, 700) \
    X(CUDA_ERROR_NOT_PERMITTED, 800) \
    X(CUDA_ERROR_NOT_SUPPORTED, 801) \
    X(CUDA_ERROR_UNKNOWN, 999) \
    X(CU_MEM_ALLOCATION_TYPE_PINNED, 1) \
    X(CU_MEM_LOCATION_TYPE_DEVICE, 1) \
    X(CU_MEM_ACCESS_FLAGS_PROT_NONE, 0) \
    X(CU_MEM_ACCESS_FLAGS_PROT_READ, 1) \
    X(CU_MEM_ACCESS_FLAGS_PROT_READWRITE, 3) \
    X(CU_MEM_ALLOC_GRANULARITY_MINIMUM, 0) \
    X(CU_MEM_ALLOC_GRANULARITY_RECOMMENDED, 1) \
    X(CU_MEM_HANDLE_TYPE_NONE, 0) \
    X(CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 1) \
    X(CU_GET_PROC_ADDRESS_DEFAULT, 0) \
    X(CU_GET_PROC_ADDRESS_LEGACY_STREAM, 1) \
    X(CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM, 2) \
    X(CU_GET_PROC_ADDRESS_SUCCESS, 0) \
    X(CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND, 1) \
    X(CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT, 2) \
    X(CU_MEMHOSTALLOC_PORTABLE, 1) \
    X(CU_MEMHOSTREGISTER_PORTABLE, 1) \
    X(CU_STREAM_NON_BLOCKING, 1) \
    X(CU_MEM_ATTACH_GLOBAL, 1) \
    X(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, 102) \
    X(CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED, 110)

/* X(type, member, offset) and the sizes: the structs copied from cuda.h. */
#define SWI_CUDA_LAYOUT(X) \
    X(CUmemLocation, type, 0) \
    X(CUmemLocation, id, 4) \
    X(CUmemAllocationProp, type, 0) \
    X(CUmemAllocationProp, requestedHandleTypes, 4) \
    X(CUmemAllocationProp, location, 8) \
    X(CUmemAllocationProp, win32HandleMetaData, 16) \
    X(CUmemAllocationProp, allocFlags, 24) \
    X(CUmemAccessDesc, location, 0) \
    X(CUmemAccessDesc, flags, 8)
#define SWI_CUDA_SIZES(X) \
    X(CUmemLocation, 8) \
    X(CUmemAllocationProp, 32) \
    X(CUmemAccessDesc, 12) \
    X(CUdeviceptr, 8) \
    X(CUmemGenericAllocationHandle, 8)

#ifndef SWI_ABI_CHECK /* abi_check.c includes cuda.h instead and compares */
#define SWI_ENUM_ENTRY(name, value) name = value,
enum { SWI_CUDA_VALUES(SWI_ENUM_ENTRY) };
#undef SWI_ENUM_ENTRY

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef unsigned long long cuuint64_t;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUmemPoolHandle_st *CUmemoryPool;
typedef int CUdriverProcAddressQueryResult;
typedef int CUdevice_attribute;

typedef struct {
    int type;
    int id;
} CUmemLocation;

typedef struct {
    int type;
    int requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType;
        unsigned char gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
} CUmemAllocationProp;

typedef struct {
    CUmemLocation location;
    int flags;
} CUmemAccessDesc;

#define SWI_CHECK_OFFSET(type, member, off) \
    _Static_assert(__builtin_offsetof(type, member) == (off), #type "." #member);
#define SWI_CHECK_SIZE(type, size) _Static_assert(sizeof(type) == (size), "sizeof " #type);
SWI_CUDA_LAYOUT(SWI_CHECK_OFFSET)
SWI_CUDA_SIZES(SWI_CHECK_SIZE)
#undef SWI_CHECK_OFFSET
#undef SWI_CHECK_SIZE
#endif
