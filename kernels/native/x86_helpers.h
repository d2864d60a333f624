/* Plain-C helpers of the x86 kernels (kernels_avx2.c, kernels_vnni.c). */
#ifndef RL_X86_HELPERS_H
#define RL_X86_HELPERS_H

#include "ripe_native.h"

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

static inline void store_rows(const rl_matrix *w, float *out, int g, const float *vals) {
    for (int j = 0; j < RL_ROWS; j++) {
        int n = g * RL_ROWS + j;
        out[n] = vals[j] + (w->bias && n < w->n ? w->bias[n] : 0.0f);
    }
}

#endif
