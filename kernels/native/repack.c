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
 */
#include <string.h>

#include "ripe_native.h"

static int padded_rows(int n) { return (n + RL_ROWS - 1) / RL_ROWS * RL_ROWS; }

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
    default:
        return 0;
    }
}

int rl_repack(int gguf_type, const uint8_t *src, int n, int k, uint8_t *dst) {
    size_t size = rl_repacked_size(gguf_type, n, k);
    if (!size) return -1;
    memset(dst, 0, size);
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
