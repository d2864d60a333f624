/* Plain C reference of every native kernel: the path of CPUs without AVX2 (and ARM until it gets its
 * own), and what the tests compare the vector paths against. Same math and same rounding of the
 * activations as the vector paths; only the order of float additions differs. */
#include <math.h>

#include "ripe_native.h"

void rl_quantize_ref(const float *x, int k, int8_t *q, float *d, float *s, int32_t *h) {
    for (int b = 0; b < k / RL_QK; b++) {
        const float *xb = x + b * RL_QK;
        float amax = 0.0f;
        for (int i = 0; i < RL_QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0, lo = 0;
        for (int i = 0; i < RL_QK; i++) {
            int v = (int)nearbyintf(xb[i] * id);
            q[b * RL_QK + i] = (int8_t)v;
            sum += v;
            if (i == 15) lo = sum;
        }
        h[2 * b] = lo, h[2 * b + 1] = sum - lo;
        d[b] = amax / 127.0f;
        s[b] = d[b] * (float)sum;
    }
}

/* RL_Q4, RL_Q4_0 and RL_Q5: w = d * code + m per 32 weights */
static void matvec_dm_ref(int fmt, size_t gbb, const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out,
                          int ldo, int g0, int g1) {
    int nb = w->k / RL_QK;
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * gbb;
        for (int r = 0; r < rows; r++) {
            const int8_t *xq = x->q + (size_t)r * ldx * RL_QK;
            const float *xd = x->d + (size_t)r * ldx, *xs = x->s + (size_t)r * ldx;
            for (int j = 0; j < RL_ROWS; j++) {
                float acc = 0.0f;
                for (int b = 0; b < nb; b++) {
                    const uint8_t *gb = base + (size_t)b * gbb;
                    uint16_t dh, mh;
                    __builtin_memcpy(&dh, gb + 2 * j, 2);
                    float d = rl_half_to_float(dh), m = -8.0f * d;
                    if (fmt != RL_Q4_0) { /* RL_Q4_0 stores no m: w = d * (code - 8) */
                        __builtin_memcpy(&mh, gb + 16 + 2 * j, 2);
                        m = rl_half_to_float(mh);
                    }
                    const int8_t *xb = xq + b * RL_QK;
                    int sum = 0;
                    for (int i = 0; i < RL_QK; i++) sum += rl_code(fmt, gb, j, i) * xb[i];
                    acc += d * xd[b] * (float)sum + m * xs[b];
                }
                int n = g * RL_ROWS + j;
                out[(size_t)r * ldo + n] = acc + (w->bias && n < w->n ? w->bias[n] : 0.0f);
            }
        }
    }
}

void rl_matvec_q4_ref(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                      int g1) {
    matvec_dm_ref(RL_Q4, RL_Q4_GROUP_BLOCK, w, x, rows, ldx, out, ldo, g0, g1);
}

void rl_matvec_q4_0_ref(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                        int g1) {
    matvec_dm_ref(RL_Q4_0, RL_Q4_0_GROUP_BLOCK, w, x, rows, ldx, out, ldo, g0, g1);
}

void rl_matvec_q5_ref(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                      int g1) {
    matvec_dm_ref(RL_Q5, RL_Q5_GROUP_BLOCK, w, x, rows, ldx, out, ldo, g0, g1);
}

/* RL_Q6: w = dlo * (code - 32) over the first 16 weights of a block, dhi * (code - 32) over the rest; the
 * offset leaves the integer sums exact: sum (code - 32) q = sum code q - 32 sum q (h holds sum q per 16) */
void rl_matvec_q6_ref(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                      int g1) {
    int nb = w->k / RL_QK;
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * RL_Q6_GROUP_BLOCK;
        for (int r = 0; r < rows; r++) {
            const int8_t *xq = x->q + (size_t)r * ldx * RL_QK;
            const float *xd = x->d + (size_t)r * ldx;
            const int32_t *xh = x->h + (size_t)r * ldx * 2;
            for (int j = 0; j < RL_ROWS; j++) {
                float acc = 0.0f;
                for (int b = 0; b < nb; b++) {
                    const uint8_t *gb = base + (size_t)b * RL_Q6_GROUP_BLOCK;
                    uint16_t lh, hh;
                    __builtin_memcpy(&lh, gb + 2 * j, 2);
                    __builtin_memcpy(&hh, gb + 16 + 2 * j, 2);
                    const int8_t *xb = xq + b * RL_QK;
                    int lo = 0, hi = 0;
                    for (int i = 0; i < 16; i++) lo += rl_code(RL_Q6, gb, j, i) * xb[i];
                    for (int i = 16; i < RL_QK; i++) hi += rl_code(RL_Q6, gb, j, i) * xb[i];
                    lo -= 32 * xh[2 * b], hi -= 32 * xh[2 * b + 1];
                    acc += rl_half_to_float(lh) * xd[b] * (float)lo + rl_half_to_float(hh) * xd[b] * (float)hi;
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
        const uint8_t *base = w->data + (size_t)g * nb * RL_Q8_GROUP_BLOCK;
        for (int r = 0; r < rows; r++) {
            const int8_t *xq = x->q + (size_t)r * ldx * RL_QK;
            const float *xd = x->d + (size_t)r * ldx;
            for (int j = 0; j < RL_ROWS; j++) {
                float acc = 0.0f;
                for (int b = 0; b < nb; b++) {
                    const uint8_t *gb = base + (size_t)b * RL_Q8_GROUP_BLOCK;
                    uint16_t dh;
                    __builtin_memcpy(&dh, gb + 2 * j, 2);
                    const int8_t *xb = xq + b * RL_QK;
                    int sum = 0;
                    for (int i = 0; i < RL_QK; i++) sum += (int8_t)gb[16 + 32 * (i / 4) + 4 * j + i % 4] * xb[i];
                    acc += rl_half_to_float(dh) * xd[b] * (float)sum;
                }
                int n = g * RL_ROWS + j;
                out[(size_t)r * ldo + n] = acc + (w->bias && n < w->n ? w->bias[n] : 0.0f);
            }
        }
    }
}

/* code i (0..255) of row r in an RL_T2 group-block (see repack.c): t + 1 of the ternary weight */
static inline int t2_code(const uint8_t *gb, int r, int i) {
    int s = i / 32, h = (i / 16) & 1, j = (i / 4) & 3, t = i & 3;
    return (gb[16 + 64 * s + 32 * h + 4 * r + t] >> (2 * j)) & 3;
}

/* w = d (c - 1) with one d per row and 256 inputs: each 32-input block adds d_x sum(c q) - s_x, scaled by
 * d once per 256 */
void rl_matvec_t2_ref(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                      int g1) {
    int nb = w->k / RL_T2_QK;
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * RL_T2_GROUP_BLOCK;
        for (int r = 0; r < rows; r++) {
            const int8_t *xq = x->q + (size_t)r * ldx * RL_QK;
            const float *xd = x->d + (size_t)r * ldx, *xs = x->s + (size_t)r * ldx;
            for (int j = 0; j < RL_ROWS; j++) {
                float acc = 0.0f;
                for (int b = 0; b < nb; b++) {
                    const uint8_t *gb = base + (size_t)b * RL_T2_GROUP_BLOCK;
                    uint16_t dh;
                    __builtin_memcpy(&dh, gb + 2 * j, 2);
                    float part = 0.0f;
                    for (int s = 0; s < RL_T2_QK / RL_QK; s++) {
                        int xb = b * (RL_T2_QK / RL_QK) + s, sum = 0;
                        for (int i = 0; i < RL_QK; i++) sum += t2_code(gb, j, RL_QK * s + i) * xq[RL_QK * xb + i];
                        part += xd[xb] * (float)sum - xs[xb];
                    }
                    acc += rl_half_to_float(dh) * part;
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

void rl_attn_part_ref(const rl_attn_args *a, int k0, int k1, float *scratch, float *m, float *l, float *acc) {
    int n = k1 - k0, d = a->d;
    float *row = scratch + (size_t)a->G * n;
    int64_t *off = rl_offsets_in(scratch, a->G, n, d);
    rl_key_offsets(a, k0, k1, off);
    for (int t = k0; t < k1; t++) {
        const uint16_t *kp = a->kbase + off[t - k0];
        rl_kv_to_float_ref(kp, row, d, a->kv_f16);
        for (int g = 0; g < a->G; g++) scratch[(size_t)g * n + (t - k0)] = rl_dot_ref(a->q + (size_t)g * d, row, d) * a->scale;
    }
    for (int g = 0; g < a->G; g++) {
        float *s = scratch + (size_t)g * n, mx = -INFINITY, sum = 0.0f;
        for (int i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
        for (int i = 0; i < n; i++) {
            s[i] = expf(s[i] - mx);
            sum += s[i];
        }
        m[g] = mx, l[g] = sum;
        for (int i = 0; i < d; i++) acc[(size_t)g * d + i] = 0.0f;
    }
    for (int t = k0; t < k1; t++) {
        const uint16_t *vp = a->vbase + off[t - k0];
        rl_kv_to_float_ref(vp, row, d, a->kv_f16);
        for (int g = 0; g < a->G; g++) rl_axpy_ref(acc + (size_t)g * d, scratch[(size_t)g * n + (t - k0)], row, d);
    }
}
