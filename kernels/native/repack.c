/* Repacking GGUF blocks into the layout the decode kernels stream.
 *
 * Eight output rows are interleaved per group so that a kernel keeps one 32-bit lane per row: it
 * multiplies four weights of each of the eight rows by the same four activations (broadcast) in one
 * instruction and never sums across lanes until the row is done. Q4_1 becomes RL_Q4 (w = d * q + m per 32
 * weights), Q4_0 becomes RL_Q4_0 (w = d * (q - 8): RL_Q4 without the m vector, as many bytes per weight as
 * the file), Q8_0 becomes RL_Q8; the 4-bit and 8-bit codes are unchanged.
 * Rows past n (padding up to a multiple of eight) are zero. One group-block covers 32 inputs of 8 rows:
 *   RL_Q4 (160 bytes): fp16 d[8], fp16 m[8], then 4 vectors of 32 bytes; byte 4 r + t of vector v holds
 *                      row r's code 4 v + t in its low nibble and code 16 + 4 v + t in its high nibble
 *                      (the same pairing of codes as a GGUF Q4 block)
 *   RL_Q4_0 (144 bytes): fp16 d[8], then the 4 code vectors of RL_Q4
 *   RL_Q8 (272 bytes): fp16 d[8], then 8 vectors of 32 bytes; byte 4 r + t of vector v is row r's 4 v + t
 * TQ2_0 and TQ1_0 (ternary, w = d * t, t in {-1, 0, 1}, one d per 256) both become RL_T2, whose group-blocks
 * cover 256 inputs of 8 rows (TQ1_0's base-3 digits are decoded here; both hold 2 bits per weight after):
 *   RL_T2 (528 bytes, 2.06 bits per weight): fp16 d[8] (one per row and 256 inputs), then per 32 inputs
 *                      s = 0..7 two vectors h = 0, 1 of 32 bytes; bits 2 j, 2 j + 1 of byte 4 r + t of
 *                      vector h hold row r's code c = t + 1 (0..2) of input 32 s + 16 h + 4 j + t, so that
 *                      (vector >> 2 j) & 3 is a vector of codes that pairs with the activation quadruple
 *                      32 s + 16 h + 4 j (as RL_Q4's nibbles do). w = d c - d: a 32-input block adds
 *                      d d_x sum(c q) - d s_x. (A stray TQ2_0 code 3 stays 3, w = 2 d, as in ggml.)
 */
#include <string.h>

#include "ripe_native.h"

static int padded_rows(int n) { return (n + RL_ROWS - 1) / RL_ROWS * RL_ROWS; }

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

size_t rl_repacked_size(int gguf_type, int n, int k) {
    if (n <= 0 || k <= 0 || k % RL_QK) return 0;
    size_t groups = (size_t)padded_rows(n) / RL_ROWS, blocks = (size_t)k / RL_QK;
    switch (gguf_type) {
    case GGML_Q4_0:
        return groups * blocks * RL_Q4_0_GROUP_BLOCK;
    case GGML_Q4_1:
        return groups * blocks * RL_Q4_GROUP_BLOCK;
    case GGML_Q8_0:
        return groups * blocks * RL_Q8_GROUP_BLOCK;
    case GGML_TQ1_0:
    case GGML_TQ2_0:
        return k % RL_T2_QK ? 0 : groups * (size_t)(k / RL_T2_QK) * RL_T2_GROUP_BLOCK;
    default:
        return 0;
    }
}

int rl_repack(int gguf_type, const uint8_t *src, int n, int k, uint8_t *dst) {
    size_t size = rl_repacked_size(gguf_type, n, k);
    if (!size) return -1;
    memset(dst, 0, size);
    if (gguf_type == GGML_TQ1_0 || gguf_type == GGML_TQ2_0) return repack_t2(gguf_type, src, n, k, dst);
    int nb = k / RL_QK, groups = padded_rows(n) / RL_ROWS;
    for (int g = 0; g < groups; g++) {
        for (int b = 0; b < nb; b++) {
            for (int r = 0; r < RL_ROWS; r++) {
                int row = g * RL_ROWS + r;
                if (row >= n) continue;
                if (gguf_type == GGML_Q8_0) {
                    const uint8_t *blk = src + ((size_t)row * nb + b) * 34;
                    uint8_t *out = dst + ((size_t)g * nb + b) * RL_Q8_GROUP_BLOCK;
                    memcpy(out + 2 * r, blk, 2);
                    for (int v = 0; v < 8; v++) memcpy(out + 16 + 32 * v + 4 * r, blk + 2 + 4 * v, 4);
                } else if (gguf_type == GGML_Q4_0) { /* codes pair as in Q4_1 below */
                    const uint8_t *blk = src + ((size_t)row * nb + b) * 18;
                    uint8_t *out = dst + ((size_t)g * nb + b) * RL_Q4_0_GROUP_BLOCK;
                    memcpy(out + 2 * r, blk, 2);
                    for (int v = 0; v < 4; v++) memcpy(out + 16 + 32 * v + 4 * r, blk + 2 + 4 * v, 4);
                } else {
                    const uint8_t *blk = src + ((size_t)row * nb + b) * 20;
                    uint8_t *out = dst + ((size_t)g * nb + b) * RL_Q4_GROUP_BLOCK;
                    memcpy(out + 2 * r, blk, 2);
                    memcpy(out + 16 + 2 * r, blk + 2, 2);
                    /* GGUF byte i holds codes i (low) and 16 + i (high): the pairing the layout keeps */
                    for (int v = 0; v < 4; v++) memcpy(out + 32 + 32 * v + 4 * r, blk + 4 + 4 * v, 4);
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
    if (fmt == RL_T2) {
        for (int b = 0; b < k / RL_T2_QK; b++) {
            const uint8_t *gb = data + ((size_t)g * (k / RL_T2_QK) + b) * RL_T2_GROUP_BLOCK;
            uint16_t dh;
            memcpy(&dh, gb + 2 * r, 2);
            float d = rl_half_to_float(dh), *o = out + (size_t)b * RL_T2_QK;
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
        if (fmt == RL_Q4 || fmt == RL_Q4_0) {
            int bytes = fmt == RL_Q4 ? RL_Q4_GROUP_BLOCK : RL_Q4_0_GROUP_BLOCK, at = fmt == RL_Q4 ? 32 : 16;
            const uint8_t *gb = data + ((size_t)g * nb + b) * bytes;
            uint16_t dh, mh;
            memcpy(&dh, gb + 2 * r, 2);
            float d = rl_half_to_float(dh), m = -8.0f * d;
            if (fmt == RL_Q4) {
                memcpy(&mh, gb + 16 + 2 * r, 2);
                m = rl_half_to_float(mh);
            }
            for (int v = 0; v < 4; v++) {
                const uint8_t *c = gb + at + 32 * v + 4 * r;
                for (int t = 0; t < 4; t++) {
                    o[4 * v + t] = d * (float)(c[t] & 15) + m;
                    o[16 + 4 * v + t] = d * (float)(c[t] >> 4) + m;
                }
            }
        } else {
            const uint8_t *gb = data + ((size_t)g * nb + b) * RL_Q8_GROUP_BLOCK;
            uint16_t dh;
            memcpy(&dh, gb + 2 * r, 2);
            float d = rl_half_to_float(dh);
            for (int v = 0; v < 8; v++) {
                const int8_t *c = (const int8_t *)(gb + 16 + 32 * v + 4 * r);
                for (int t = 0; t < 4; t++) o[4 * v + t] = d * (float)c[t];
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
