/* Shortlist scans for document retrieval (runtime/retrieval/shortlist_codes.py).

Scores every row of a quantized prefix matrix against one query and picks the best k rows, in one pass
over the codes plus two over an int32 score buffer. numpy can do each step, but each step is a separate
pass over memory with a temporary (XOR, popcount, per-row sum, argpartition over a million floats), which
at a million rows costs several times the scan itself; here the scan runs at memory speed and the
selection is a histogram instead of a partial sort.

The rerank scores the shortlisted float16 rows against the float32 query (F16C where the CPU has it).

Codes: binary sign codes (one bit per rotated prefix coordinate, scored as matching bits) and int8 codes
(symmetric per-coordinate scale, scored as an int8 dot product). The x86 builds carry AVX2/POPCNT paths
chosen at run time by the CPU; other CPUs use the plain loops.
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RL_X86 1
#endif

/* ---- binary codes: score = bits that match = 64 * words - popcount(code ^ q) ---- */
static void hamming_plain(const uint64_t *codes, int64_t n, int words, const uint64_t *q, int32_t *out) {
    const int32_t bits = 64 * words;
    for (int64_t i = 0; i < n; i++) {
        const uint64_t *c = codes + i * words;
        int32_t d = 0;
        for (int w = 0; w < words; w++) d += __builtin_popcountll(c[w] ^ q[w]);
        out[i] = bits - d;
    }
}

#ifdef RL_X86
__attribute__((target("popcnt"))) static void hamming_popcnt(
    const uint64_t *codes, int64_t n, int words, const uint64_t *q, int32_t *out) {
    const int32_t bits = 64 * words;
    if (words == 4) { /* the usual 256-bit code, unrolled */
        const uint64_t q0 = q[0], q1 = q[1], q2 = q[2], q3 = q[3];
        for (int64_t i = 0; i < n; i++) {
            const uint64_t *c = codes + i * 4;
            out[i] = bits - (int32_t)(__builtin_popcountll(c[0] ^ q0) + __builtin_popcountll(c[1] ^ q1) +
                                      __builtin_popcountll(c[2] ^ q2) + __builtin_popcountll(c[3] ^ q3));
        }
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        const uint64_t *c = codes + i * words;
        int32_t d = 0;
        for (int w = 0; w < words; w++) d += (int32_t)__builtin_popcountll(c[w] ^ q[w]);
        out[i] = bits - d;
    }
}
#endif

/* ---- int8 codes: score = sum_j code[j] * q[j] (codes and query in [-127, 127]) ---- */
static void i8_plain(const int8_t *codes, int64_t n, int d, const int8_t *q, int32_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const int8_t *c = codes + i * d;
        int32_t s = 0;
        for (int j = 0; j < d; j++) s += (int32_t)c[j] * (int32_t)q[j];
        out[i] = s;
    }
}

#ifdef RL_X86
/* d a multiple of 32. maddubs multiplies unsigned by signed bytes: |q| times the code with q's sign moved
   onto it. Pairs stay below 2 * 127 * 127 = 32258, so the int16 sums never saturate. */
__attribute__((target("avx2"))) static void i8_avx2(const int8_t *codes, int64_t n, int d, const int8_t *q,
                                                    int32_t *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i qa[16], qs[16]; /* d <= 512 */
    const int blocks = d / 32;
    for (int b = 0; b < blocks; b++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
        qa[b] = _mm256_abs_epi8(v);
        qs[b] = v;
    }
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256i acc[4];
        for (int r = 0; r < 4; r++) {
            const int8_t *c = codes + (i + r) * d;
            __m256i a = _mm256_setzero_si256();
            for (int b = 0; b < blocks; b++) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(c + 32 * b));
                a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(qa[b], _mm256_sign_epi8(x, qs[b])),
                                                          ones));
            }
            acc[r] = a;
        }
        /* four 8-lane sums at once: hadd twice, then fold the 128-bit halves */
        __m256i h01 = _mm256_hadd_epi32(acc[0], acc[1]);
        __m256i h23 = _mm256_hadd_epi32(acc[2], acc[3]);
        __m256i h = _mm256_hadd_epi32(h01, h23);
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        _mm_storeu_si128((__m128i *)(out + i), s);
    }
    if (i < n) i8_plain(codes + i * d, n - i, d, q, out + i);
}
#endif

/* ---- rerank: float32 dot products of chosen float16 rows with a float32 query ---- */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void f16_plain(const uint16_t *full, int dim, const int64_t *rows, int64_t m, const float *q, float *out) {
    for (int64_t r = 0; r < m; r++) {
        const uint16_t *v = full + rows[r] * (int64_t)dim;
        float s = 0.0f;
        for (int j = 0; j < dim; j++) s += half_to_float(v[j]) * q[j];
        out[r] = s;
    }
}

#ifdef RL_X86
__attribute__((target("avx2,fma,f16c"))) static void f16_avx2(const uint16_t *full, int dim, const int64_t *rows,
                                                              int64_t m, const float *q, float *out) {
    for (int64_t r = 0; r < m; r++) {
        const uint16_t *v = full + rows[r] * (int64_t)dim;
        if (r + 1 < m) __builtin_prefetch(full + rows[r + 1] * (int64_t)dim);
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int j = 0;
        for (; j + 16 <= dim; j += 16) {
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + j))), _mm256_loadu_ps(q + j), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + j + 8))),
                                 _mm256_loadu_ps(q + j + 8), a1);
        }
        __m256 a = _mm256_add_ps(a0, a1);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        float s = _mm_cvtss_f32(h);
        for (; j < dim; j++) s += half_to_float(v[j]) * q[j];
        out[r] = s;
    }
}
#endif

/* ---- selection: indexes of the k largest scores, unordered ---- */
#define RL_BINS 65536

int64_t rl_top_i32(const int32_t *s, int64_t n, int64_t k, int64_t *out) {
    if (k <= 0 || n <= 0) return 0;
    if (k >= n) {
        for (int64_t i = 0; i < n; i++) out[i] = i;
        return n;
    }
    int32_t lo = s[0], hi = s[0];
    for (int64_t i = 1; i < n; i++) {
        lo = s[i] < lo ? s[i] : lo;
        hi = s[i] > hi ? s[i] : hi;
    }
    int shift = 0;
    while ((((int64_t)hi - lo) >> shift) >= RL_BINS) shift++;
    uint32_t *hist = calloc(RL_BINS, sizeof(uint32_t));
    if (!hist) return -1;
    for (int64_t i = 0; i < n; i++) hist[(uint32_t)(((int64_t)s[i] - lo) >> shift)]++;
    /* the bin where the running count from the top reaches k */
    int64_t above = 0;
    int thr = RL_BINS - 1;
    for (; thr > 0; thr--) {
        if (above + hist[thr] >= k) break;
        above += hist[thr];
    }
    free(hist);
    int64_t m = 0, room = k - above; /* rows taken from the threshold bin itself */
    for (int64_t i = 0; i < n && m < k; i++) {
        int b = (int)(((int64_t)s[i] - lo) >> shift);
        if (b > thr) {
            out[m++] = i;
        } else if (b == thr && room > 0) {
            out[m++] = i;
            room--;
        }
    }
    return m;
}

static int have_avx2 = -1, have_popcnt = -1, have_f16c = 0;

static void detect(void) {
    if (have_avx2 >= 0) return;
#ifdef RL_X86
    __builtin_cpu_init();
    const char *isa = getenv("RIPELM_NATIVE_ISA"); /* "ref": the plain loops, for tests */
    const int ref = isa != NULL && strcmp(isa, "ref") == 0;
    have_avx2 = !ref && __builtin_cpu_supports("avx2");
    have_popcnt = !ref && __builtin_cpu_supports("popcnt");
    have_f16c = have_avx2 && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    have_avx2 = have_popcnt = 0;
#endif
}

void rl_hamming_scores(const uint64_t *codes, int64_t n, int words, const uint64_t *q, int32_t *out) {
    detect();
#ifdef RL_X86
    if (have_popcnt) {
        hamming_popcnt(codes, n, words, q, out);
        return;
    }
#endif
    hamming_plain(codes, n, words, q, out);
}

void rl_i8_scores(const int8_t *codes, int64_t n, int d, const int8_t *q, int32_t *out) {
    detect();
#ifdef RL_X86
    if (have_avx2 && d % 32 == 0 && d <= 512) {
        i8_avx2(codes, n, d, q, out);
        return;
    }
#endif
    i8_plain(codes, n, d, q, out);
}

void rl_f16_dots(const uint16_t *full, int dim, const int64_t *rows, int64_t m, const float *q, float *out) {
    detect();
#ifdef RL_X86
    if (have_f16c) {
        f16_avx2(full, dim, rows, m, q, out);
        return;
    }
#endif
    f16_plain(full, dim, rows, m, q, out);
}

/* scan + select in one call: the scores land in `scratch` (n int32), the k best rows in `out` */
int64_t rl_shortlist(int kind, const void *codes, int64_t n, int width, const void *q, int64_t k,
                     int32_t *scratch, int64_t *out) {
    if (kind == 0)
        rl_hamming_scores((const uint64_t *)codes, n, width, (const uint64_t *)q, scratch);
    else
        rl_i8_scores((const int8_t *)codes, n, width, (const int8_t *)q, scratch);
    return rl_top_i32(scratch, n, k, out);
}
