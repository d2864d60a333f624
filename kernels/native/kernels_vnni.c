/* The Q4, Q4_0 and Q8_0 matvecs with the VNNI dot product (vpdpbusd: 32 u8 x s8 products summed into
 * eight int32 lanes in one instruction, where AVX2 needs maddubs, a 16-bit add and madd), at 256 bits in
 * two encodings: AVX512-VNNI with AVX512VL (Ice Lake and later Xeons, Zen 4 and later) and AVX-VNNI (Alder
 * Lake and later cores). The loops are AVX2's (x86_int8_dots.inc), so results are bit-identical to the AVX2
 * path; the other kernels on these CPUs are AVX2's. Compiled with target attributes like kernels_avx2.c;
 * decode_step.c calls these only after checking the CPU (and its OS) supports them. */
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "ripe_native.h"
#include "x86_helpers.h"

/* one dot product per broadcast group of 4 activations, in the AVX2 kernel's order */
#define RL_VNNI_Q4_DOT(dp)                                                                                   \
    __m256i s = dp(_mm256_setzero_si256(), l0, _mm256_set1_epi32(load_i32(xb)));                            \
    s = dp(s, h0, _mm256_set1_epi32(load_i32(xb + 16)));                                                     \
    s = dp(s, l1, _mm256_set1_epi32(load_i32(xb + 4)));                                                      \
    s = dp(s, h1, _mm256_set1_epi32(load_i32(xb + 20)));                                                     \
    s = dp(s, l2, _mm256_set1_epi32(load_i32(xb + 8)));                                                      \
    s = dp(s, h2, _mm256_set1_epi32(load_i32(xb + 24)));                                                     \
    s = dp(s, l3, _mm256_set1_epi32(load_i32(xb + 12)));                                                     \
    return dp(s, h3, _mm256_set1_epi32(load_i32(xb + 28)));

/* ---- AVX512-VNNI, 256-bit (EVEX) ---- */
#define VNNI512 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))

VNNI512 static inline __attribute__((always_inline)) __m256i q4_dot_avx512vnni(__m256i l0, __m256i h0, __m256i l1,
                                                                              __m256i h1, __m256i l2, __m256i h2,
                                                                              __m256i l3, __m256i h3,
                                                                              const int8_t *xb) {
    RL_VNNI_Q4_DOT(_mm256_dpbusd_epi32)
}

VNNI512 static inline __attribute__((always_inline)) __m256i q8_acc_avx512vnni(__m256i s, __m256i aw, __m256i xv) {
    return _mm256_dpbusd_epi32(s, aw, xv);
}

#define ISA VNNI512
#define KI VNNI512 static inline __attribute__((always_inline))
#define F(name) name##_avx512vnni
#include "x86_int8_dots.inc"
#undef F
#undef KI
#undef ISA

/* ---- AVX-VNNI (VEX) ---- */
#define AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))

AVXVNNI static inline __attribute__((always_inline)) __m256i q4_dot_avxvnni(__m256i l0, __m256i h0, __m256i l1,
                                                                           __m256i h1, __m256i l2, __m256i h2,
                                                                           __m256i l3, __m256i h3, const int8_t *xb) {
    RL_VNNI_Q4_DOT(_mm256_dpbusd_avx_epi32)
}

AVXVNNI static inline __attribute__((always_inline)) __m256i q8_acc_avxvnni(__m256i s, __m256i aw, __m256i xv) {
    return _mm256_dpbusd_avx_epi32(s, aw, xv);
}

#define ISA AVXVNNI
#define KI AVXVNNI static inline __attribute__((always_inline))
#define F(name) name##_avxvnni
#include "x86_int8_dots.inc"
#undef F
#undef KI
#undef ISA

#endif
