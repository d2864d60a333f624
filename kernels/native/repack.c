/* Repacking GGUF blocks into the layout the decode kernels stream.
 *
 * Eight output rows are interleaved per group so that a kernel keeps one 32-bit lane per row: it
 * multiplies four weights of each of the eight rows by the same four activations (broadcast) in one
 * instruction and never sums across lanes until the row is done. Rows past n (padding up to a multiple
 * of eight) are zero. One group-block covers 32 inputs of 8 rows:
 *   RL_Q4 (160 bytes): fp16 d[8], fp16 m[8], then 4 vectors of 32 bytes; byte 4 r + t of vector v holds
 *                      row r's code 4 v + t in its low nibble and code 16 + 4 v + t in its high nibble
 *                      (the same pairing of codes as a GGUF Q4 block); w = d * code + m
 *   RL_Q5 (192 bytes): RL_Q4's 160 bytes (the low four bits of 5-bit codes), then a 32-byte plane of the
 *                      fifth bits: bit v of its byte 4 r + t is bit 4 of row r's code 4 v + t, bit 4 + v
 *                      that of code 16 + 4 v + t (so each vector's bits move into place with one shift
 *                      and one mask); w = d * code + m
 *   RL_Q6 (224 bytes): fp16 dlo[8], fp16 dhi[8], the 4 nibble vectors, then the planes of bit 4 and of
 *                      bit 5 of the 6-bit codes (laid out as RL_Q5's); w = dlo * (code - 32) for codes
 *                      0..15 of the block, dhi * (code - 32) for codes 16..31 (Q6_K's scale per 16)
 *   RL_Q4_0 (144 bytes): fp16 d[8], then RL_Q4's 4 code vectors; w = d * (code - 8) (no m stored: as many
 *                      bytes per weight as the file's Q4_0)
 *   RL_Q8 (272 bytes): fp16 d[8], then 8 vectors of 32 bytes; byte 4 r + t of vector v is row r's 4 v + t
 * TQ2_0 and TQ1_0 (ternary, w = d * t, t in {-1, 0, 1}, one d per 256) both become RL_T2, whose group-blocks
 * cover 256 inputs of 8 rows (TQ1_0's base-3 digits are decoded here; both hold 2 bits per weight after):
 *   RL_T2 (528 bytes, 2.06 bits per weight): fp16 d[8] (one per row and 256 inputs), then per 32 inputs
 *                      s = 0..7 two vectors h = 0, 1 of 32 bytes; bits 2 j, 2 j + 1 of byte 4 r + t of
 *                      vector h hold row r's code c = t + 1 (0..2) of input 32 s + 16 h + 4 j + t, so that
 *                      (vector >> 2 j) & 3 is a vector of codes that pairs with the activation quadruple
 *                      32 s + 16 h + 4 j (as RL_Q4's nibbles do). w = d c - d: a 32-input block adds
 *                      d d_x sum(c q) - d s_x. (A stray TQ2_0 code 3 stays 3, w = 2 d, as in ggml.)
 * Sources: Q4_0 -> RL_Q4_0; Q4_1 -> RL_Q4; Q4_K -> RL_Q4 with d = fp16(d * sc), m = fp16(-dmin * min)
 * per 32 weights; Q5_0 (m = -16 d), Q5_1 and Q5_K (as Q4_K) -> RL_Q5; Q6_K -> RL_Q6 with dlo, dhi =
 * fp16(d * sc) of its two 16-weight halves; Q8_0 -> RL_Q8. The folded K-quant scales are rounded to fp16
 * once (a relative 2^-11 at most); codes are never changed.
 */
#include <string.h>

#include "ripe_native.h"

static int padded_rows(int n) { return (n + RL_ROWS - 1) / RL_ROWS * RL_ROWS; }

int rl_format_of(int gguf_type) {
    switch (gguf_type) {
    case GGML_Q4_0:
        return RL_Q4_0;
    case GGML_Q4_1:
    case GGML_Q4_K:
        return RL_Q4;
    case GGML_Q5_0:
    case GGML_Q5_1:
    case GGML_Q5_K:
        return RL_Q5;
    case GGML_Q6_K:
        return RL_Q6;
    case GGML_Q8_0:
        return RL_Q8;
    case GGML_TQ1_0:
    case GGML_TQ2_0:
        return RL_T2;
    default:
        return 0;
    }
}

size_t rl_group_block_bytes(int fmt) {
    switch (fmt) {
    case RL_Q4:
        return RL_Q4_GROUP_BLOCK;
    case RL_Q5:
        return RL_Q5_GROUP_BLOCK;
    case RL_Q6:
        return RL_Q6_GROUP_BLOCK;
    case RL_Q8:
        return RL_Q8_GROUP_BLOCK;
    case RL_Q4_0:
        return RL_Q4_0_GROUP_BLOCK;
    case RL_T2: /* per 256 inputs, not 32 */
        return RL_T2_GROUP_BLOCK;
    default:
        return 0;
    }
}

/* GGUF types whose blocks cover 256 inputs (the row length must be a multiple) */
static int is_256_block(int gguf_type) {
    return gguf_type == GGML_Q4_K || gguf_type == GGML_Q5_K || gguf_type == GGML_Q6_K || gguf_type == GGML_TQ1_0 ||
           gguf_type == GGML_TQ2_0;
}

size_t rl_repacked_size(int gguf_type, int n, int k) {
    int fmt = rl_format_of(gguf_type);
    if (!fmt || n <= 0 || k <= 0 || k % RL_QK || (is_256_block(gguf_type) && k % 256)) return 0;
    size_t groups = (size_t)padded_rows(n) / RL_ROWS, blocks = (size_t)k / (fmt == RL_T2 ? RL_T2_QK : RL_QK);
    return groups * blocks * rl_group_block_bytes(fmt);
}

static uint16_t half_of(float f) { return rl_float_to_half(f); }

static float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return rl_half_to_float(h);
}

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j (0..7) from the 12-byte field (llama.cpp's
 * get_scale_min_k4) */
static void k_scale_min(const uint8_t *q, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = q[j] & 63, *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* 32-weight block b of a GGUF row: its codes (0..63) and the two fp16 values the layout stores for it
 * (d and m; RL_Q6: dlo and dhi) */
static void source_block(int t, const uint8_t *row, int b, uint8_t codes[32], uint16_t *d, uint16_t *m) {
    switch (t) {
    case GGML_Q4_0:
    case GGML_Q4_1: {
        const uint8_t *blk = row + (size_t)b * (t == GGML_Q4_0 ? 18 : 20);
        memcpy(d, blk, 2);
        if (t == GGML_Q4_1) memcpy(m, blk + 2, 2);
        else *m = half_of(-8.0f * rl_half_to_float(*d)); /* exact: a power-of-two scale */
        const uint8_t *qs = blk + (t == GGML_Q4_0 ? 2 : 4);
        for (int i = 0; i < 16; i++) codes[i] = qs[i] & 15, codes[16 + i] = qs[i] >> 4;
        break;
    }
    case GGML_Q5_0:
    case GGML_Q5_1: {
        const uint8_t *blk = row + (size_t)b * (t == GGML_Q5_0 ? 22 : 24);
        memcpy(d, blk, 2);
        if (t == GGML_Q5_1) memcpy(m, blk + 2, 2);
        else *m = half_of(-16.0f * rl_half_to_float(*d)); /* exact: a power-of-two scale */
        const uint8_t *qh = blk + (t == GGML_Q5_0 ? 2 : 4), *qs = qh + 4;
        uint32_t h = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
        for (int i = 0; i < 16; i++) {
            codes[i] = (uint8_t)((qs[i] & 15) | ((h >> i) & 1) << 4);
            codes[16 + i] = (uint8_t)((qs[i] >> 4) | ((h >> (16 + i)) & 1) << 4);
        }
        break;
    }
    case GGML_Q4_K:
    case GGML_Q5_K: { /* 256 weights: fp16 d, dmin, 12 bytes of scales/mins, (Q5_K: qh[32]), qs[128] */
        int j = b % 8, five = t == GGML_Q5_K;
        const uint8_t *blk = row + (size_t)(b / 8) * (five ? 176 : 144);
        int sc, mn;
        k_scale_min(blk + 4, j, &sc, &mn);
        *d = half_of(half_at(blk) * (float)sc);
        *m = half_of(-half_at(blk + 2) * (float)mn);
        /* each 32 bytes of qs hold sub-block 2 c in the low nibbles and 2 c + 1 in the high ones */
        const uint8_t *qs = blk + (five ? 48 : 16) + 32 * (j / 2), *qh = blk + 16;
        for (int l = 0; l < 32; l++) {
            int c = j & 1 ? qs[l] >> 4 : qs[l] & 15;
            if (five) c |= ((qh[l] >> j) & 1) << 4;
            codes[l] = (uint8_t)c;
        }
        break;
    }
    case GGML_Q6_K: { /* 256 weights: ql[128], qh[64], int8 scales[16], fp16 d */
        int j = b % 8, half = j / 4, quarter = j % 4;
        const uint8_t *blk = row + (size_t)(b / 8) * 210;
        const uint8_t *ql = blk + 64 * half + 32 * (quarter & 1), *qh = blk + 128 + 32 * half;
        const int8_t *sc = (const int8_t *)(blk + 192);
        float dd = half_at(blk + 208);
        *d = half_of(dd * (float)sc[2 * j]);
        *m = half_of(dd * (float)sc[2 * j + 1]);
        for (int l = 0; l < 32; l++)
            codes[l] = (uint8_t)(((ql[l] >> (4 * (quarter >> 1))) & 15) | ((qh[l] >> (2 * quarter)) & 3) << 4);
        break;
    }
    }
}

/* the 256 codes t + 1 (element order) and fp16 d of a TQ2_0 (66 bytes) or TQ1_0 (54 bytes) block */
static void ternary_codes(int gguf_type, const uint8_t *blk, uint8_t *c, uint16_t *d) {
    if (gguf_type == GGML_TQ2_0) { /* qs[64], d: element 128 j + 32 l + m is bits 2 l of qs[32 j + m] */
        for (int j = 0; j < 2; j++)
            for (int l = 0; l < 4; l++)
                for (int m = 0; m < 32; m++) c[128 * j + 32 * l + m] = (blk[32 * j + m] >> (2 * l)) & 3;
        memcpy(d, blk + 64, 2);
        return;
    }
    /* TQ1_0: qs[48], qh[4], d. Base-3 digits stored as ceil(v * 256 / 243): multiplying by 3^n (mod 256)
     * moves digit n to the top and (x * 3) >> 8 reads it off, as ggml's dequantize_row_tq1_0 does. */
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 32; m++) c[32 * n + m] = (uint8_t)(((uint8_t)(blk[m] * pow3[n]) * 3) >> 8);
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 16; m++) c[160 + 16 * n + m] = (uint8_t)(((uint8_t)(blk[32 + m] * pow3[n]) * 3) >> 8);
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 4; m++) c[240 + 4 * n + m] = (uint8_t)(((uint8_t)(blk[48 + m] * pow3[n]) * 3) >> 8);
    memcpy(d, blk + 52, 2);
}

static int repack_t2(int gguf_type, const uint8_t *src, int n, int k, uint8_t *dst) {
    int nb = k / RL_T2_QK, groups = padded_rows(n) / RL_ROWS;
    size_t bsize = gguf_type == GGML_TQ2_0 ? 66 : 54;
    uint8_t c[RL_T2_QK];
    for (int g = 0; g < groups; g++) {
        for (int b = 0; b < nb; b++) {
            uint8_t *out = dst + ((size_t)g * nb + b) * RL_T2_GROUP_BLOCK;
            for (int r = 0; r < RL_ROWS; r++) {
                int row = g * RL_ROWS + r;
                if (row >= n) continue; /* padding rows: d = 0 and codes 0 */
                uint16_t d;
                ternary_codes(gguf_type, src + ((size_t)row * nb + b) * bsize, c, &d);
                memcpy(out + 2 * r, &d, 2);
                for (int i = 0; i < RL_T2_QK; i++) {
                    int s = i / 32, h = (i / 16) & 1, j = (i / 4) & 3, t = i & 3;
                    out[16 + 64 * s + 32 * h + 4 * r + t] |= (uint8_t)(c[i] << (2 * j));
                }
            }
        }
    }
    return 0;
}

static size_t row_bytes(int t, int k) {
    switch (t) {
    case GGML_Q4_0: return (size_t)k / 32 * 18;
    case GGML_Q4_1: return (size_t)k / 32 * 20;
    case GGML_Q5_0: return (size_t)k / 32 * 22;
    case GGML_Q5_1: return (size_t)k / 32 * 24;
    case GGML_Q8_0: return (size_t)k / 32 * 34;
    case GGML_Q4_K: return (size_t)k / 256 * 144;
    case GGML_Q5_K: return (size_t)k / 256 * 176;
    case GGML_Q6_K: return (size_t)k / 256 * 210;
    default: return 0;
    }
}

int rl_repack(int gguf_type, const uint8_t *src, int n, int k, uint8_t *dst) {
    size_t size = rl_repacked_size(gguf_type, n, k);
    if (!size) return -1;
    memset(dst, 0, size);
    if (gguf_type == GGML_TQ1_0 || gguf_type == GGML_TQ2_0) return repack_t2(gguf_type, src, n, k, dst);
    int fmt = rl_format_of(gguf_type), nb = k / RL_QK, groups = padded_rows(n) / RL_ROWS;
    size_t gbb = rl_group_block_bytes(fmt), rb = row_bytes(gguf_type, k);
    uint8_t codes[32];
    for (int g = 0; g < groups; g++) {
        for (int r = 0; r < RL_ROWS; r++) {
            int row = g * RL_ROWS + r;
            if (row >= n) continue;
            const uint8_t *src_row = src + (size_t)row * rb;
            for (int b = 0; b < nb; b++) {
                uint8_t *out = dst + ((size_t)g * nb + b) * gbb;
                if (fmt == RL_Q8) {
                    const uint8_t *blk = src_row + (size_t)b * 34;
                    memcpy(out + 2 * r, blk, 2);
                    for (int v = 0; v < 8; v++) memcpy(out + 16 + 32 * v + 4 * r, blk + 2 + 4 * v, 4);
                    continue;
                }
                if (gguf_type == GGML_Q4_0 || gguf_type == GGML_Q4_1) { /* the file's code pairing: copies */
                    int q40 = gguf_type == GGML_Q4_0;
                    const uint8_t *blk = src_row + (size_t)b * (q40 ? 18 : 20);
                    memcpy(out + 2 * r, blk, 2);
                    if (!q40) memcpy(out + 16 + 2 * r, blk + 2, 2);
                    for (int v = 0; v < 4; v++) memcpy(out + (q40 ? 16 : 32) + 32 * v + 4 * r, blk + (q40 ? 2 : 4) + 4 * v, 4);
                    continue;
                }
                uint16_t d = 0, m = 0;
                source_block(gguf_type, src_row, b, codes, &d, &m);
                memcpy(out + 2 * r, &d, 2);
                if (fmt != RL_Q4_0) memcpy(out + 16 + 2 * r, &m, 2); /* RL_Q4_0: m = -8 d, not stored */
                int co = fmt == RL_Q4_0 ? 16 : 32; /* where the code vectors start */
                for (int v = 0; v < 4; v++) {
                    for (int t = 0; t < 4; t++) {
                        int lo = codes[4 * v + t], hi = codes[16 + 4 * v + t], at = 4 * r + t;
                        out[co + 32 * v + at] = (uint8_t)((lo & 15) | (hi & 15) << 4);
                        if (fmt == RL_Q5 || fmt == RL_Q6) out[160 + at] |= (uint8_t)(((lo >> 4) & 1) << v | ((hi >> 4) & 1) << (4 + v));
                        if (fmt == RL_Q6) out[192 + at] |= (uint8_t)(((lo >> 5) & 1) << v | ((hi >> 5) & 1) << (4 + v));
                    }
                }
            }
        }
    }
    return 0;
}

/* Rows of a repacked matrix back to float32: prefill's dense matmuls and the embedding lookup read the
 * weights from the repacked copy, so the model file need not stay in memory. */
static void dequant_row(int fmt, const uint8_t *data, int k, int row, float *out) {
    int nb = k / RL_QK, g = row / RL_ROWS, r = row % RL_ROWS;
    size_t gbb = rl_group_block_bytes(fmt);
    if (fmt == RL_T2) {
        for (int b = 0; b < k / RL_T2_QK; b++) {
            const uint8_t *gb = data + ((size_t)g * (k / RL_T2_QK) + b) * RL_T2_GROUP_BLOCK;
            float d = half_at(gb + 2 * r), *o = out + (size_t)b * RL_T2_QK;
            for (int i = 0; i < RL_T2_QK; i++) {
                int s = i / 32, h = (i / 16) & 1, j = (i / 4) & 3, t = i & 3;
                int c = (gb[16 + 64 * s + 32 * h + 4 * r + t] >> (2 * j)) & 3;
                o[i] = d * (float)(c - 1); /* exact, as ggml's (q - 1) * d */
            }
        }
        return;
    }
    for (int b = 0; b < nb; b++) {
        float *o = out + (size_t)b * RL_QK;
        const uint8_t *gb = data + ((size_t)g * nb + b) * gbb;
        if (fmt == RL_Q8) {
            float d = half_at(gb + 2 * r);
            for (int v = 0; v < 8; v++) {
                const int8_t *c = (const int8_t *)(gb + 16 + 32 * v + 4 * r);
                for (int t = 0; t < 4; t++) o[4 * v + t] = d * (float)c[t];
            }
            continue;
        }
        float d = half_at(gb + 2 * r), m = fmt == RL_Q4_0 ? -8.0f * d : half_at(gb + 16 + 2 * r);
        const uint8_t *p4 = gb + 160 + 4 * r, *p5 = gb + 192 + 4 * r;
        for (int v = 0; v < 4; v++) {
            const uint8_t *c = gb + (fmt == RL_Q4_0 ? 16 : 32) + 32 * v + 4 * r;
            for (int t = 0; t < 4; t++) {
                int lo = c[t] & 15, hi = c[t] >> 4;
                if (fmt == RL_Q4 || fmt == RL_Q4_0) {
                    o[4 * v + t] = d * (float)lo + m, o[16 + 4 * v + t] = d * (float)hi + m;
                    continue;
                }
                lo |= ((p4[t] >> v) & 1) << 4, hi |= ((p4[t] >> (4 + v)) & 1) << 4;
                if (fmt == RL_Q5) {
                    o[4 * v + t] = d * (float)lo + m, o[16 + 4 * v + t] = d * (float)hi + m;
                    continue;
                }
                lo |= ((p5[t] >> v) & 1) << 5, hi |= ((p5[t] >> (4 + v)) & 1) << 5;
                o[4 * v + t] = d * (float)(lo - 32), o[16 + 4 * v + t] = m * (float)(hi - 32);
            }
        }
    }
}

void rl_dequant_rows(int fmt, const uint8_t *data, int k, int row0, int nrows, float *out) {
    for (int i = 0; i < nrows; i++) dequant_row(fmt, data, k, row0 + i, out + (size_t)i * k);
}

void rl_gather_rows(int fmt, const uint8_t *data, int k, const int64_t *ids, int count, float *out) {
    for (int i = 0; i < count; i++) dequant_row(fmt, data, k, (int)ids[i], out + (size_t)i * k);
}
