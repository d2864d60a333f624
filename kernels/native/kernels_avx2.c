/* AVX2 + FMA + F16C kernels. Compiled with function target attributes (not -mavx2 for the file), so the
 * library loads on any x86-64 CPU; decode_step.c calls them only after checking the CPU has AVX2. */
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <math.h>

#include "ripe_native.h"

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the four sums of four vectors, as one __m128 */
AVX2 static inline __m128 hsum8x4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

AVX2 void rl_quantize_avx2(const float *x, int k, int8_t *q, float *d, float *s) {
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
        float sum = hsum8(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));  /* exact: small ints */
        __m256i i0 = _mm256_cvtps_epi32(v0), i1 = _mm256_cvtps_epi32(v1), i2 = _mm256_cvtps_epi32(v2),
                i3 = _mm256_cvtps_epi32(v3);
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + b * RL_QK), _mm256_permutevar8x32_epi32(p, perm));
        d[b] = amax / 127.0f;
        s[b] = d[b] * sum;
    }
}

AVX2 static inline __m256 lane_bcast(__m128 v, int j) {
    switch (j) {
    case 0: return _mm256_broadcastss_ps(v);
    case 1: return _mm256_broadcastss_ps(_mm_shuffle_ps(v, v, 0x55));
    case 2: return _mm256_broadcastss_ps(_mm_shuffle_ps(v, v, 0xaa));
    default: return _mm256_broadcastss_ps(_mm_shuffle_ps(v, v, 0xff));
    }
}

AVX2 void rl_matvec_q4_avx2(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo,
                            int g0, int g1) {
    const int nb = w->k / RL_QK;
    const __m256i lowmask = _mm256_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * 80;
        if (g + 1 < g1) _mm_prefetch((const char *)(base + (size_t)nb * 80), _MM_HINT_T0);
        for (int r = 0; r < rows; r++) {
            const int8_t *xq = x->q + (size_t)r * ldx * RL_QK;
            const float *xd = x->d + (size_t)r * ldx, *xs = x->s + (size_t)r * ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            __m128 macc = _mm_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *gb = base + (size_t)b * 80;
                _mm_prefetch((const char *)(gb + 640), _MM_HINT_T0);
                __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)gb));
                __m128 m4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(gb + 8)));
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * RL_QK));
                __m128 dd = _mm_mul_ps(d4, _mm_set1_ps(xd[b]));
                macc = _mm_fmadd_ps(m4, _mm_set1_ps(xs[b]), macc);
#define RL_Q4_ROW(j, acc)                                                                               \
    do {                                                                                                \
        __m128i c = _mm_loadu_si128((const __m128i *)(gb + 16 + 16 * (j)));                              \
        __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(c, 4), c), lowmask);               \
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);                              \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), lane_bcast(dd, j), acc);                           \
    } while (0)
                RL_Q4_ROW(0, a0);
                RL_Q4_ROW(1, a1);
                RL_Q4_ROW(2, a2);
                RL_Q4_ROW(3, a3);
#undef RL_Q4_ROW
            }
            __m128 res = _mm_add_ps(hsum8x4(a0, a1, a2, a3), macc);
            float vals[4];
            _mm_storeu_ps(vals, res);
            for (int j = 0; j < RL_ROWS; j++) {
                int n = g * RL_ROWS + j;
                out[(size_t)r * ldo + n] = vals[j] + (w->bias && n < w->n ? w->bias[n] : 0.0f);
            }
        }
    }
}

AVX2 void rl_matvec_q8_avx2(const rl_matrix *w, const rl_qact *x, int rows, int ldx, float *out, int ldo,
                            int g0, int g1) {
    const int nb = w->k / RL_QK;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int g = g0; g < g1; g++) {
        const uint8_t *base = w->data + (size_t)g * nb * 136;
        for (int r = 0; r < rows; r++) {
            const int8_t *xq = x->q + (size_t)r * ldx * RL_QK;
            const float *xd = x->d + (size_t)r * ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int b = 0; b < nb; b++) {
                const uint8_t *gb = base + (size_t)b * 136;
                _mm_prefetch((const char *)(gb + 1088), _MM_HINT_T0);
                __m128 dd = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)gb)), _mm_set1_ps(xd[b]));
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * RL_QK));
#define RL_Q8_ROW(j, acc)                                                                               \
    do {                                                                                                \
        __m256i wv = _mm256_loadu_si256((const __m256i *)(gb + 8 + 32 * (j)));                           \
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)), \
                                      ones);                                                            \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), lane_bcast(dd, j), acc);                           \
    } while (0)
                RL_Q8_ROW(0, a0);
                RL_Q8_ROW(1, a1);
                RL_Q8_ROW(2, a2);
                RL_Q8_ROW(3, a3);
#undef RL_Q8_ROW
            }
            float vals[4];
            _mm_storeu_ps(vals, hsum8x4(a0, a1, a2, a3));
            for (int j = 0; j < RL_ROWS; j++) {
                int n = g * RL_ROWS + j;
                out[(size_t)r * ldo + n] = vals[j] + (w->bias && n < w->n ? w->bias[n] : 0.0f);
            }
        }
    }
}

AVX2 void rl_kv_to_float_avx2(const uint16_t *src, float *dst, int d, int kv_f16) {
    int i = 0;
    for (; i + 8 <= d; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        __m256 f = kv_f16 ? _mm256_cvtph_ps(h)
                          : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        _mm256_storeu_ps(dst + i, f);
    }
    for (; i < d; i++) dst[i] = kv_f16 ? rl_half_to_float(src[i]) : rl_bf16_to_float(src[i]);
}

AVX2 float rl_dot_avx2(const float *a, const float *b, int d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int i = 0;
    for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    float acc = hsum8(_mm256_add_ps(a0, a1));
    for (; i < d; i++) acc += a[i] * b[i];
    return acc;
}

AVX2 void rl_axpy_avx2(float *acc, float p, const float *v, int d) {
    __m256 vp = _mm256_set1_ps(p);
    int i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(vp, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
    for (; i < d; i++) acc[i] += p * v[i];
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
#endif
