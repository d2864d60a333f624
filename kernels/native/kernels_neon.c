/* ARM64 NEON kernels: the ARM counterpart of kernels_avx2.c, for the same reasons (our own layout from
 * repack.c, int8 activations quantized once and shared, one 32-bit lane per output row; no library ships
 * int8 kernels for that layout). NEON is baseline on ARM64, so quantize, exp and the attention range need
 * no attribute (RL_ISA_NEON). The int8 matvecs use the dot-product extension (vdotq_laneq_s32), compiled
 * under #pragma GCC target("arch=armv8.2-a+dotprod") (gcc 12 will not inline the intrinsics under "+dotprod"
 * alone; every CPU with dotprod is ARMv8.2 or later) and called only after a run-time check (rl_neon_has_dotprod: HWCAP_ASIMDDP on
 * Linux, hw.optional.arm.FEAT_DotProd on macOS): RL_ISA_DOTPROD. Every format has a dotprod matvec (RL_Q4,
 * RL_Q4_0, RL_Q5, RL_Q6, RL_Q8, RL_T2); on a CPU without dotprod the matvecs run the reference C kernels.
 *
 * Same math as the AVX2 path: activations rounded half to even with the same amax / 127 scale (bit-exact
 * with the reference); per block acc += f * (d8 * dx), then acc += m8 * sx, so a row's result does not
 * depend on its batch.
 *
 * Tested only under qemu-aarch64 user mode (tests/native_neon_check.c via tests/test_cpu_portability.py):
 * -cpu max (dotprod) and -cpu cortex-a53 (NEON without dotprod), each path against the reference. Not run
 * on real ARM hardware, not timed; Apple Silicon (macOS detection, clang) is untested.
 */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <math.h>
#include <string.h>

#include "ripe_native.h"

#if defined(__APPLE__)
#include <sys/sysctl.h>
#else
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#endif

int rl_neon_has_dotprod(void) {
#if defined(__APPLE__)
    int v = 0;
    size_t len = sizeof(v);
    if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, NULL, 0) != 0) return 0;
    return v != 0;
#else
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
}

/* ---- quantize (plain NEON) ---------------------------------------------------------------------- */

void rl_quantize_neon(const float *x, int k, int8_t *q, float *d, float *s, int32_t *h) {
    for (int b = 0; b < k / RL_QK; b++) {
        const float *xb = x + b * RL_QK;
        float32x4_t v[8];
        for (int i = 0; i < 8; i++) v[i] = vld1q_f32(xb + 4 * i);
        float32x4_t m = vmaxq_f32(vmaxq_f32(vmaxq_f32(vabsq_f32(v[0]), vabsq_f32(v[1])),
                                            vmaxq_f32(vabsq_f32(v[2]), vabsq_f32(v[3]))),
                                  vmaxq_f32(vmaxq_f32(vabsq_f32(v[4]), vabsq_f32(v[5])),
                                            vmaxq_f32(vabsq_f32(v[6]), vabsq_f32(v[7]))));
        float amax = vmaxvq_f32(m);
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32x4_t iv[8];
        for (int i = 0; i < 8; i++) iv[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i], id)); /* ties to even */
        int32_t lo = vaddvq_s32(vaddq_s32(vaddq_s32(iv[0], iv[1]), vaddq_s32(iv[2], iv[3])));
        int32_t hi = vaddvq_s32(vaddq_s32(vaddq_s32(iv[4], iv[5]), vaddq_s32(iv[6], iv[7])));
        h[2 * b] = lo, h[2 * b + 1] = hi;
        for (int i = 0; i < 4; i++) {
            int16x8_t p = vcombine_s16(vqmovn_s32(iv[2 * i]), vqmovn_s32(iv[2 * i + 1]));
            vst1_s8(q + b * RL_QK + 8 * i, vqmovn_s16(p));
        }
        d[b] = amax / 127.0f;
        s[b] = d[b] * (float)(lo + hi);
    }
}

/* ---- helpers ------------------------------------------------------------------------------------- */

static inline float32x4_t half4(const uint8_t *p) {
    uint16_t t[4];
    memcpy(t, p, 8);
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(t)));
}

static inline void store_rows(const rl_matrix *w, float *out, int g, float32x4_t lo, float32x4_t hi) {
    float vals[8];
    vst1q_f32(vals, lo);
    vst1q_f32(vals + 4, hi);
    for (int j = 0; j < RL_ROWS; j++) {
        int n = g * RL_ROWS + j;
        out[n] = vals[j] + (w->bias && n < w->n ? w->bias[n] : 0.0f);
    }
}

/* ---- int8 matvecs (dot-product extension) -------------------------------------------------------- */

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")

#define DP_ROWS 4 /* activation rows sharing one unpacked group-block */

/* The nibble formats (repack.c): byte 4 r + t of code vector v holds row r's code 4 v + t (low nibble) and
 * 16 + 4 v + t (high nibble); bytes 0..15 of a vector are rows 0..3, bytes 16..31 rows 4..7. RL_Q5 adds
 * bit 4 from the plane at byte 160 (bit v of a plane byte: the low-nibble code's, bit 4 + v: the high
 * one's), RL_Q6 bit 5 from the plane at byte 192. Codes reach 63 at most, so they are valid int8 lanes.
 * Low-nibble codes pair with activations 0..15 (x0), high-nibble codes with 16..31 (x1). */
enum { K_Q4_0, K_Q4, K_Q5, K_Q6 };

static inline __attribute__((always_inline)) void nib_matvec(const rl_matrix *w, const rl_qact *x, int rows,
                                                             int ldx, float *out, int ldo, int g0, int g1,
                                                             int kind) {
    const int nb = w->k / RL_QK;
    const int bytes = kind == K_Q4_0 ? RL_Q4_0_GROUP_BLOCK
                      : kind == K_Q4 ? RL_Q4_GROUP_BLOCK
                      : kind == K_Q5 ? RL_Q5_GROUP_BLOCK
                                     : RL_Q6_GROUP_BLOCK;
    const uint8x16_t lowmask = vdupq_n_u8(0x0f), bit4 = vdupq_n_u8(0x10), bit5 = vdupq_n_u8(0x20);
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * bytes;
        for (int r0 = 0; r0 < rows; r0 += DP_ROWS) {
            int rn = rows - r0 < DP_ROWS ? rows - r0 : DP_ROWS;
            float32x4_t alo[DP_ROWS], ahi[DP_ROWS];
            for (int r = 0; r < DP_ROWS; r++) alo[r] = ahi[r] = vdupq_n_f32(0.0f);
            for (int b = 0; b < nb; b++) {
                const uint8_t *gb = base + (size_t)b * bytes, *codes = gb + (kind == K_Q4_0 ? 16 : 32);
                int8x16_t l[4][2], hh[4][2];
                for (int z = 0; z < 2; z++) {
                    uint8x16_t p4 = vdupq_n_u8(0), p5 = vdupq_n_u8(0);
                    if (kind >= K_Q5) p4 = vld1q_u8(gb + 160 + 16 * z);
                    if (kind == K_Q6) p5 = vld1q_u8(gb + 192 + 16 * z);
                    for (int v = 0; v < 4; v++) {
                        uint8x16_t c = vld1q_u8(codes + 32 * v + 16 * z);
                        uint8x16_t lo = vandq_u8(c, lowmask), hi = vshrq_n_u8(c, 4);
                        if (kind >= K_Q5) {
                            lo = vorrq_u8(lo, vandq_u8(vshlq_u8(p4, vdupq_n_s8((int8_t)(4 - v))), bit4));
                            hi = vorrq_u8(hi, vandq_u8(vshlq_u8(p4, vdupq_n_s8((int8_t)-v)), bit4));
                        }
                        if (kind == K_Q6) {
                            lo = vorrq_u8(lo, vandq_u8(vshlq_u8(p5, vdupq_n_s8((int8_t)(5 - v))), bit5));
                            hi = vorrq_u8(hi, vandq_u8(vshlq_u8(p5, vdupq_n_s8((int8_t)(1 - v))), bit5));
                        }
                        l[v][z] = vreinterpretq_s8_u8(lo), hh[v][z] = vreinterpretq_s8_u8(hi);
                    }
                }
                /* RL_Q4, RL_Q5: d, m; RL_Q6: dlo, dhi; RL_Q4_0: d and m = -8 d */
                float32x4_t dlo = half4(gb), dhi = half4(gb + 8), mlo, mhi;
                if (kind == K_Q4_0) mlo = vmulq_n_f32(dlo, -8.0f), mhi = vmulq_n_f32(dhi, -8.0f);
                else mlo = half4(gb + 16), mhi = half4(gb + 24);
                for (int r = 0; r < rn; r++) {
                    size_t xi = (size_t)(r0 + r) * ldx + b;
                    const int8_t *xb = x->q + xi * RL_QK;
                    int8x16_t x0 = vld1q_s8(xb), x1 = vld1q_s8(xb + 16);
                    int32x4_t l0 = vdupq_n_s32(0), l1 = vdupq_n_s32(0), h0 = vdupq_n_s32(0), h1 = vdupq_n_s32(0);
#define NIB_STEP(v)                                                                                            \
    l0 = vdotq_laneq_s32(l0, l[v][0], x0, v), h0 = vdotq_laneq_s32(h0, hh[v][0], x1, v);                        \
    l1 = vdotq_laneq_s32(l1, l[v][1], x0, v), h1 = vdotq_laneq_s32(h1, hh[v][1], x1, v);
                    NIB_STEP(0) NIB_STEP(1) NIB_STEP(2) NIB_STEP(3)
#undef NIB_STEP
                    float dx = x->d[xi];
                    if (kind == K_Q6) { /* w = d (code - 32): the offset off the exact integer sums */
                        int32x4_t o0 = vdupq_n_s32(32 * x->h[2 * xi]), o1 = vdupq_n_s32(32 * x->h[2 * xi + 1]);
                        float32x4_t hlo = half4(gb + 16), hhi = half4(gb + 24);
                        alo[r] = vfmaq_f32(alo[r], vcvtq_f32_s32(vsubq_s32(l0, o0)), vmulq_n_f32(dlo, dx));
                        ahi[r] = vfmaq_f32(ahi[r], vcvtq_f32_s32(vsubq_s32(l1, o0)), vmulq_n_f32(dhi, dx));
                        alo[r] = vfmaq_f32(alo[r], vcvtq_f32_s32(vsubq_s32(h0, o1)), vmulq_n_f32(hlo, dx));
                        ahi[r] = vfmaq_f32(ahi[r], vcvtq_f32_s32(vsubq_s32(h1, o1)), vmulq_n_f32(hhi, dx));
                    } else { /* acc += f * (d8 * dx), then acc += m8 * sx, as the AVX2 path */
                        float sx = x->s[xi];
                        alo[r] = vfmaq_f32(alo[r], vcvtq_f32_s32(vaddq_s32(l0, h0)), vmulq_n_f32(dlo, dx));
                        ahi[r] = vfmaq_f32(ahi[r], vcvtq_f32_s32(vaddq_s32(l1, h1)), vmulq_n_f32(dhi, dx));
                        alo[r] = vfmaq_f32(alo[r], mlo, vdupq_n_f32(sx));
                        ahi[r] = vfmaq_f32(ahi[r], mhi, vdupq_n_f32(sx));
                    }
                }
            }
            for (int r = 0; r < rn; r++) store_rows(w, out + (size_t)(r0 + r) * ldo, g, alo[r], ahi[r]);
        }
    }
}

void rl_matvec_q4_dotprod(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                          int g1) {
    nib_matvec(w, x, rows, ldx, out, ldo, g0, g1, K_Q4);
}

void rl_matvec_q4_0_dotprod(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                            int g1) {
    nib_matvec(w, x, rows, ldx, out, ldo, g0, g1, K_Q4_0);
}

void rl_matvec_q5_dotprod(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                          int g1) {
    nib_matvec(w, x, rows, ldx, out, ldo, g0, g1, K_Q5);
}

void rl_matvec_q6_dotprod(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                          int g1) {
    nib_matvec(w, x, rows, ldx, out, ldo, g0, g1, K_Q6);
}

/* RL_T2 (w = d c - d, 2-bit codes, one d per row and 256 inputs): per 32 inputs s, vector h (rows 0..3 in
 * bytes 0..15, rows 4..7 in 16..31) holds in bits 2 j the codes that pair with activations 16 h + 4 j..+3.
 * As the AVX2 path: acc += f * (d8 * dx) per 32 inputs, then acc -= d8 * (sum of the 8 blocks' s_x). */
void rl_matvec_t2_dotprod(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                          int g1) {
    const int nb = w->k / RL_T2_QK, sub = RL_T2_QK / RL_QK;
    const uint8x16_t three = vdupq_n_u8(3);
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * RL_T2_GROUP_BLOCK;
        for (int r0 = 0; r0 < rows; r0 += DP_ROWS) {
            int rn = rows - r0 < DP_ROWS ? rows - r0 : DP_ROWS;
            float32x4_t alo[DP_ROWS], ahi[DP_ROWS];
            for (int r = 0; r < DP_ROWS; r++) alo[r] = ahi[r] = vdupq_n_f32(0.0f);
            for (int b = 0; b < nb; b++) {
                const uint8_t *gb = base + (size_t)b * RL_T2_GROUP_BLOCK;
                float32x4_t dlo = half4(gb), dhi = half4(gb + 8);
                for (int s = 0; s < sub; s++) {
                    const uint8_t *cb = gb + 16 + 64 * s;
                    int8x16_t c[2][4][2]; /* [h][j][rows 0..3 / 4..7] */
                    for (int h = 0; h < 2; h++)
                        for (int z = 0; z < 2; z++) {
                            uint8x16_t v = vld1q_u8(cb + 32 * h + 16 * z);
                            for (int j = 0; j < 4; j++)
                                c[h][j][z] = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(v, vdupq_n_s8((int8_t)(-2 * j))), three));
                        }
                    for (int r = 0; r < rn; r++) {
                        size_t xi = (size_t)(r0 + r) * ldx + (size_t)b * sub + s;
                        const int8_t *xb = x->q + xi * RL_QK;
                        int8x16_t x0 = vld1q_s8(xb), x1 = vld1q_s8(xb + 16);
                        int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
#define T2_STEP(j)                                                                                             \
    s0 = vdotq_laneq_s32(s0, c[0][j][0], x0, j), s1 = vdotq_laneq_s32(s1, c[0][j][1], x0, j);                  \
    s0 = vdotq_laneq_s32(s0, c[1][j][0], x1, j), s1 = vdotq_laneq_s32(s1, c[1][j][1], x1, j);
                        T2_STEP(0) T2_STEP(1) T2_STEP(2) T2_STEP(3)
#undef T2_STEP
                        float dx = x->d[xi];
                        alo[r] = vfmaq_f32(alo[r], vcvtq_f32_s32(s0), vmulq_n_f32(dlo, dx));
                        ahi[r] = vfmaq_f32(ahi[r], vcvtq_f32_s32(s1), vmulq_n_f32(dhi, dx));
                    }
                }
                for (int r = 0; r < rn; r++) {
                    const float *xs = x->s + (size_t)(r0 + r) * ldx + (size_t)b * sub;
                    float sx = 0.0f;
                    for (int s = 0; s < sub; s++) sx += xs[s];
                    alo[r] = vfmsq_f32(alo[r], dlo, vdupq_n_f32(sx));
                    ahi[r] = vfmsq_f32(ahi[r], dhi, vdupq_n_f32(sx));
                }
            }
            for (int r = 0; r < rn; r++) store_rows(w, out + (size_t)(r0 + r) * ldo, g, alo[r], ahi[r]);
        }
    }
}

/* RL_Q8: byte 4 r + t of vector v (8 vectors) is row r's signed weight 4 v + t */
void rl_matvec_q8_dotprod(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo, int g0,
                          int g1) {
    const int nb = w->k / RL_QK;
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * RL_Q8_GROUP_BLOCK;
        for (int r0 = 0; r0 < rows; r0 += DP_ROWS) {
            int rn = rows - r0 < DP_ROWS ? rows - r0 : DP_ROWS;
            float32x4_t alo[DP_ROWS], ahi[DP_ROWS];
            for (int r = 0; r < DP_ROWS; r++) alo[r] = ahi[r] = vdupq_n_f32(0.0f);
            for (int b = 0; b < nb; b++) {
                const uint8_t *gb = base + (size_t)b * RL_Q8_GROUP_BLOCK;
                int8x16_t wv[8][2];
                for (int v = 0; v < 8; v++)
                    for (int z = 0; z < 2; z++) wv[v][z] = vld1q_s8((const int8_t *)(gb + 16 + 32 * v + 16 * z));
                float32x4_t dlo = half4(gb), dhi = half4(gb + 8);
                for (int r = 0; r < rn; r++) {
                    size_t xi = (size_t)(r0 + r) * ldx + b;
                    const int8_t *xb = x->q + xi * RL_QK;
                    int8x16_t x0 = vld1q_s8(xb), x1 = vld1q_s8(xb + 16);
                    int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
#define Q8_STEP(v)                                                                                             \
    s0 = vdotq_laneq_s32(s0, wv[v][0], x0, v), s1 = vdotq_laneq_s32(s1, wv[v][1], x0, v);                      \
    s0 = vdotq_laneq_s32(s0, wv[v + 4][0], x1, v), s1 = vdotq_laneq_s32(s1, wv[v + 4][1], x1, v);
                    Q8_STEP(0) Q8_STEP(1) Q8_STEP(2) Q8_STEP(3)
#undef Q8_STEP
                    float dx = x->d[xi];
                    alo[r] = vfmaq_f32(alo[r], vcvtq_f32_s32(s0), vmulq_n_f32(dlo, dx));
                    ahi[r] = vfmaq_f32(ahi[r], vcvtq_f32_s32(s1), vmulq_n_f32(dhi, dx));
                }
            }
            for (int r = 0; r < rn; r++) store_rows(w, out + (size_t)(r0 + r) * ldo, g, alo[r], ahi[r]);
        }
    }
}

#pragma GCC pop_options

/* ---- exp and the attention range (plain NEON) ---------------------------------------------------- */

/* exp in float32 (Cephes' polynomial, as kernels_avx2.c's exp8), arguments clamped to the float range */
static inline float32x4_t exp4(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.33654f)), vdupq_n_f32(88.72283f));
    float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500E-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507E-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073E-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894E-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459E-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201E-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    /* 2^n in two halves so n = 128 does not overflow the exponent field */
    int32x4_t ni = vcvtnq_s32_f32(n), h1 = vshrq_n_s32(ni, 1), h2 = vsubq_s32(ni, h1);
    float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(h1, vdupq_n_s32(127)), 23));
    float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(h2, vdupq_n_s32(127)), 23));
    return vmulq_f32(vmulq_f32(p, s1), s2);
}

void rl_exp_neon(float *x, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, exp4(vld1q_f32(x + i)));
    for (; i < n; i++) x[i] = expf(x[i]);
}

/* a K/V row (f16 or bf16) to float32, d a multiple of 4 */
static inline void kv_row(const uint16_t *src, float *dst, int d, int f16) {
    for (int i = 0; i < d; i += 4) {
        uint16x4_t h = vld1_u16(src + i);
        float32x4_t f = f16 ? vcvt_f32_f16(vreinterpret_f16_u16(h)) : vreinterpretq_f32_u32(vshll_n_u16(h, 16));
        vst1q_f32(dst + i, f);
    }
}

/* one head's softmax pieces over its n scores s (in place: s becomes exp(s - m)) */
static void softmax_neon(float *s, int n, float *m, float *l) {
    float32x4_t mx4 = vdupq_n_f32(-INFINITY);
    int i = 0;
    for (; i + 4 <= n; i += 4) mx4 = vmaxq_f32(mx4, vld1q_f32(s + i));
    float mx = vmaxvq_f32(mx4);
    for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    float32x4_t vm = vdupq_n_f32(mx), sum4 = vdupq_n_f32(0.0f);
    for (i = 0; i + 4 <= n; i += 4) {
        float32x4_t e = exp4(vsubq_f32(vld1q_f32(s + i), vm));
        vst1q_f32(s + i, e);
        sum4 = vaddq_f32(sum4, e);
    }
    float sum = vaddvq_f32(sum4);
    for (; i < n; i++) {
        s[i] = expf(s[i] - mx);
        sum += s[i];
    }
    *m = mx, *l = sum;
}

static inline float dot_neon(const float *q, const float *row, int d) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = vdupq_n_f32(0.0f);
    for (int i = 0; i < d; i += 8) {
        s0 = vfmaq_f32(s0, vld1q_f32(q + i), vld1q_f32(row + i));
        s1 = vfmaq_f32(s1, vld1q_f32(q + i + 4), vld1q_f32(row + i + 4));
    }
    return vaddvq_f32(vaddq_f32(s0, s1));
}

static inline void axpy_neon(float *acc, float p, const float *row, int d) {
    float32x4_t pv = vdupq_n_f32(p);
    for (int i = 0; i < d; i += 4) vst1q_f32(acc + i, vfmaq_f32(vld1q_f32(acc + i), pv, vld1q_f32(row + i)));
}

/* R rows of one sequence over one K/V head (see rl_attn_rows_avx2), row r's partial at m[r], l[r], acc[r]:
 * each key and value row is converted once for all R * G heads; a head's scores, softmax and weighted sum
 * take the same operations in the same order whatever R is, so a row's result is the same bits alone and
 * in a group. Any head_dim that is a multiple of 8 (decode_step.c sends the others to the reference). */
static void attn_rows(const rl_attn_args *a, int R, const float *const *q, const int *k0, const int *k1,
                      float *const *m, float *const *l, float *const *acc, float *scratch) {
    const int d = a->d, G = a->G, H = R * G, f16 = a->kv_f16, K0 = k0[0], n = k1[R - 1] - K0;
    float *row = scratch + (size_t)H * n;
    int64_t *off = rl_offsets_in(scratch, H, n, d);
    rl_key_offsets(a, K0, K0 + n, off);
    for (int t = 0; t < n; t++) {
        kv_row(a->kbase + off[t], row, d, f16);
        for (int r = 0; r < R; r++)
            if (K0 + t >= k0[r] && K0 + t < k1[r])
                for (int g = 0; g < G; g++)
                    scratch[(size_t)(r * G + g) * n + t] = dot_neon(q[r] + (size_t)g * d, row, d) * a->scale;
    }
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) {
            softmax_neon(scratch + (size_t)(r * G + g) * n + (k0[r] - K0), k1[r] - k0[r], m[r] + g, l[r] + g);
            for (int z = 0; z < d; z++) acc[r][(size_t)g * d + z] = 0.0f;
        }
    for (int t = 0; t < n; t++) {
        kv_row(a->vbase + off[t], row, d, f16);
        for (int r = 0; r < R; r++)
            if (K0 + t >= k0[r] && K0 + t < k1[r])
                for (int g = 0; g < G; g++)
                    axpy_neon(acc[r] + (size_t)g * d, scratch[(size_t)(r * G + g) * n + t], row, d);
    }
}

int rl_attn_rows_neon(const rl_attn_args *a, int R, const float *const *q, const int *k0, const int *k1,
                      float *const *out, float *scratch) {
    float *m[RL_ATTN_ROWS_HEADS], *l[RL_ATTN_ROWS_HEADS], *acc[RL_ATTN_ROWS_HEADS];
    if (R > RL_ATTN_ROWS_HEADS) return 0;
    for (int r = 0; r < R; r++) m[r] = out[r], l[r] = out[r] + a->G, acc[r] = out[r] + 2 * a->G;
    attn_rows(a, R, q, k0, k1, m, l, acc, scratch);
    return 1;
}

/* one row: the reference's structure (rl_attn_part_ref) with NEON dot products, exp and FMAs */
void rl_attn_part_neon(const rl_attn_args *a, int k0, int k1, float *scratch, float *m, float *l, float *acc) {
    const float *q = a->q;
    attn_rows(a, 1, &q, &k0, &k1, &m, &l, &acc, scratch);
}
#endif
