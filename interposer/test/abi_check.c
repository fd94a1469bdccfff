/* Compiled (never run) against NVIDIA's cuda.h: fails the build if a value or layout written out
 * in src/cuda_abi.h differs from the real header. */
#include <cuda.h>
#define SWI_ABI_CHECK
#include "../src/cuda_abi.h"

#define CHECK_VALUE(name, value) _Static_assert((long long)(name) == (value), #name);
#define CHECK_OFFSET(type, member, off) \
    _Static_assert(__builtin_offsetof(type, member) == (off), #type "." #member);
#define CHECK_SIZE(type, size) _Static_assert(sizeof(type) == (size), "sizeof " #type);
SWI_CUDA_VALUES(CHECK_VALUE)
SWI_CUDA_LAYOUT(CHECK_OFFSET)
SWI_CUDA_SIZES(CHECK_SIZE)

int swi_abi_check_dummy;
