/* ripelm's native CPU decode step: shared declarations of the C library (see decode_step.c). */
#ifndef RIPE_NATIVE_H
#define RIPE_NATIVE_H

#include <stddef.h>
#include <stdint.h>

/* Weight formats of the repacked layout (see repack.c). */
enum { RL_Q4 = 1, RL_Q8 = 2, RL_Q5 = 3, RL_Q6 = 4, RL_Q4_0 = 5, RL_T2 = 6 };
#define RL_N_FMT 7 /* size of the kernels' tables, indexed by format id */
/* GGUF source types that repack into them (ggml type ids). */
enum {
    GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8,
    GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14, GGML_TQ1_0 = 34, GGML_TQ2_0 = 35
};
/* Instruction-set paths, best last. */
/* x86-64: REF, AVX2, AVXVNNI (AVX2 + AVX-VNNI), AVX512VNNI (AVX2 + AVX512-VNNI with AVX512VL, used at 256
 * bits); ARM64: REF, NEON (no dot products), DOTPROD (NEON + the dot-product extension). */
enum { RL_ISA_REF = 0, RL_ISA_AVX2 = 1, RL_ISA_NEON = 2, RL_ISA_DOTPROD = 3, RL_ISA_AVXVNNI = 4, RL_ISA_AVX512VNNI = 5 };
#define RL_N_ISA 6

#define RL_QK 32   /* weights and activations are quantized in blocks of 32 */
#define RL_ROWS 8  /* output rows interleaved per group in the repacked layout (repack.c) */
#define RL_Q4_GROUP_BLOCK 160
#define RL_Q5_GROUP_BLOCK 192
#define RL_Q6_GROUP_BLOCK 224
#define RL_Q8_GROUP_BLOCK 272
#define RL_Q4_0_GROUP_BLOCK 144
#define RL_T2_QK 256 /* RL_T2 group-blocks cover 256 inputs (the GGUF ternary block) */
#define RL_T2_GROUP_BLOCK 528

typedef struct {
    int fmt;             /* RL_Q4, RL_Q5, RL_Q6, RL_Q8, RL_Q4_0 or RL_T2 */
    int n, k;            /* output rows (a multiple of RL_ROWS) and inputs (a multiple of RL_QK; of RL_T2_QK for RL_T2) */
    const uint8_t *data; /* n / RL_ROWS groups of k / RL_QK blocks */
    const float *bias;   /* [n] or NULL */
} rl_matrix;

/* Activations quantized to int8 in blocks of 32: x ~= d[b] * q[32 b + i]; s[b] = d[b] * sum_i q;
 * h[2 b], h[2 b + 1]: the integer sums of q over the block's two halves of 16 (RL_Q6's code offset). */
typedef struct {
    int8_t *q;
    float *d, *s;
    int32_t *h;
} rl_qact;

typedef void (*rl_matvec_fn)(const rl_matrix *w, const rl_qact *x, int rows, int ldx_blocks, float *out,
                             int ldo, int g0, int g1);

int rl_format_of(int gguf_type);
size_t rl_group_block_bytes(int fmt);
size_t rl_repacked_size(int gguf_type, int n, int k);
void rl_dequant_rows(int fmt, const uint8_t *data, int k, int row0, int nrows, float *out);
int rl_repack(int gguf_type, const uint8_t *src, int n, int k, uint8_t *dst);

/* kernels per instruction set */
typedef void (*rl_quantize_fn)(const float *x, int k, int8_t *q, float *d, float *s, int32_t *h);
void rl_quantize_ref(const float *x, int k, int8_t *q, float *d, float *s, int32_t *h);
void rl_matvec_q4_ref(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q5_ref(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q6_ref(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q8_ref(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q4_0_ref(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_t2_ref(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_quantize_avx2(const float *x, int k, int8_t *q, float *d, float *s, int32_t *h);
void rl_matvec_q4_avx2(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q5_avx2(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q6_avx2(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q8_avx2(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q4_0_avx2(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_t2_avx2(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
/* kernels_vnni.c: the Q4, Q4_0 and Q8_0 matvecs with vpdpbusd; the other kernels are AVX2's */
void rl_matvec_q4_avxvnni(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q4_0_avxvnni(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q8_avxvnni(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q4_avx512vnni(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q4_0_avx512vnni(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q8_avx512vnni(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
/* pieces of the reference attention: KV rows (kv_f16: IEEE half, else bfloat16) to float32, dot, axpy */
void rl_kv_to_float_ref(const uint16_t *src, float *dst, int d, int kv_f16);
float rl_dot_ref(const float *a, const float *b, int d);
void rl_axpy_ref(float *acc, float p, const float *v, int d);
/* Attention of G query heads (q [G][d]) over keys k0..k1-1 of one K/V head (kbase/vbase point at that
 * head in block 0 of the layer's pool; key t lives in block table[t / bs], slot t % bs, rows key_stride
 * apart). Writes the unnormalized partial result: m[g] = max score, l[g] = sum exp(score - m[g]),
 * acc[g][d] = sum exp(score - m[g]) v. scratch holds G * (k1 - k0) + d + 2 (k1 - k0) + 1 floats. */
typedef struct {
    const float *q;
    int G, d, bs, kv_f16;
    const uint16_t *kbase, *vbase;
    int64_t key_stride;
    const int32_t *table;
    float scale;
    /* 1 for the first K/V head's task of a key range: it prefetches each key's whole row (every head's
     * part, key_stride elements) for the other heads' tasks that follow it on the same thread
     * (attend()); 0: its own part only */
    int whole_rows;
} rl_attn_args;
/* element offsets of keys k0..k1-1 from kbase/vbase (one division per range, not per key) */
static inline void rl_key_offsets(const rl_attn_args *a, int k0, int k1, int64_t *off) {
    int blk = k0 / a->bs, slot = k0 % a->bs;
    for (int t = k0; t < k1; t++) {
        off[t - k0] = ((int64_t)a->table[blk] * a->bs + slot) * a->key_stride;
        if (++slot == a->bs) slot = 0, blk++;
    }
}
/* scratch of an attention range: G * n scores, one float row of d, then n key offsets */
static inline int64_t *rl_offsets_in(float *scratch, int G, int n, int d) {
    size_t at = (size_t)G * n + (size_t)d;
    return (int64_t *)(scratch + at + (at & 1));
}
void rl_attn_part_ref(const rl_attn_args *a, int k0, int k1, float *scratch, float *m, float *l, float *acc);
void rl_attn_part_avx2(const rl_attn_args *a, int k0, int k1, float *scratch, float *m, float *l, float *acc);
/* R rows of one sequence (same block table, consecutive positions) over one K/V head at once: row r's G
 * query heads at q[r], keys k0[r]..k1[r]-1 (non-decreasing in r, at most one ATTN_CHUNK span in all),
 * partial at out[r] (m [G], l [G], acc [G][d], as rl_attn_part writes them); a->q unused, a->table the
 * last row's. scratch holds R * G * n + d + 2 n + 1 floats (n = k1[R-1] - k0[0]). Returns 0 where the
 * kernel does not take the shape (AVX2: head sizes other than 64; R * G over RL_ATTN_ROWS_HEADS): then
 * each row runs alone. */
#define RL_ATTN_ROWS_HEADS 64
int rl_attn_rows_avx2(const rl_attn_args *a, int R, const float *const *q, const int *k0, const int *k1,
                      float *const *out, float *scratch);
void rl_exp_ref(float *x, int n);
void rl_exp_avx2(float *x, int n);
/* ARM64 (kernels_neon.c) */
int rl_neon_has_dotprod(void);
void rl_quantize_neon(const float *x, int k, int8_t *q, float *d, float *s, int32_t *h);
void rl_matvec_q4_dotprod(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q4_0_dotprod(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q8_dotprod(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q5_dotprod(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_q6_dotprod(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_matvec_t2_dotprod(const rl_matrix *, const rl_qact *, int, int, float *, int, int, int);
void rl_exp_neon(float *x, int n);
void rl_attn_part_neon(const rl_attn_args *a, int k0, int k1, float *scratch, float *m, float *l, float *acc);
int rl_attn_rows_neon(const rl_attn_args *a, int R, const float *const *q, const int *k0, const int *k1,
                      float *const *out, float *scratch);

/* code i (0..31) of row r in an RL_Q4, RL_Q4_0, RL_Q5 or RL_Q6 group-block gb (see repack.c) */
static inline int rl_code(int fmt, const uint8_t *gb, int r, int i) {
    int v = (i & 15) / 4, t = i & 3, hi = i >= 16;
    uint8_t byte = gb[(fmt == RL_Q4_0 ? 16 : 32) + 32 * v + 4 * r + t];
    int c = hi ? byte >> 4 : byte & 15, bit = v + 4 * hi;
    if (fmt == RL_Q5 || fmt == RL_Q6) c |= ((gb[160 + 4 * r + t] >> bit) & 1) << 4;
    if (fmt == RL_Q6) c |= ((gb[192 + 4 * r + t] >> bit) & 1) << 5;
    return c;
}

static inline float rl_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t rl_float_to_half(float f) {
    /* round to nearest even, as numpy and torch do */
    uint32_t x;
    __builtin_memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffff;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exp << 10) | (mant >> 13), rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
    return (uint16_t)half;
}

static inline float rl_bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t rl_float_to_bf16(float f) {
    /* round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays NaN */
    uint32_t x;
    __builtin_memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

#endif
