/* AVX2 + FMA + F16C kernels. Compiled with function target attributes (not -mavx2 for the file), so the
 * library loads on any x86-64 CPU; decode_step.c calls them only after checking the CPU has AVX2. */
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <math.h>

#include "ripe_native.h"
#include "x86_helpers.h"

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 void rl_quantize_avx2(const float *x, int k, int8_t *q, float *d, float *s, int32_t *h) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < k / RL_QK; b++) {
        const float *xb = x + b * RL_QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
               v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256 vid = _mm256_set1_ps(id);
        const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        v0 = _mm256_round_ps(_mm256_mul_ps(v0, vid), mode);
        v1 = _mm256_round_ps(_mm256_mul_ps(v1, vid), mode);
        v2 = _mm256_round_ps(_mm256_mul_ps(v2, vid), mode);
        v3 = _mm256_round_ps(_mm256_mul_ps(v3, vid), mode);
        /* exact: small ints */
        float lo = hsum8(_mm256_add_ps(v0, v1)), hi = hsum8(_mm256_add_ps(v2, v3)), sum = lo + hi;
        h[2 * b] = (int32_t)lo, h[2 * b + 1] = (int32_t)hi;
        __m256i i0 = _mm256_cvtps_epi32(v0), i1 = _mm256_cvtps_epi32(v1), i2 = _mm256_cvtps_epi32(v2),
                i3 = _mm256_cvtps_epi32(v3);
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + b * RL_QK), _mm256_permutevar8x32_epi32(p, perm));
        d[b] = amax / 127.0f;
        s[b] = d[b] * sum;
    }
}

/* row sums of 32 codes times 32 activations, one 32-bit lane per output row: the eight maddubs partial
 * sums stay in 16 bits (16 products of at most 15 * 127 fit) until one widening per block */
AVX2 static inline __attribute__((always_inline)) __m256i q4_dot_avx2(__m256i l0, __m256i h0, __m256i l1, __m256i h1, __m256i l2, __m256i h2, __m256i l3,
                                   __m256i h3, const int8_t *xb) {
    __m256i s = _mm256_maddubs_epi16(l0, _mm256_set1_epi32(load_i32(xb)));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(h0, _mm256_set1_epi32(load_i32(xb + 16))));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(l1, _mm256_set1_epi32(load_i32(xb + 4))));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(h1, _mm256_set1_epi32(load_i32(xb + 20))));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(l2, _mm256_set1_epi32(load_i32(xb + 8))));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(h2, _mm256_set1_epi32(load_i32(xb + 24))));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(l3, _mm256_set1_epi32(load_i32(xb + 12))));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(h3, _mm256_set1_epi32(load_i32(xb + 28))));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

AVX2 static inline __attribute__((always_inline)) __m256i q8_acc_avx2(__m256i s, __m256i aw, __m256i xv) {
    return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), _mm256_set1_epi16(1)));
}

#define ISA AVX2
#define KI AVX2 static inline __attribute__((always_inline))
#define F(name) name##_avx2
#include "x86_int8_dots.inc"
#undef F
#undef KI
#undef ISA


/* RL_Q5: RL_Q4's loop with each code's fifth bit shifted in from the plane (repack.c): bit v of a plane
 * byte belongs to vector v's low-nibble code, bit 4 + v to its high-nibble code; a 16-bit shift spills
 * bits across the byte boundary only where the 0x10 mask drops them. Codes reach 31, so four maddubs
 * (8 products of at most 31 * 127) are summed in 16 bits before each widening. */
AVX2 void rl_matvec_q5_avx2(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo,
                            int g0, int g1) {
    const int nb = w->k / RL_QK;
    const __m256i lowmask = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[32];
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * RL_Q5_GROUP_BLOCK;
        for (int r0 = 0; r0 < rows; r0 += 32) {
            int rn = rows - r0 < 32 ? rows - r0 : 32;
            for (int r = 0; r < rn; r++) acc[r] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *gb = base + (size_t)b * RL_Q5_GROUP_BLOCK;
                _mm_prefetch((const char *)(gb + 4 * RL_Q5_GROUP_BLOCK), _MM_HINT_T0);
                _mm_prefetch((const char *)(gb + 4 * RL_Q5_GROUP_BLOCK + 64), _MM_HINT_T0);
                _mm_prefetch((const char *)(gb + 4 * RL_Q5_GROUP_BLOCK + 128), _MM_HINT_T0);
                __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)gb));
                __m256 m8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 16)));
                __m256i p = _mm256_loadu_si256((const __m256i *)(gb + 160));
#define RL_Q5_UNPACK(v, l, h)                                                                                   \
    __m256i l, h;                                                                                              \
    {                                                                                                          \
        __m256i c = _mm256_loadu_si256((const __m256i *)(gb + 32 + 32 * (v)));                                  \
        l = _mm256_or_si256(_mm256_and_si256(c, lowmask), _mm256_and_si256(_mm256_slli_epi16(p, 4 - (v)), bit4)); \
        h = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), lowmask),                                 \
                            _mm256_and_si256(_mm256_srli_epi16(p, (v)), bit4));                                 \
    }
                RL_Q5_UNPACK(0, l0, h0)
                RL_Q5_UNPACK(1, l1, h1)
                RL_Q5_UNPACK(2, l2, h2)
                RL_Q5_UNPACK(3, l3, h3)
#undef RL_Q5_UNPACK
                for (int r = 0; r < rn; r++) {
                    const int8_t *xb = x->q + ((size_t)(r0 + r) * ldx + b) * RL_QK;
                    __m256i s = _mm256_maddubs_epi16(l0, _mm256_set1_epi32(load_i32(xb)));
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(h0, _mm256_set1_epi32(load_i32(xb + 16))));
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(l1, _mm256_set1_epi32(load_i32(xb + 4))));
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(h1, _mm256_set1_epi32(load_i32(xb + 20))));
                    __m256i t = _mm256_maddubs_epi16(l2, _mm256_set1_epi32(load_i32(xb + 8)));
                    t = _mm256_add_epi16(t, _mm256_maddubs_epi16(h2, _mm256_set1_epi32(load_i32(xb + 24))));
                    t = _mm256_add_epi16(t, _mm256_maddubs_epi16(l3, _mm256_set1_epi32(load_i32(xb + 12))));
                    t = _mm256_add_epi16(t, _mm256_maddubs_epi16(h3, _mm256_set1_epi32(load_i32(xb + 28))));
                    __m256i s32 = _mm256_add_epi32(_mm256_madd_epi16(s, ones), _mm256_madd_epi16(t, ones));
                    __m256 sf = _mm256_cvtepi32_ps(s32);
                    size_t xi = (size_t)(r0 + r) * ldx + b;
                    acc[r] = _mm256_fmadd_ps(sf, _mm256_mul_ps(d8, _mm256_set1_ps(x->d[xi])), acc[r]);
                    acc[r] = _mm256_fmadd_ps(m8, _mm256_set1_ps(x->s[xi]), acc[r]);
                }
            }
            for (int r = 0; r < rn; r++) {
                float vals[8];
                _mm256_storeu_ps(vals, acc[r]);
                store_rows(w, out + (size_t)(r0 + r) * ldo, g, vals);
            }
        }
    }
}

/* RL_Q6: codes 0..63 from the nibbles and two bit planes; the low-nibble codes (first 16 weights of the
 * block) and the high-nibble ones (last 16) are summed apart for their own scales, the -32 offset taken
 * off the int32 sums exactly (32 * the activation's sum per 16). A maddubs lane reaches 2 * 63 * 127, so
 * only two are summed in 16 bits. */
AVX2 void rl_matvec_q6_avx2(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo,
                            int g0, int g1) {
    const int nb = w->k / RL_QK;
    const __m256i lowmask = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10), bit5 = _mm256_set1_epi8(0x20);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[32];
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * RL_Q6_GROUP_BLOCK;
        for (int r0 = 0; r0 < rows; r0 += 32) {
            int rn = rows - r0 < 32 ? rows - r0 : 32;
            for (int r = 0; r < rn; r++) acc[r] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *gb = base + (size_t)b * RL_Q6_GROUP_BLOCK;
                _mm_prefetch((const char *)(gb + 4 * RL_Q6_GROUP_BLOCK), _MM_HINT_T0);
                _mm_prefetch((const char *)(gb + 4 * RL_Q6_GROUP_BLOCK + 64), _MM_HINT_T0);
                _mm_prefetch((const char *)(gb + 4 * RL_Q6_GROUP_BLOCK + 128), _MM_HINT_T0);
                _mm_prefetch((const char *)(gb + 4 * RL_Q6_GROUP_BLOCK + 192), _MM_HINT_T0);
                __m256 dl8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)gb));
                __m256 dh8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 16)));
                __m256i p4 = _mm256_loadu_si256((const __m256i *)(gb + 160));
                __m256i p5 = _mm256_loadu_si256((const __m256i *)(gb + 192));
#define RL_Q6_UNPACK(v, l, h)                                                                                   \
    __m256i l, h;                                                                                              \
    {                                                                                                          \
        __m256i c = _mm256_loadu_si256((const __m256i *)(gb + 32 + 32 * (v)));                                  \
        l = _mm256_or_si256(_mm256_and_si256(c, lowmask), _mm256_and_si256(_mm256_slli_epi16(p4, 4 - (v)), bit4)); \
        l = _mm256_or_si256(l, _mm256_and_si256(_mm256_slli_epi16(p5, 5 - (v)), bit5));                         \
        __m256i b5 = _mm256_and_si256(_mm256_srli_epi16(p5, (v)), bit4);                                        \
        h = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), lowmask),                                 \
                            _mm256_and_si256(_mm256_srli_epi16(p4, (v)), bit4));                                \
        h = _mm256_or_si256(h, _mm256_add_epi8(b5, b5));                                                       \
    }
                RL_Q6_UNPACK(0, l0, h0)
                RL_Q6_UNPACK(1, l1, h1)
                RL_Q6_UNPACK(2, l2, h2)
                RL_Q6_UNPACK(3, l3, h3)
#undef RL_Q6_UNPACK
                for (int r = 0; r < rn; r++) {
                    size_t xi = (size_t)(r0 + r) * ldx + b;
                    const int8_t *xb = x->q + xi * RL_QK;
                    __m256i a = _mm256_add_epi16(_mm256_maddubs_epi16(l0, _mm256_set1_epi32(load_i32(xb))),
                                                 _mm256_maddubs_epi16(l1, _mm256_set1_epi32(load_i32(xb + 4))));
                    __m256i c = _mm256_add_epi16(_mm256_maddubs_epi16(l2, _mm256_set1_epi32(load_i32(xb + 8))),
                                                 _mm256_maddubs_epi16(l3, _mm256_set1_epi32(load_i32(xb + 12))));
                    __m256i lo = _mm256_add_epi32(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(c, ones));
                    a = _mm256_add_epi16(_mm256_maddubs_epi16(h0, _mm256_set1_epi32(load_i32(xb + 16))),
                                         _mm256_maddubs_epi16(h1, _mm256_set1_epi32(load_i32(xb + 20))));
                    c = _mm256_add_epi16(_mm256_maddubs_epi16(h2, _mm256_set1_epi32(load_i32(xb + 24))),
                                         _mm256_maddubs_epi16(h3, _mm256_set1_epi32(load_i32(xb + 28))));
                    __m256i hi = _mm256_add_epi32(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(c, ones));
                    lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(32 * x->h[2 * xi]));
                    hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(32 * x->h[2 * xi + 1]));
                    __m256 xd = _mm256_set1_ps(x->d[xi]);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(dl8, xd), acc[r]);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(dh8, xd), acc[r]);
                }
            }
            for (int r = 0; r < rn; r++) {
                float vals[8];
                _mm256_storeu_ps(vals, acc[r]);
                store_rows(w, out + (size_t)(r0 + r) * ldo, g, vals);
            }
        }
    }
}


/* Ternary (RL_T2, w = d c - d, codes c 0..3 in 2-bit fields): per 32 inputs two vectors hold the 8 rows'
 * codes; a shift and a mask give each vector of 32 codes, which pairs with one broadcast activation
 * quadruple as in the Q4 kernel. Sums stay in 16 bits within a block (8 products of at most 2 * 3 * 127).
 * d is one per row and 256 inputs: the offset -d s_x is added once per 256, from the blocks' summed s_x. */
AVX2 void rl_matvec_t2_avx2(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo,
                            int g0, int g1) {
    const int nb = w->k / RL_T2_QK, sub = RL_T2_QK / RL_QK;
    const __m256i three = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[32];
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * RL_T2_GROUP_BLOCK;
        for (int r0 = 0; r0 < rows; r0 += 32) {
            int rn = rows - r0 < 32 ? rows - r0 : 32;
            for (int r = 0; r < rn; r++) acc[r] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *gb = base + (size_t)b * RL_T2_GROUP_BLOCK;
                __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)gb));
                for (int s = 0; s < sub; s++) {
                    const uint8_t *cb = gb + 16 + 64 * s;
                    _mm_prefetch((const char *)(cb + 640), _MM_HINT_T0);
                    __m256i v0 = _mm256_loadu_si256((const __m256i *)cb);
                    __m256i v1 = _mm256_loadu_si256((const __m256i *)(cb + 32));
                    __m256i c0 = _mm256_and_si256(v0, three), c1 = _mm256_and_si256(_mm256_srli_epi16(v0, 2), three);
                    __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), three);
                    __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(v0, 6), three);
                    __m256i c4 = _mm256_and_si256(v1, three), c5 = _mm256_and_si256(_mm256_srli_epi16(v1, 2), three);
                    __m256i c6 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), three);
                    __m256i c7 = _mm256_and_si256(_mm256_srli_epi16(v1, 6), three);
                    for (int r = 0; r < rn; r++) {
                        size_t xi = (size_t)(r0 + r) * ldx + (size_t)b * sub + s;
                        const int8_t *xb = x->q + xi * RL_QK;
                        __m256i t = _mm256_maddubs_epi16(c0, _mm256_set1_epi32(load_i32(xb)));
                        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(c1, _mm256_set1_epi32(load_i32(xb + 4))));
                        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(c2, _mm256_set1_epi32(load_i32(xb + 8))));
                        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(c3, _mm256_set1_epi32(load_i32(xb + 12))));
                        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(c4, _mm256_set1_epi32(load_i32(xb + 16))));
                        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(c5, _mm256_set1_epi32(load_i32(xb + 20))));
                        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(c6, _mm256_set1_epi32(load_i32(xb + 24))));
                        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(c7, _mm256_set1_epi32(load_i32(xb + 28))));
                        __m256 sf = _mm256_cvtepi32_ps(_mm256_madd_epi16(t, ones));
                        acc[r] = _mm256_fmadd_ps(sf, _mm256_mul_ps(d8, _mm256_set1_ps(x->d[xi])), acc[r]);
                    }
                }
                for (int r = 0; r < rn; r++) {
                    const float *xs = x->s + (size_t)(r0 + r) * ldx + (size_t)b * sub;
                    float sx = 0.0f;
                    for (int s = 0; s < sub; s++) sx += xs[s];
                    acc[r] = _mm256_fnmadd_ps(d8, _mm256_set1_ps(sx), acc[r]);
                }
            }
            for (int r = 0; r < rn; r++) {
                float vals[8];
                _mm256_storeu_ps(vals, acc[r]);
                store_rows(w, out + (size_t)(r0 + r) * ldo, g, vals);
            }
        }
    }
}

/* exp in float32 (Cephes' polynomial; ~1 ulp), arguments clamped to the float range */
AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.72283f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n in two halves so n = 128 (x near 88.7) does not overflow the exponent field */
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

AVX2 void rl_exp_avx2(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) x[i] = expf(x[i]);
}
/* sums of eight vectors, as one vector */
AVX2 static inline __m256 hsum8x8(const __m256 *v) {
    __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

AVX2 static inline __attribute__((always_inline)) __m256 kv8(const uint16_t *p, int f16) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return f16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* softmax pieces of one head's scores s[0..n): m = max, l = sum exp(s - m); s becomes exp(s - m) */
AVX2 static void softmax_part(float *s, int n, float *m, float *l) {
    __m256 mx8 = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + i));
    float tmp[8], mx = -INFINITY;
    _mm256_storeu_ps(tmp, mx8);
    for (int z = 0; z < 8; z++) mx = tmp[z] > mx ? tmp[z] : mx;
    for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    __m256 vm = _mm256_set1_ps(mx), sum8 = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
        _mm256_storeu_ps(s + i, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum8(sum8);
    for (; i < n; i++) {
        s[i] = expf(s[i] - mx);
        sum += s[i];
    }
    *m = mx, *l = sum;
}

#define RL_ATTN_MAX_G 16
#define RL_ATTN_MAX_D 256

/* any head_dim that is a multiple of 8, at most 256; G at most 16 (decode_step.c checks, else the reference runs) */
AVX2 static void attn_part_generic(const rl_attn_args *a, int k0, int k1, float *scratch, float *m, float *l, float *acc) {
    const int n = k1 - k0, d = a->d, G = a->G, nv = d / 8, f16 = a->kv_f16;
    __m256 kf[RL_ATTN_MAX_D / 8];
    __m256 part[RL_ATTN_MAX_G][8];
    int64_t *off = rl_offsets_in(scratch, G, n, d);
    rl_key_offsets(a, k0, k1, off);
    for (int t = k0; t < k1 && t < k0 + 16; t++) {
        const char *kn = (const char *)(a->kbase + off[t - k0]), *vn = (const char *)(a->vbase + off[t - k0]);
        for (int i = 0; i < 2 * d; i += 64) _mm_prefetch(kn + i, _MM_HINT_T0), _mm_prefetch(vn + i, _MM_HINT_T1);
    }
    /* scores, eight keys at a time: one horizontal reduction for eight dot products */
    for (int t = k0; t < k1; t++) {
        const uint16_t *kp = a->kbase + off[t - k0];
        if (t + 16 < k1) { /* K and V rows sit apart in the pool: fetch both a few keys ahead */
            const char *kn = (const char *)(a->kbase + off[t + 16 - k0]);
            const char *vn = (const char *)(a->vbase + off[t + 16 - k0]);
            for (int i = 0; i < 2 * d; i += 64) _mm_prefetch(kn + i, _MM_HINT_T0), _mm_prefetch(vn + i, _MM_HINT_T1);
        }
        for (int i = 0; i < nv; i++) kf[i] = kv8(kp + 8 * i, f16);
        int j = (t - k0) & 7;
        for (int g = 0; g < G; g++) {
            const float *q = a->q + (size_t)g * d;
            __m256 s0 = _mm256_mul_ps(_mm256_loadu_ps(q), kf[0]), s1 = _mm256_setzero_ps();
            for (int i = 1; i + 1 < nv; i += 2) {
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), kf[i], s1);
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i + 8), kf[i + 1], s0);
            }
            if (!(nv & 1)) s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * (nv - 1)), kf[nv - 1], s1);
            part[g][j] = _mm256_add_ps(s0, s1);
        }
        if (j == 7 || t == k1 - 1) {
            int base = t - k0 - j;
            for (int g = 0; g < G; g++) {
                for (int z = j + 1; z < 8; z++) part[g][z] = _mm256_setzero_ps();
                float out[8];
                _mm256_storeu_ps(out, _mm256_mul_ps(hsum8x8(part[g]), _mm256_set1_ps(a->scale)));
                for (int z = 0; z <= j; z++) scratch[(size_t)g * n + base + z] = out[z];
            }
        }
    }
    for (int g = 0; g < G; g++) softmax_part(scratch + (size_t)g * n, n, m + g, l + g);
    /* weighted values: accumulators stay in registers for up to four heads over 32 dims at a time */
    for (int g0 = 0; g0 < G; g0 += 4) {
        int gn = G - g0 < 4 ? G - g0 : 4;
        for (int c = 0; c < nv; c += 4) {
            int cn = nv - c < 4 ? nv - c : 4;
            __m256 ac[4][4];
            for (int g = 0; g < 4; g++)
                for (int i = 0; i < 4; i++) ac[g][i] = _mm256_setzero_ps();
            for (int t = k0; t < k1; t++) {
                const uint16_t *vp = a->vbase + off[t - k0] + 8 * c;

                __m256 v0 = kv8(vp, f16), v1 = cn > 1 ? kv8(vp + 8, f16) : v0, v2 = cn > 2 ? kv8(vp + 16, f16) : v0,
                       v3 = cn > 3 ? kv8(vp + 24, f16) : v0;
                for (int g = 0; g < gn; g++) {
                    __m256 p = _mm256_set1_ps(scratch[(size_t)(g0 + g) * n + (t - k0)]);
                    ac[g][0] = _mm256_fmadd_ps(p, v0, ac[g][0]);
                    ac[g][1] = _mm256_fmadd_ps(p, v1, ac[g][1]);
                    ac[g][2] = _mm256_fmadd_ps(p, v2, ac[g][2]);
                    ac[g][3] = _mm256_fmadd_ps(p, v3, ac[g][3]);
                }
            }
            for (int g = 0; g < gn; g++)
                for (int i = 0; i < cn; i++) _mm256_storeu_ps(acc + (size_t)(g0 + g) * d + 8 * (c + i), ac[g][i]);
        }
    }
}

/* a head-64 key's K and V rows ahead of use: this head's 128 bytes, or with a->whole_rows every head's */
AVX2 static inline __attribute__((always_inline)) void prefetch_key(const rl_attn_args *a, int64_t off) {
    const char *kn = (const char *)(a->kbase + off), *vn = (const char *)(a->vbase + off);
    const int bytes = a->whole_rows ? 2 * (int)a->key_stride : 128;
    for (int i = 0; i < bytes; i += 64) _mm_prefetch(kn + i, _MM_HINT_T0), _mm_prefetch(vn + i, _MM_HINT_T1);
}

/* weighted values of GN (1..3) heads over 32 dims (4 vectors) starting at vector c, in registers: one
 * value vector is converted at a time and used by every head, so the live registers are the 12
 * accumulators, the GN weights and that vector (no spills at GN = 3) */
#define RL_KI AVX2 static inline __attribute__((always_inline))
RL_KI void pv_slice(const rl_attn_args *a, const int64_t *off, int n, const float *p, int ps, int g0, int GN,
                    int c, float *acc, const int f16) {
    const int d = a->d;
    __m256 ac[3][4];
    for (int g = 0; g < GN; g++)
        for (int i = 0; i < 4; i++) ac[g][i] = _mm256_setzero_ps();
    for (int t = 0; t < n; t++) {
        const uint16_t *vp = a->vbase + off[t] + 8 * c;
        __m256 pg[3];
        for (int g = 0; g < GN; g++) pg[g] = _mm256_broadcast_ss(p + (size_t)(g0 + g) * ps + t);
        for (int i = 0; i < 4; i++) {
            __m256 v = kv8(vp + 8 * i, f16);
            for (int g = 0; g < GN; g++) ac[g][i] = _mm256_fmadd_ps(pg[g], v, ac[g][i]);
        }
    }
    for (int g = 0; g < GN; g++)
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(acc + (size_t)(g0 + g) * d + 8 * (c + i), ac[g][i]);
}

/* the weighted values of G heads (scores p, ps apart) over keys off[0..n) into acc [G][64] */
RL_KI void pv_heads(const rl_attn_args *a, const int64_t *off, int n, const float *p, int ps, int G, float *acc,
                    const int f16) {
    for (int g0 = 0; g0 < G; g0 += 3) {
        int gn = G - g0 < 3 ? G - g0 : 3;
        for (int c = 0; c < 8; c += 4) {
            if (gn == 3) pv_slice(a, off, n, p, ps, g0, 3, c, acc, f16);
            else if (gn == 2) pv_slice(a, off, n, p, ps, g0, 2, c, acc, f16);
            else pv_slice(a, off, n, p, ps, g0, 1, c, acc, f16);
        }
    }
}

/* The attention of R rows of one sequence at consecutive positions over one K/V head, head_dim 64 (8 vectors;
 * SmolLM2, Llama 3.2 1B, Qwen2.5 0.5B); R = 1 is a single row's range. Row r attends over keys
 * k0[r]..k1[r]-1 (both non-decreasing in r) with its G heads at q[r] and writes m[r] [G], l[r] [G],
 * acc[r] [G][64]. Each key's row is read once and converted once into registers for all R * G heads, eight
 * keys' dot products share one horizontal reduction per head, and the weighted sum keeps up to three heads'
 * accumulators for 32 dims in registers per pass over the values. Every row's scores, softmax and weighted
 * sums take the same operations in the same order whatever R is (a key's dot product and its lane in
 * hsum8x8 do not depend on its neighbours), so a row's result is the same bits alone and in a group.
 * `f16` is a constant at every call site (a copy each, no test of the K/V type per load). */
RL_KI void attn_rows_d64(const rl_attn_args *a, int R, const float *const *q, const int *k0, const int *k1,
                         float *const *m, float *const *l, float *const *acc, float *scratch, const int f16) {
    const int G = a->G, H = R * G, K0 = k0[0], n = k1[R - 1] - K0;
    int64_t *off = rl_offsets_in(scratch, H, n, 64);
    rl_key_offsets(a, K0, K0 + n, off);
    const __m256 scale = _mm256_set1_ps(a->scale);
    for (int t = 0; t < n && t < 16; t++) {
        prefetch_key(a, off[t]);
    }
    __m256 part[RL_ATTN_ROWS_HEADS][8];
    for (int t0 = 0; t0 < n; t0 += 8) {
        int tn = n - t0 < 8 ? n - t0 : 8;
        for (int j = 0; j < tn; j++) {
            const int t = K0 + t0 + j;
            const uint16_t *kp = a->kbase + off[t0 + j];
            __m256 k[8];
            for (int i = 0; i < 8; i++) k[i] = kv8(kp + 8 * i, f16);
            for (int r = 0; r < R; r++) {
                if (t < k0[r] || t >= k1[r]) { /* not this row's key: its lane is never stored */
                    for (int g = 0; g < G; g++) part[r * G + g][j] = _mm256_setzero_ps();
                    continue;
                }
                for (int g = 0; g < G; g++) {
                    const float *qg = q[r] + (size_t)g * 64;
                    __m256 s0 = _mm256_mul_ps(_mm256_loadu_ps(qg), k[0]);
                    __m256 s1 = _mm256_mul_ps(_mm256_loadu_ps(qg + 8), k[1]);
                    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 16), k[2], s0);
                    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 24), k[3], s1);
                    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 32), k[4], s0);
                    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 40), k[5], s1);
                    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 48), k[6], s0);
                    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 56), k[7], s1);
                    part[r * G + g][j] = _mm256_add_ps(s0, s1);
                }
            }
        }
        for (int r = 0; r < R; r++) {
            int lo = k0[r] - K0 - t0, hi = k1[r] - K0 - t0;
            lo = lo < 0 ? 0 : lo, hi = hi > tn ? tn : hi;
            if (lo >= hi) continue;
            for (int g = 0; g < G; g++) {
                for (int j = tn; j < 8; j++) part[r * G + g][j] = _mm256_setzero_ps();
                float o[8];
                _mm256_storeu_ps(o, _mm256_mul_ps(hsum8x8(part[r * G + g]), scale));
                for (int j = lo; j < hi; j++) scratch[(size_t)(r * G + g) * n + t0 + j] = o[j];
            }
        }
        for (int j = 0; j < 8; j++) {
            int t = t0 + 16 + j;
            if (t >= n) break;
            prefetch_key(a, off[t]);
        }
    }
    for (int r = 0; r < R; r++) {
        const int s0 = k0[r] - K0, nr = k1[r] - k0[r];
        float *p = scratch + (size_t)r * G * n + s0;
        for (int g = 0; g < G; g++) softmax_part(p + (size_t)g * n, nr, m[r] + g, l[r] + g);
        pv_heads(a, off + s0, nr, p, n, G, acc[r], f16);
    }
}

/* 1 when done; 0 for a head size without a grouped kernel (the caller then runs each row alone) */
AVX2 int rl_attn_rows_avx2(const rl_attn_args *a, int R, const float *const *q, const int *k0, const int *k1,
                           float *const *out, float *scratch) {
    if (a->d != 64 || R * a->G > RL_ATTN_ROWS_HEADS) return 0;
    float *m[RL_ATTN_ROWS_HEADS], *l[RL_ATTN_ROWS_HEADS], *acc[RL_ATTN_ROWS_HEADS];
    for (int r = 0; r < R; r++) m[r] = out[r], l[r] = out[r] + a->G, acc[r] = out[r] + 2 * a->G;
    if (a->kv_f16) attn_rows_d64(a, R, q, k0, k1, m, l, acc, scratch, 1);
    else attn_rows_d64(a, R, q, k0, k1, m, l, acc, scratch, 0);
    return 1;
}

AVX2 static void attn_part_d64_f16(const rl_attn_args *a, int k0, int k1, float *scratch, float *m, float *l,
                                   float *acc) {
    attn_rows_d64(a, 1, &a->q, &k0, &k1, &m, &l, &acc, scratch, 1);
}

AVX2 static void attn_part_d64_bf16(const rl_attn_args *a, int k0, int k1, float *scratch, float *m, float *l,
                                    float *acc) {
    attn_rows_d64(a, 1, &a->q, &k0, &k1, &m, &l, &acc, scratch, 0);
}
#undef RL_KI

AVX2 void rl_attn_part_avx2(const rl_attn_args *a, int k0, int k1, float *scratch, float *m, float *l, float *acc) {
    if (a->d == 64 && a->kv_f16) attn_part_d64_f16(a, k0, k1, scratch, m, l, acc);
    else if (a->d == 64) attn_part_d64_bf16(a, k0, k1, scratch, m, l, acc);
    else attn_part_generic(a, k0, k1, scratch, m, l, acc);
}
#endif
