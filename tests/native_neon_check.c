/* Every instruction-set path this CPU has against the reference path, without Python: the CPU-portability
 * test cross-compiles this for ARM64 with the library's C files and runs it under qemu-aarch64 as CPUs with
 * and without the dot-product extension (tests/test_cpu_portability.py).
 *
 *   aarch64-linux-gnu-gcc -O2 -std=c11 -D_GNU_SOURCE -Ikernels/native tests/native_neon_check.c \
 *       kernels/native/{decode_step,repack,kernels_ref,kernels_avx2,kernels_vnni,kernels_neon}.c -lm -lpthread
 *
 * GGUF blocks are fixed pseudo-random bytes with finite fp16 scales, repacked by rl_repack. Checks:
 * quantize bit-exact; matvec within 1e-4 of the max |value| (and every row of a batch equal to that row
 * alone; the VNNI paths equal to AVX2's); exp within 1e-6 relative; attention (m, l, acc / l) within 1e-5.
 * One line per check; exit 1 on any mismatch. Prints "best isa N" first. Natively on x86-64 it checks every
 * path the CPU has (AVX2, AVX-VNNI, AVX512-VNNI).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ripe_native.h"

int rl_cpu_best_isa(void);
int rl_isa_available(int isa);
int rl_test_quantize(int isa, const float *x, int k, int8_t *q, float *d, float *s, int32_t *h);
int rl_test_matvec(int isa, int fmt, const uint8_t *data, int n, int k, const float *x, int rows, float *out);
int rl_test_exp(int isa, float *x, int n);
int rl_test_attn(int isa, const float *q, int G, int d, const uint16_t *k, const uint16_t *v, int n_keys,
                 int kv_f16, float scale, float *m, float *l, float *acc);
int rl_test_attn_rows(int isa, const float *q, int R, int G, int d, const uint16_t *k, const uint16_t *v,
                      const int *k0, const int *k1, int kv_f16, float scale);

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next_u32() & 0xffffff) / 16777216.0f; }

/* not fmax: gcc 12's aarch64 vectorizer crashes (ICE in vect_transform_reduction) on fmax reductions here */
static double bigger(double a, double b) { return b > a ? b : a; }

static int failures = 0;
static void report(int ok, const char *what, int isa, double err) {
    printf("%s isa %d %s (err %.3g)\n", ok ? "ok  " : "FAIL", isa, what, err);
    if (!ok) failures++;
}

/* ggml type, block bytes, weights per block, offsets of its fp16 scales */
static const struct {
    const char *name;
    int type, block, per_block, halves[2], nh;
} FORMATS[] = {
    {"q4_0", GGML_Q4_0, 18, 32, {0}, 1},    {"q4_1", GGML_Q4_1, 20, 32, {0, 2}, 2},
    {"q8_0", GGML_Q8_0, 34, 32, {0}, 1},    {"q5_0", GGML_Q5_0, 22, 32, {0}, 1},
    {"q4_k", GGML_Q4_K, 144, 256, {0, 2}, 2}, {"q6_k", GGML_Q6_K, 210, 256, {208}, 1},
    {"tq2_0", GGML_TQ2_0, 66, 256, {64}, 1},
};

static void check_quantize(int isa) {
    enum { K = 1024 };
    static float x[K];
    for (int i = 0; i < K; i++) x[i] = uniform(-3.0f, 3.0f) * (i % 97 == 0 ? 40.0f : 1.0f);
    for (int i = 0; i < 32; i++) x[i] = (float)(i - 16) + 0.5f; /* amax 16.5: ties after scaling are rare; */
    for (int i = 32; i < 64; i++) x[i] = (i == 32) ? 127.0f : (float)(i - 48) + 0.5f; /* id = 1: exact ties */
    for (int i = 64; i < 96; i++) x[i] = 0.0f;                                        /* amax 0 */
    int8_t q0[K], q1[K];
    float d0[K / 32], d1[K / 32], s0[K / 32], s1[K / 32];
    int32_t h0[K / 16], h1[K / 16];
    rl_test_quantize(RL_ISA_REF, x, K, q0, d0, s0, h0);
    int got = rl_test_quantize(isa, x, K, q1, d1, s1, h1);
    int ok = got == isa && !memcmp(q0, q1, sizeof q0) && !memcmp(d0, d1, sizeof d0) && !memcmp(s0, s1, sizeof s0) &&
             !memcmp(h0, h1, sizeof h0);
    report(ok, "quantize bit-exact", isa, 0.0);
}

static void check_matvec(int isa) {
    const int n = 20, k = 512, maxrows = 5; /* n pads to 24 rows: three groups, the last part padding */
    const int ldo = 24;
    float *x = malloc(sizeof(float) * maxrows * k);
    for (int i = 0; i < maxrows * k; i++) x[i] = uniform(-2.0f, 2.0f);
    for (size_t f = 0; f < sizeof FORMATS / sizeof FORMATS[0]; f++) {
        int nblocks = n * k / FORMATS[f].per_block, bb = FORMATS[f].block;
        uint8_t *raw = malloc((size_t)nblocks * bb);
        for (int i = 0; i < nblocks; i++) {
            uint8_t *blk = raw + (size_t)i * bb;
            for (int j = 0; j < bb; j++) blk[j] = (uint8_t)next_u32();
            for (int z = 0; z < FORMATS[f].nh; z++) {
                uint16_t hv = rl_float_to_half(uniform(0.002f, 0.05f) * (next_u32() & 1 ? -1.0f : 1.0f));
                memcpy(blk + FORMATS[f].halves[z], &hv, 2);
            }
        }
        size_t size = rl_repacked_size(FORMATS[f].type, n, k);
        uint8_t *packed = malloc(size);
        if (rl_repack(FORMATS[f].type, raw, n, k, packed) != 0) {
            report(0, FORMATS[f].name, isa, -1.0);
            continue;
        }
        int fmt = rl_format_of(FORMATS[f].type);
        for (int rows = 1; rows <= maxrows; rows += 2) {
            float *ref = calloc((size_t)rows * ldo, sizeof(float)), *out = calloc((size_t)rows * ldo, sizeof(float));
            rl_test_matvec(RL_ISA_REF, fmt, packed, n, k, x, rows, ref);
            int got = rl_test_matvec(isa, fmt, packed, n, k, x, rows, out);
            double mx = 0.0, err = 0.0, batch_err = 0.0;
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < n; j++) {
                    mx = bigger(mx, fabs(ref[r * ldo + j]));
                    err = bigger(err, fabs(ref[r * ldo + j] - out[r * ldo + j]));
                }
            for (int r = 0; r < rows; r++) { /* each row alone: the same floats as in its batch */
                float one[24];
                rl_test_matvec(isa, fmt, packed, n, k, x + (size_t)r * k, 1, one);
                for (int j = 0; j < n; j++) batch_err = bigger(batch_err, fabs(one[j] - out[r * ldo + j]));
            }
            if (isa == RL_ISA_AVXVNNI || isa == RL_ISA_AVX512VNNI) { /* the AVX2 loops: the same bits */
                float *avx2 = calloc((size_t)rows * ldo, sizeof(float));
                rl_test_matvec(RL_ISA_AVX2, fmt, packed, n, k, x, rows, avx2);
                for (int r = 0; r < rows; r++)
                    for (int j = 0; j < n; j++) batch_err = bigger(batch_err, fabs(avx2[r * ldo + j] - out[r * ldo + j]));
                free(avx2);
            }
            char what[96];
            snprintf(what, sizeof what, "matvec %s rows %d (max |ref| %.3g, batch/AVX2 diff %.3g)", FORMATS[f].name,
                     rows, mx, batch_err);
            report(got == isa && mx > 0.0 && err <= 1e-4 * mx && batch_err == 0.0, what, isa, err / mx);
            free(ref), free(out);
        }
        free(raw), free(packed);
    }
    free(x);
}

static void check_exp(int isa) {
    enum { N = 203 }; /* not a multiple of 4 or 8: the scalar tail too */
    float a[N], b[N];
    for (int i = 0; i < N; i++) a[i] = b[i] = -80.0f + 168.0f * i / (N - 1) + uniform(-0.3f, 0.3f);
    a[0] = b[0] = 0.0f, a[1] = b[1] = 88.5f, a[2] = b[2] = -80.0f;
    rl_test_exp(RL_ISA_REF, a, N);
    int got = rl_test_exp(isa, b, N);
    double err = 0.0;
    for (int i = 0; i < N; i++) err = bigger(err, fabs((double)b[i] - a[i]) / a[i]);
    report(got == isa && err <= 1e-6, "exp relative", isa, err);
}

static void check_attn(int isa) {
    static const int Gs[] = {1, 3, 8}, ds[] = {8, 40, 64, 128}, ns[] = {1, 7, 37};
    for (int f16 = 0; f16 < 2; f16++)
        for (int gi = 0; gi < 3; gi++)
            for (int di = 0; di < 4; di++)
                for (int ni = 0; ni < 3; ni++) {
                    int G = Gs[gi], d = ds[di], n = ns[ni];
                    float *q = malloc(sizeof(float) * G * d);
                    uint16_t *kk = malloc(2 * (size_t)n * d), *vv = malloc(2 * (size_t)n * d);
                    for (int i = 0; i < G * d; i++) q[i] = uniform(-1.5f, 1.5f);
                    for (int i = 0; i < n * d; i++) {
                        float a = uniform(-1.0f, 1.0f), b = uniform(-1.0f, 1.0f);
                        kk[i] = f16 ? rl_float_to_half(a) : rl_float_to_bf16(a);
                        vv[i] = f16 ? rl_float_to_half(b) : rl_float_to_bf16(b);
                    }
                    float m0[8], l0[8], m1[8], l1[8], *a0 = malloc(sizeof(float) * G * d),
                                                      *a1 = malloc(sizeof(float) * G * d);
                    float scale = 1.0f / sqrtf((float)d);
                    rl_test_attn(RL_ISA_REF, q, G, d, kk, vv, n, f16, scale, m0, l0, a0);
                    int got = rl_test_attn(isa, q, G, d, kk, vv, n, f16, scale, m1, l1, a1);
                    double err = 0.0;
                    for (int g = 0; g < G; g++) {
                        err = bigger(err, fabs(m0[g] - m1[g]) / fmax(1.0, fabs(m0[g])));
                        err = bigger(err, fabs(l0[g] - l1[g]) / l0[g]);
                        for (int i = 0; i < d; i++)
                            err = bigger(err, fabs(a0[g * d + i] / l0[g] - a1[g * d + i] / l1[g]));
                    }
                    char what[96];
                    snprintf(what, sizeof what, "attention %s G %d d %d keys %d", f16 ? "f16" : "bf16", G, d, n);
                    report(got == isa && err <= 1e-5, what, isa, err);
                    free(q), free(kk), free(vv), free(a0), free(a1);
                }
}

/* rows of one sequence attending together (a verify's k + 1 rows): each row's partial bit for bit as alone,
 * with rows whose ranges start and end at different keys (a sliding window, the last range of a row).
 * Paths without a grouped kernel for the shape (the reference; AVX2 beyond head size 64) are skipped. */
static void check_attn_rows(int isa) {
    static const int Gs[] = {1, 3, 7}, ds[] = {64, 128}, Rs[] = {2, 5, 9};
    for (int f16 = 0; f16 < 2; f16++)
        for (int gi = 0; gi < 3; gi++)
            for (int di = 0; di < 2; di++)
                for (int ri = 0; ri < 3; ri++) {
                    int G = Gs[gi], d = ds[di], R = Rs[ri], n = 40 + R, k0[16], k1[16];
                    for (int r = 0; r < R; r++) k1[r] = 40 + r + 1, k0[r] = r < 2 ? 0 : 3 * r;
                    float *q = malloc(sizeof(float) * R * G * d);
                    uint16_t *kk = malloc(2 * (size_t)n * d), *vv = malloc(2 * (size_t)n * d);
                    for (int i = 0; i < R * G * d; i++) q[i] = uniform(-1.5f, 1.5f);
                    for (int i = 0; i < n * d; i++) {
                        float a = uniform(-1.0f, 1.0f), b = uniform(-1.0f, 1.0f);
                        kk[i] = f16 ? rl_float_to_half(a) : rl_float_to_bf16(a);
                        vv[i] = f16 ? rl_float_to_half(b) : rl_float_to_bf16(b);
                    }
                    int diff = rl_test_attn_rows(isa, q, R, G, d, kk, vv, k0, k1, f16, 1.0f / sqrtf((float)d));
                    if (diff >= 0) {
                        char what[96];
                        snprintf(what, sizeof what, "grouped attention %s G %d d %d rows %d", f16 ? "f16" : "bf16",
                                 G, d, R);
                        report(diff == 0, what, isa, (double)diff);
                    }
                    free(q), free(kk), free(vv);
                }
}

int main(void) {
    int best = rl_cpu_best_isa();
    printf("best isa %d\n", best);
    int checked = 0;
    for (int isa = 1; isa < RL_N_ISA; isa++) {
        if (!rl_isa_available(isa)) continue;
        checked++;
        check_quantize(isa);
        check_matvec(isa);
        check_exp(isa);
        check_attn(isa);
        check_attn_rows(isa);
    }
    printf("%d paths checked, %d failures\n", checked, failures);
    return failures ? 1 : 0;
}
