/* Repacking GGUF blocks into the layout the decode kernels stream.
 *
 * Four output rows are interleaved per group, block by block, so a kernel reads one sequential stream
 * and reuses each activation block for four rows. Q4_0 and Q4_1 both become RL_Q4 (w = d * q + m per 32
 * weights, with Q4_0's m = -8 d; the 4-bit codes are copied unchanged), Q8_0 becomes RL_Q8. Rows past n
 * (padding up to a multiple of four) are zero.
 *   RL_Q4 group-block: fp16 d[4], fp16 m[4], uint8 codes[4][16]   (80 bytes)
 *   RL_Q8 group-block: fp16 d[4], int8 q[4][32]                    (136 bytes)
 */
#include <string.h>

#include "ripe_native.h"

enum { Q4_GROUP_BLOCK = 80, Q8_GROUP_BLOCK = 136 };

static int padded_rows(int n) { return (n + RL_ROWS - 1) / RL_ROWS * RL_ROWS; }

size_t rl_repacked_size(int gguf_type, int n, int k) {
    if (n <= 0 || k <= 0 || k % RL_QK) return 0;
    size_t groups = (size_t)padded_rows(n) / RL_ROWS, blocks = (size_t)k / RL_QK;
    switch (gguf_type) {
    case GGML_Q4_0:
    case GGML_Q4_1:
        return groups * blocks * Q4_GROUP_BLOCK;
    case GGML_Q8_0:
        return groups * blocks * Q8_GROUP_BLOCK;
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
            for (int j = 0; j < RL_ROWS; j++) {
                int row = g * RL_ROWS + j;
                if (row >= n) continue;
                if (gguf_type == GGML_Q8_0) {
                    const uint8_t *blk = src + ((size_t)row * nb + b) * 34;
                    uint8_t *out = dst + ((size_t)g * nb + b) * Q8_GROUP_BLOCK;
                    memcpy(out + 2 * j, blk, 2);
                    memcpy(out + 8 + 32 * j, blk + 2, 32);
                } else {
                    uint8_t *out = dst + ((size_t)g * nb + b) * Q4_GROUP_BLOCK;
                    uint16_t d, m;
                    const uint8_t *codes;
                    if (gguf_type == GGML_Q4_1) {
                        const uint8_t *blk = src + ((size_t)row * nb + b) * 20;
                        memcpy(&d, blk, 2);
                        memcpy(&m, blk + 2, 2);
                        codes = blk + 4;
                    } else {
                        const uint8_t *blk = src + ((size_t)row * nb + b) * 18;
                        memcpy(&d, blk, 2);
                        m = rl_float_to_half(-8.0f * rl_half_to_float(d)); /* exact: a power-of-two scale */
                        codes = blk + 2;
                    }
                    memcpy(out + 2 * j, &d, 2);
                    memcpy(out + 8 + 2 * j, &m, 2);
                    memcpy(out + 16 + 16 * j, codes, 16);
                }
            }
        }
    }
    return 0;
}
