/* Plain C reference of every native kernel: the path of CPUs without AVX2 (and ARM until it gets its
 * own), and what the tests compare the vector paths against. Same math and same rounding of the
 * activations as the vector paths; only the order of float additions differs. */
#include <math.h>

#include "ripe_native.h"

void rl_quantize_ref(const float *x, int k, int8_t *q, float *d, float *s) {
    for (int b = 0; b < k / RL_QK; b++) {
        const float *xb = x + b * RL_QK;
        float amax = 0.0f;
        for (int i = 0; i < RL_QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < RL_QK; i++) {
            int v = (int)nearbyintf(xb[i] * id);
            q[b * RL_QK + i] = (int8_t)v;
            sum += v;
        }
        d[b] = amax / 127.0f;
        s[b] = d[b] * (float)sum;
    }
}

void rl_matvec_q4_ref(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                      int g1) {
    int nb = w->k / RL_QK;
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * 80;
        for (int r = 0; r < rows; r++) {
            const int8_t *xq = x->q + (size_t)r * ldx * RL_QK;
            const float *xd = x->d + (size_t)r * ldx, *xs = x->s + (size_t)r * ldx;
            for (int j = 0; j < RL_ROWS; j++) {
                float acc = 0.0f;
                for (int b = 0; b < nb; b++) {
                    const uint8_t *gb = base + (size_t)b * 80;
                    uint16_t dh, mh;
                    __builtin_memcpy(&dh, gb + 2 * j, 2);
                    __builtin_memcpy(&mh, gb + 8 + 2 * j, 2);
                    const uint8_t *codes = gb + 16 + 16 * j;
                    const int8_t *xb = xq + b * RL_QK;
                    int sum = 0;
                    for (int i = 0; i < 16; i++) sum += (codes[i] & 15) * xb[i] + (codes[i] >> 4) * xb[i + 16];
                    acc += rl_half_to_float(dh) * xd[b] * (float)sum + rl_half_to_float(mh) * xs[b];
                }
                int n = g * RL_ROWS + j;
                out[(size_t)r * ldo + n] = acc + (w->bias && n < w->n ? w->bias[n] : 0.0f);
            }
        }
    }
}

void rl_matvec_q8_ref(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                      int g1) {
    int nb = w->k / RL_QK;
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * 136;
        for (int r = 0; r < rows; r++) {
            const int8_t *xq = x->q + (size_t)r * ldx * RL_QK;
            const float *xd = x->d + (size_t)r * ldx;
            for (int j = 0; j < RL_ROWS; j++) {
                float acc = 0.0f;
                for (int b = 0; b < nb; b++) {
                    const uint8_t *gb = base + (size_t)b * 136;
                    uint16_t dh;
                    __builtin_memcpy(&dh, gb + 2 * j, 2);
                    const int8_t *wq = (const int8_t *)(gb + 8 + 32 * j);
                    const int8_t *xb = xq + b * RL_QK;
                    int sum = 0;
                    for (int i = 0; i < RL_QK; i++) sum += wq[i] * xb[i];
                    acc += rl_half_to_float(dh) * xd[b] * (float)sum;
                }
                int n = g * RL_ROWS + j;
                out[(size_t)r * ldo + n] = acc + (w->bias && n < w->n ? w->bias[n] : 0.0f);
            }
        }
    }
}

void rl_kv_to_float_ref(const uint16_t *src, float *dst, int d, int kv_f16) {
    for (int i = 0; i < d; i++) dst[i] = kv_f16 ? rl_half_to_float(src[i]) : rl_bf16_to_float(src[i]);
}

float rl_dot_ref(const float *a, const float *b, int d) {
    float acc = 0.0f;
    for (int i = 0; i < d; i++) acc += a[i] * b[i];
    return acc;
}

void rl_axpy_ref(float *acc, float p, const float *v, int d) {
    for (int i = 0; i < d; i++) acc[i] += p * v[i];
}

void rl_exp_ref(float *x, int n) {
    for (int i = 0; i < n; i++) x[i] = expf(x[i]);
}
