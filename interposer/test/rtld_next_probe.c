/* Checks that the interposer's dlsym keeps RTLD_NEXT's meaning ("the next object after the
 * caller"): libprobe_a.so and libprobe_b.so both define probe_value(); probe_a's probe_next()
 * asks dlsym(RTLD_NEXT) for it and must get probe_b's (2), not its own (1). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#ifdef PROBE_A
int probe_value(void) { return 1; }
int probe_next(void) {
    int (*next)(void) = (int (*)(void))dlsym(RTLD_NEXT, "probe_value");
    return next ? next() : -1;
}
#elif defined(PROBE_B)
int probe_value(void) { return 2; }
#else
int probe_next(void);
int main(void) {
    printf("%d\n", probe_next());
    return 0;
}
#endif
