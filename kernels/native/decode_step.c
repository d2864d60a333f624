/* The native CPU decode step: every layer, the final norm and the output head for a batch of rows in one
 * call, on a persistent thread pool, with the caller's GIL released (ctypes releases it).
 *
 * Why our own: eager torch ran ~1,000 small ops per token through the GIL, its CPU int4 matmul does fp32
 * FMAs (no int8 dot products) and reads a weight once per 4 rows, and SDPA's CPU kernel costs 235 us per
 * layer for one query row. Here weights are repacked once (repack.c) for int8 dot products, activations
 * are quantized to int8 once per input and shared by the fused projections, and decode attention reads
 * the paged KV pool through block tables, each K/V head once for its query heads.
 *
 * A row is one query token: its token's embedding (computed by the caller), its position and the block
 * table of its sequence. Rows of one sequence (a speculative verify, a short prefill) write their K/V
 * first and each attends to positions <= its own, so any mix of sequences and rows works. Every row is
 * computed by the same code whatever the batch, so a sequence's output does not depend on its batch.
 *
 * The instruction set is chosen at run time (x86-64: cpuid via __builtin_cpu_supports; ARM64: NEON is
 * baseline, the dot-product extension is read from the OS, see kernels_neon.c); the vector kernels are
 * compiled with function target attributes, never with the build machine's -march.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ripe_native.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define ATTN_CHUNK 128 /* keys per attention task, see attend() */
#define RL_GROUP_ROWS 16 /* rows that attend together at most, see group_rows() */

/* ---- instruction-set dispatch -------------------------------------------------------------------- */

typedef struct {
    int isa;
    rl_quantize_fn quantize;
    rl_matvec_fn matvec[RL_N_FMT]; /* by format id (ripe_native.h); 0: none */
    void (*exp)(float *, int);
    void (*attn_part)(const rl_attn_args *, int, int, float *, float *, float *, float *);
    int (*attn_rows)(const rl_attn_args *, int, const float *const *, const int *, const int *, float *const *,
                     float *); /* NULL: rows attend one at a time */
} rl_kernels;

static const rl_kernels KERNELS_REF = {RL_ISA_REF, rl_quantize_ref,
                                       {0, rl_matvec_q4_ref, rl_matvec_q8_ref, rl_matvec_q5_ref, rl_matvec_q6_ref,
                                        rl_matvec_q4_0_ref, rl_matvec_t2_ref},
                                       rl_exp_ref,
                                       rl_attn_part_ref, NULL};
#if defined(__x86_64__)
static const rl_kernels KERNELS_AVX2 = {RL_ISA_AVX2, rl_quantize_avx2,
                                        {0, rl_matvec_q4_avx2, rl_matvec_q8_avx2, rl_matvec_q5_avx2,
                                         rl_matvec_q6_avx2, rl_matvec_q4_0_avx2, rl_matvec_t2_avx2},
                                        rl_exp_avx2,
                                        rl_attn_part_avx2, rl_attn_rows_avx2};
static const rl_kernels KERNELS_AVXVNNI = {RL_ISA_AVXVNNI, rl_quantize_avx2,
                                           {0, rl_matvec_q4_avxvnni, rl_matvec_q8_avxvnni, rl_matvec_q5_avx2,
                                            rl_matvec_q6_avx2, rl_matvec_q4_0_avxvnni, rl_matvec_t2_avx2},
                                           rl_exp_avx2,
                                           rl_attn_part_avx2, rl_attn_rows_avx2};
static const rl_kernels KERNELS_AVX512VNNI = {RL_ISA_AVX512VNNI, rl_quantize_avx2,
                                              {0, rl_matvec_q4_avx512vnni, rl_matvec_q8_avx512vnni,
                                               rl_matvec_q5_avx2, rl_matvec_q6_avx2, rl_matvec_q4_0_avx512vnni,
                                               rl_matvec_t2_avx2},
                                              rl_exp_avx2,
                                              rl_attn_part_avx2, rl_attn_rows_avx2};
#endif
#if defined(__aarch64__)
/* the int8 matvecs need dot products: without them, the reference kernels */
static const rl_kernels KERNELS_NEON = {RL_ISA_NEON, rl_quantize_neon,
                                        {0, rl_matvec_q4_ref, rl_matvec_q8_ref, rl_matvec_q5_ref, rl_matvec_q6_ref,
                                         rl_matvec_q4_0_ref, rl_matvec_t2_ref},
                                        rl_exp_neon,
                                        rl_attn_part_neon, rl_attn_rows_neon};
static const rl_kernels KERNELS_DOTPROD = {RL_ISA_DOTPROD, rl_quantize_neon,
                                           {0, rl_matvec_q4_dotprod, rl_matvec_q8_dotprod, rl_matvec_q5_dotprod,
                                            rl_matvec_q6_dotprod, rl_matvec_q4_0_dotprod, rl_matvec_t2_dotprod},
                                           rl_exp_neon,
                                           rl_attn_part_neon, rl_attn_rows_neon};
#endif

#if defined(__x86_64__)
/* whether this CPU runs an x86 path: libgcc's cpu model reports AVX-512 features only when the OS saves
 * their state (XCR0), so an AVX512 path is never chosen where its instructions would fault */
static int x86_supports(int isa) {
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    switch (isa) {
    case RL_ISA_AVX2: return avx2;
    case RL_ISA_AVXVNNI: return avx2 && __builtin_cpu_supports("avxvnni");
    case RL_ISA_AVX512VNNI:
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vnni");
    default: return 0;
    }
}
#endif

int rl_cpu_best_isa(void) {
#if defined(__x86_64__)
    if (x86_supports(RL_ISA_AVX512VNNI)) return RL_ISA_AVX512VNNI;
    if (x86_supports(RL_ISA_AVXVNNI)) return RL_ISA_AVXVNNI;
    if (x86_supports(RL_ISA_AVX2)) return RL_ISA_AVX2;
#elif defined(__aarch64__)
    return rl_neon_has_dotprod() ? RL_ISA_DOTPROD : RL_ISA_NEON;
#endif
    return RL_ISA_REF;
}

static const rl_kernels *kernels_for(int isa) {
#if defined(__x86_64__)
    if (isa == RL_ISA_AVX512VNNI && x86_supports(isa)) return &KERNELS_AVX512VNNI;
    if (isa == RL_ISA_AVXVNNI && x86_supports(isa)) return &KERNELS_AVXVNNI;
    if (isa == RL_ISA_AVX2 && x86_supports(isa)) return &KERNELS_AVX2;
#elif defined(__aarch64__)
    if (isa == RL_ISA_DOTPROD && rl_cpu_best_isa() >= RL_ISA_DOTPROD) return &KERNELS_DOTPROD;
    if (isa == RL_ISA_NEON || isa == RL_ISA_DOTPROD) return &KERNELS_NEON;
#endif
    (void)isa;
    return &KERNELS_REF;
}

/* ---- the model ----------------------------------------------------------------------------------- */

typedef struct {
    const float *attn_norm, *ffn_norm, *q_norm, *k_norm;
    /* the [q | k | v] projection: one fused matrix when Q, K and V share a format, else three parts */
    rl_matrix qkv[3];
    int n_qkv;
    rl_matrix wo, gate, up, down;
    /* Gemma 3: norms of the attention and FFN outputs (or NULL); window > 0: a sliding-window layer (keys
     * p - window + 1 .. p, rotated with inv_freq_swa) */
    const float *post_attn_norm, *post_ffn_norm;
    int window;
} rl_layer;

typedef struct {
    int8_t *q;
    float *d, *s, *f; /* f: float scratch (a normed row, a head's scores) */
    int32_t *h;
    size_t cap_q, cap_f;
} rl_scratch;

typedef struct rl_model {
    int n_layers, hidden, n_heads, n_kv, head_dim, ffn, rope_dim, neox;
    float eps, scale;
    float *inv_freq;
    float *inv_freq_swa; /* sliding-window layers' rotation, or NULL */
    float rope_mscale;   /* cos and sin of the rotated dims times this (phi3 LongRoPE's attn_factor) */
    int gelu;            /* GeGLU (tanh GELU) instead of SwiGLU */
    rl_layer *layers;
    const float *out_norm;
    rl_matrix head;
    uint16_t *k_pool, *v_pool;
    int64_t layer_stride;
    int block_size, kv_f16;
    const rl_kernels *kern;
    /* per-step buffers (grown as needed) */
    int cap_rows;
    float *qkv, *tmp, *ffn_h, *part;
    int *task0;
    float *rope; /* [rows][rope_dim / 2][cos, sin] of this step's positions */
    size_t cap_part; /* part: attention partials, see attend() */
    rl_scratch *scratch; /* one per thread */
    int n_scratch;
} rl_model;

static int pad_rows(int n) { return (n + RL_ROWS - 1) / RL_ROWS * RL_ROWS; }

rl_model *rl_model_new(int n_layers, int hidden, int n_heads, int n_kv, int head_dim, int ffn, int rope_dim,
                       int neox, float eps, float scale, const float *inv_freq) {
    rl_model *m = calloc(1, sizeof(rl_model));
    if (!m) return NULL;
    m->n_layers = n_layers, m->hidden = hidden, m->n_heads = n_heads, m->n_kv = n_kv;
    m->head_dim = head_dim, m->ffn = ffn, m->rope_dim = rope_dim, m->neox = neox, m->eps = eps;
    m->scale = scale, m->rope_mscale = 1.0f;
    m->inv_freq = malloc(sizeof(float) * (size_t)(rope_dim / 2 + 1));
    m->layers = calloc((size_t)n_layers, sizeof(rl_layer));
    if (!m->inv_freq || !m->layers) return NULL;
    memcpy(m->inv_freq, inv_freq, sizeof(float) * (size_t)(rope_dim / 2));
    m->kern = kernels_for(rl_cpu_best_isa());
    return m;
}

/* Gemma 3's extras: GeGLU and the sliding-window layers' RoPE frequencies (NULL: none) for the model */
int rl_model_set_extras(rl_model *m, int gelu, const float *inv_freq_swa) {
    m->gelu = gelu;
    if (inv_freq_swa) {
        m->inv_freq_swa = malloc(sizeof(float) * (size_t)(m->rope_dim / 2 + 1));
        if (!m->inv_freq_swa) return -1;
        memcpy(m->inv_freq_swa, inv_freq_swa, sizeof(float) * (size_t)(m->rope_dim / 2));
    }
    return 0;
}

/* ... and per layer: post-attention / post-FFN norms (or NULL) and the sliding window (0: full) */
void rl_model_set_layer_extras(rl_model *m, int i, const float *post_attn_norm, const float *post_ffn_norm,
                               int window) {
    rl_layer *L = &m->layers[i];
    L->post_attn_norm = post_attn_norm, L->post_ffn_norm = post_ffn_norm, L->window = window;
}

/* the factor llama.cpp's rope applies to cos and sin (attn_factor; 1 unless set) */
void rl_model_set_rope_mscale(rl_model *m, float mscale) { m->rope_mscale = mscale; }

int rl_model_set_isa(rl_model *m, int isa) {
    m->kern = kernels_for(isa);
    return m->kern->isa;
}

static void set_matrix(rl_matrix *dst, int fmt, int n, int k, const uint8_t *data, const float *bias) {
    dst->fmt = fmt, dst->n = n, dst->k = k, dst->data = data, dst->bias = bias;
}

/* q: the fused [q | k | v] matrix when k and v are NULL, else Q alone beside K and V (formats may differ);
 * qkv_bias: [q | k | v] or NULL */
void rl_model_set_layer(rl_model *m, int i, const float *attn_norm, const float *ffn_norm, const float *q_norm,
                        const float *k_norm, int q_fmt, const uint8_t *q, int k_fmt, const uint8_t *k, int v_fmt,
                        const uint8_t *v, const float *qkv_bias, int wo_fmt, const uint8_t *wo, int gate_fmt,
                        const uint8_t *gate, int up_fmt, const uint8_t *up, int down_fmt, const uint8_t *down) {
    rl_layer *L = &m->layers[i];
    int qs = m->n_heads * m->head_dim, kvs = m->n_kv * m->head_dim;
    L->attn_norm = attn_norm, L->ffn_norm = ffn_norm, L->q_norm = q_norm, L->k_norm = k_norm;
    if (!k || !v) {
        L->n_qkv = 1;
        set_matrix(&L->qkv[0], q_fmt, qs + 2 * kvs, m->hidden, q, qkv_bias);
    } else {
        L->n_qkv = 3;
        set_matrix(&L->qkv[0], q_fmt, qs, m->hidden, q, qkv_bias);
        set_matrix(&L->qkv[1], k_fmt, kvs, m->hidden, k, qkv_bias ? qkv_bias + qs : NULL);
        set_matrix(&L->qkv[2], v_fmt, kvs, m->hidden, v, qkv_bias ? qkv_bias + qs + kvs : NULL);
    }
    set_matrix(&L->wo, wo_fmt, m->hidden, qs, wo, NULL);
    set_matrix(&L->gate, gate_fmt, m->ffn, m->hidden, gate, NULL);
    set_matrix(&L->up, up_fmt, m->ffn, m->hidden, up, NULL);
    set_matrix(&L->down, down_fmt, m->hidden, m->ffn, down, NULL);
}

void rl_model_set_head(rl_model *m, const float *out_norm, int fmt, int vocab, const uint8_t *data) {
    m->out_norm = out_norm;
    set_matrix(&m->head, fmt, vocab, m->hidden, data, NULL);
}

void rl_model_set_kv(rl_model *m, uint16_t *k_pool, uint16_t *v_pool, int64_t layer_stride, int block_size,
                     int kv_f16) {
    m->k_pool = k_pool, m->v_pool = v_pool, m->layer_stride = layer_stride, m->block_size = block_size;
    m->kv_f16 = kv_f16;
}

static void free_buffers(rl_model *m) {
    free(m->qkv), free(m->tmp), free(m->ffn_h), free(m->part), free(m->task0), free(m->rope);
    m->rope = NULL;
    m->qkv = m->tmp = m->ffn_h = m->part = NULL;
    m->task0 = NULL, m->cap_part = 0;
    for (int t = 0; t < m->n_scratch; t++)
        free(m->scratch[t].q), free(m->scratch[t].d), free(m->scratch[t].h), free(m->scratch[t].f);
    free(m->scratch);
    m->scratch = NULL, m->n_scratch = 0, m->cap_rows = 0;
}

void rl_model_free(rl_model *m) {
    if (!m) return;
    free_buffers(m);
    free(m->inv_freq), free(m->inv_freq_swa), free(m->layers), free(m);
}

static int widest(rl_model *m) {
    int w = m->hidden;
    if (m->ffn > w) w = m->ffn;
    if (m->n_heads * m->head_dim > w) w = m->n_heads * m->head_dim;
    return w;
}

/* buffers for `rows` rows, `nth` threads and histories up to `max_len` keys */
static int reserve(rl_model *m, int rows, int nth, int max_len) {
    if (rows > m->cap_rows || nth > m->n_scratch) {
        free_buffers(m);
        int qkv_n = pad_rows(m->n_heads * m->head_dim + 2 * m->n_kv * m->head_dim);
        size_t r = (size_t)rows;
        m->qkv = malloc(sizeof(float) * r * (size_t)qkv_n);
        m->tmp = malloc(sizeof(float) * r * (size_t)pad_rows(m->hidden > m->ffn ? m->hidden : m->ffn) * 2);
        m->ffn_h = malloc(sizeof(float) * r * (size_t)pad_rows(m->ffn));
        m->task0 = malloc(sizeof(int) * 3 * (r + 1)); /* task0, then the step's grp and gtask0 */
        m->rope = malloc(sizeof(float) * r * (size_t)(m->rope_dim / 2 + 1) * 4); /* full, then window */
        m->scratch = calloc((size_t)nth, sizeof(rl_scratch));
        if (!m->qkv || !m->tmp || !m->ffn_h || !m->task0 || !m->rope || !m->scratch) return -1;
        m->n_scratch = nth, m->cap_rows = rows;
        for (int t = 0; t < nth; t++) {
            rl_scratch *s = &m->scratch[t];
            s->cap_q = r * (size_t)widest(m);
            s->q = malloc(s->cap_q);
            s->d = malloc(sizeof(float) * 2 * (s->cap_q / RL_QK + 1));
            s->h = malloc(sizeof(int32_t) * 2 * (s->cap_q / RL_QK + 1));
            if (!s->q || !s->d || !s->h) return -1;
            s->s = s->d + s->cap_q / RL_QK + 1;
        }
    }
    size_t need_part = (size_t)rows * (size_t)m->n_heads * (size_t)(m->head_dim + 2) *
                       (size_t)((max_len + ATTN_CHUNK - 1) / ATTN_CHUNK);
    if (need_part > m->cap_part) {
        free(m->part);
        m->part = malloc(sizeof(float) * need_part);
        if (!m->part) return -1;
        m->cap_part = need_part;
    }
    int g = m->n_kv ? m->n_heads / m->n_kv : 1;
    size_t need_f = (size_t)(g + 2) * (size_t)max_len + (size_t)m->head_dim + (size_t)(rows + 1) * (size_t)widest(m) + 64;
    size_t need_grouped = (size_t)(RL_ATTN_ROWS_HEADS + 2) * ATTN_CHUNK + (size_t)m->head_dim + 64; /* attn_rows */
    if (need_f < need_grouped) need_f = need_grouped;
    for (int t = 0; t < nth; t++) {
        rl_scratch *s = &m->scratch[t];
        if (s->cap_f < need_f) {
            free(s->f);
            s->f = malloc(sizeof(float) * need_f);
            if (!s->f) return -1;
            s->cap_f = need_f;
        }
    }
    return 0;
}

/* ---- thread pool --------------------------------------------------------------------------------- */

typedef void (*rl_job)(void *ctx, int tid, int nth);

typedef struct {
    int nth;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic int job_gen, quit, bar_count, bar_gen;
    rl_job job;
    void *ctx;
} rl_pool;

static rl_pool *POOL = NULL;
static pthread_mutex_t POOL_MU = PTHREAD_MUTEX_INITIALIZER;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* spin briefly, then yield: a busy machine (or a UI thread beside us) must not be starved by spinners */
static inline void backoff(int *spins) {
    if (++*spins < 2000) {
        cpu_relax();
    } else {
        sched_yield();
    }
}

static void barrier(rl_pool *p) {
    if (p->nth == 1) return;
    int gen = atomic_load_explicit(&p->bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->bar_count, 1, memory_order_acq_rel) == p->nth - 1) {
        atomic_store_explicit(&p->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&p->bar_gen, 1, memory_order_release);
    } else {
        int spins = 0;
        while (atomic_load_explicit(&p->bar_gen, memory_order_acquire) == gen) backoff(&spins);
    }
}

static double PARK_AFTER_S = 0.0005; /* an idle worker spins this long for the next step, then sleeps */

static void *worker_main(void *arg) {
    rl_pool *p = POOL;
    int tid = (int)(intptr_t)arg;
    int seen = 0;
    for (;;) {
        double t0 = now_s();
        int spins = 0;
        while (atomic_load_explicit(&p->job_gen, memory_order_acquire) == seen &&
               !atomic_load_explicit(&p->quit, memory_order_acquire)) {
            if ((spins & 255) == 255 && now_s() - t0 > PARK_AFTER_S) {
                pthread_mutex_lock(&p->mu);
                while (atomic_load(&p->job_gen) == seen && !atomic_load(&p->quit)) pthread_cond_wait(&p->cv, &p->mu);
                pthread_mutex_unlock(&p->mu);
                break;
            }
            backoff(&spins);
        }
        if (atomic_load(&p->quit)) return NULL;
        seen = atomic_load_explicit(&p->job_gen, memory_order_acquire);
        p->job(p->ctx, tid, p->nth);
    }
}

static void pool_stop(void) {
    if (!POOL) return;
    pthread_mutex_lock(&POOL->mu);
    atomic_store(&POOL->quit, 1);
    pthread_cond_broadcast(&POOL->cv);
    pthread_mutex_unlock(&POOL->mu);
    for (int i = 1; i < POOL->nth; i++) pthread_join(POOL->threads[i], NULL);
    free(POOL->threads);
    pthread_mutex_destroy(&POOL->mu);
    pthread_cond_destroy(&POOL->cv);
    free(POOL);
    POOL = NULL;
}

/* A forked child has none of the pool's threads: it starts a pool of its own (the parent's is leaked). */
static void pool_forget_in_child(void) {
    POOL = NULL;
    pthread_mutex_init(&POOL_MU, NULL);
}

static rl_pool *pool_get(int nth) {
    static int atfork_set = 0;
    if (!atfork_set) atfork_set = pthread_atfork(NULL, NULL, pool_forget_in_child) == 0;
    if (POOL && POOL->nth == nth) return POOL;
    const char *spin = getenv("RIPELM_NATIVE_SPIN_US");
    if (spin) PARK_AFTER_S = atof(spin) * 1e-6;
    pool_stop();
    rl_pool *p = calloc(1, sizeof(rl_pool));
    if (!p) return NULL;
    p->nth = nth;
    p->threads = calloc((size_t)nth, sizeof(pthread_t));
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    POOL = p;
    for (int i = 1; i < nth; i++) {
        if (pthread_create(&p->threads[i], NULL, worker_main, (void *)(intptr_t)i) != 0) {
            p->nth = i; /* run with the threads we got */
            break;
        }
    }
    return p;
}

/* every thread runs job(ctx, tid, nth); the job ends with a barrier, so all are done on return */
static void pool_run(rl_pool *p, rl_job job, void *ctx) {
    p->job = job, p->ctx = ctx;
    atomic_fetch_add_explicit(&p->job_gen, 1, memory_order_release);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    job(ctx, 0, p->nth);
}

/* ---- the step ------------------------------------------------------------------------------------ */

typedef struct {
    rl_model *m;
    rl_pool *pool;
    int rows;
    float *x; /* [rows, hidden] residual stream, in/out */
    const int32_t *pos, *tables;
    const int32_t *wtables; /* the sliding-window layers' own block tables (their blocks out of the window
                             * freed: never read), or the same as `tables` */
    int max_blocks;
    const int32_t *logit_rows;
    int n_logits;
    float *logits; /* [n_logits, pad_rows(vocab)] */
    float *h_out;  /* [n_logits, hidden] or NULL */
    int *task0;    /* [rows + 1]: first attention partial of each row (prefix sums of n_kv * splits) */
    int n_groups;  /* rows of one sequence at consecutive positions attend together (attend()) */
    int *grp;      /* [n_groups + 1]: first row of each group */
    int *gtask0;   /* [n_groups + 1]: first attention task of each group */
} rl_step_ctx;

static void split(int n, int tid, int nth, int *a, int *b) {
    *a = (int)((int64_t)n * tid / nth);
    *b = (int)((int64_t)n * (tid + 1) / nth);
}

static void rms_norm_row(const float *x, const float *w, int n, float eps, float *out) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* norm (if w) and quantize `rows` rows of x [rows, k] into this thread's scratch */
static rl_qact quantize_rows(rl_model *m, rl_scratch *s, const float *x, int ldx, int rows, int k, const float *w) {
    rl_qact a = {s->q, s->d, s->s, s->h};
    float *tmp = s->f + (s->cap_f - (size_t)widest(m) - 32);
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        if (w) {
            rms_norm_row(xr, w, k, m->eps, tmp);
            xr = tmp;
        }
        m->kern->quantize(xr, k, a.q + (size_t)r * k, a.d + (size_t)r * (k / RL_QK), a.s + (size_t)r * (k / RL_QK),
                          a.h + (size_t)r * (k / RL_QK) * 2);
    }
    return a;
}

static void matvec_part(rl_model *m, const rl_matrix *w, const rl_qact *a, int rows, float *out, int ldo, int tid,
                        int nth) {
    int g0, g1;
    split(pad_rows(w->n) / RL_ROWS, tid, nth, &g0, &g1);
    if (g1 > g0) m->kern->matvec[w->fmt](w, a, rows, w->k / RL_QK, out, ldo, g0, g1);
}

/* matrices side by side in one output row (Q, K and V of different formats): their 8-row groups are split
 * over the threads as one range, so the work stays balanced; a part's columns start where the last ended
 * (each part but the last a whole number of groups) */
static void matvec_parts(rl_model *m, const rl_matrix *w, int n_parts, const rl_qact *a, int rows, float *out, int ldo,
                         int tid, int nth) {
    if (n_parts == 1) {
        matvec_part(m, w, a, rows, out, ldo, tid, nth);
        return;
    }
    int total = 0, g0, g1, first = 0, col = 0;
    for (int p = 0; p < n_parts; p++) total += pad_rows(w[p].n) / RL_ROWS;
    split(total, tid, nth, &g0, &g1);
    for (int p = 0; p < n_parts; p++) {
        int groups = pad_rows(w[p].n) / RL_ROWS;
        int a0 = (g0 > first ? g0 : first) - first, a1 = (g1 < first + groups ? g1 : first + groups) - first;
        if (a1 > a0) m->kern->matvec[w[p].fmt](&w[p], a, rows, w[p].k / RL_QK, out + col, ldo, a0, a1);
        first += groups, col += w[p].n;
    }
}

/* cos and sin of each row's position, once per step (every head of every layer uses them) */
static void rope_tables(rl_model *m, int rows, const int32_t *pos) {
    int half = m->rope_dim / 2;
    for (int t = 0; t < (m->inv_freq_swa ? 2 : 1); t++) {
        const float *f = t ? m->inv_freq_swa : m->inv_freq;
        float *out = m->rope + (size_t)t * rows * half * 2;
        for (int r = 0; r < rows; r++) {
            for (int i = 0; i < half; i++) {
                double ang = (double)pos[r] * (double)f[i];
                out[((size_t)r * half + i) * 2] = (float)cos(ang) * m->rope_mscale;
                out[((size_t)r * half + i) * 2 + 1] = (float)sin(ang) * m->rope_mscale;
            }
        }
    }
}

/* swa: the sliding-window layers' table (after the full one; `rows` rows each) */
static void rope_head(const rl_model *m, float *v, int row, int rows, int swa) {
    int half = m->rope_dim / 2;
    const float *cs = m->rope + ((size_t)(swa && m->inv_freq_swa ? rows : 0) + row) * half * 2;
    for (int i = 0; i < half; i++) {
        float c = cs[2 * i], s = cs[2 * i + 1];
        int ia = m->neox ? i : 2 * i, ib = m->neox ? i + half : 2 * i + 1;
        float a = v[ia], b = v[ib];
        v[ia] = a * c - b * s;
        v[ib] = a * s + b * c;
    }
}

static void head_norm(float *v, const float *w, int d, float eps) {
    double ss = 0.0;
    for (int i = 0; i < d; i++) ss += (double)v[i] * v[i];
    float r = 1.0f / sqrtf((float)(ss / d) + eps);
    for (int i = 0; i < d; i++) v[i] = v[i] * r * w[i];
}

static const int32_t *table_of(const rl_step_ctx *c, int layer, int row) {
    return (c->m->layers[layer].window > 0 ? c->wtables : c->tables) + (size_t)row * c->max_blocks;
}

static int64_t slot_of(const rl_step_ctx *c, int layer, int row, int p) {
    int bs = c->m->block_size;
    return (int64_t)table_of(c, layer, row)[p / bs] * bs + p % bs;
}

/* rows' Q/K normed and rotated in place, K/V written to the pool */
static void rope_and_store(rl_step_ctx *c, int layer, int tid, int nth) {
    rl_model *m = c->m;
    const rl_layer *L = &m->layers[layer];
    int d = m->head_dim, qkv_n = pad_rows(m->n_heads * d + 2 * m->n_kv * d), heads = m->n_heads + m->n_kv;
    int t0, t1;
    split(c->rows * heads, tid, nth, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        int r = t / heads, h = t % heads;
        float *row = m->qkv + (size_t)r * qkv_n;
        float *v = row + (size_t)h * d;
        int is_k = h >= m->n_heads;
        const float *nw = is_k ? L->k_norm : L->q_norm;
        if (nw) head_norm(v, nw, d, m->eps);
        rope_head(m, v, r, c->rows, L->window > 0);
        if (is_k) {
            int kvh = h - m->n_heads;
            int64_t off = (int64_t)layer * m->layer_stride + (slot_of(c, layer, r, c->pos[r]) * m->n_kv + kvh) * d;
            const float *vv = row + (size_t)(m->n_heads + m->n_kv + kvh) * d;
            for (int i = 0; i < d; i++) {
                m->k_pool[off + i] = m->kv_f16 ? rl_float_to_half(v[i]) : rl_float_to_bf16(v[i]);
                m->v_pool[off + i] = m->kv_f16 ? rl_float_to_half(vv[i]) : rl_float_to_bf16(vv[i]);
            }
        }
    }
}

/* Each (row, K/V head) attends in ranges of ATTN_CHUNK keys whose partial results are merged after
 * (flash-decoding): every thread gets attention work even for one row over few K/V heads. The ranges
 * depend only on the row's own length, never on the batch or the thread count, so a row's output is
 * the same alone and in any batch. A row's tasks go range by range, its K/V heads innermost: the heads
 * of a key sit side by side in the pool, so one range's rows are read from memory once, by the first
 * head's task, and the others find them in cache. */
static int attn_splits_of(int len) { return (len + ATTN_CHUNK - 1) / ATTN_CHUNK; }

/* attention partials of every (row, K/V head, key range), spread over the threads: one task per (group
 * of rows, key range, K/V head); a group's rows that have that range attend in one kernel call where the
 * instruction set has one (attn_rows), else one after the other */
static void attend(rl_step_ctx *c, int layer, int tid, int nth) {
    rl_model *m = c->m;
    int d = m->head_dim, G = m->n_heads / m->n_kv, qkv_n = pad_rows(m->n_heads * d + 2 * m->n_kv * d);
    int t0, t1, gi = 0, win = m->layers[layer].window;
    void (*part_fn)(const rl_attn_args *, int, int, float *, float *, float *, float *) = m->kern->attn_part;
    int grouped = m->kern->attn_rows != NULL;
    if (d % 8 || d > 256 || G > 16) part_fn = rl_attn_part_ref, grouped = 0;
    split(c->gtask0[c->n_groups], tid, nth, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        while (t >= c->gtask0[gi + 1]) gi++;
        int kvh = (t - c->gtask0[gi]) % m->n_kv, sp = (t - c->gtask0[gi]) / m->n_kv, nr = 0;
        int k0s[RL_GROUP_ROWS], k1s[RL_GROUP_ROWS], rs[RL_GROUP_ROWS];
        const float *qs[RL_GROUP_ROWS];
        float *outs[RL_GROUP_ROWS];
        for (int r = c->grp[gi]; r < c->grp[gi + 1]; r++) {
            int L = c->pos[r] + 1;
            if (sp >= attn_splits_of(L)) continue; /* a shorter row of the group: no such range */
            float *part = m->part + (size_t)(c->task0[r] + sp * m->n_kv + kvh) * G * (d + 2);
            int k0 = sp * ATTN_CHUNK, k1 = k0 + ATTN_CHUNK < L ? k0 + ATTN_CHUNK : L;
            int lo = win > 0 && L > win ? L - win : 0; /* a sliding-window layer's first key */
            if (k1 <= lo) { /* a range wholly before the window: an empty partial (weight 0 in the merge) */
                for (int g = 0; g < G; g++) part[g] = -INFINITY, part[G + g] = 0.0f;
                memset(part + 2 * G, 0, sizeof(float) * (size_t)G * d);
                continue;
            }
            k0s[nr] = k0 > lo ? k0 : lo, k1s[nr] = k1, rs[nr] = r, outs[nr] = part;
            qs[nr++] = m->qkv + (size_t)r * qkv_n + (size_t)kvh * G * d;
        }
        if (!nr) continue;
        rl_attn_args a = {qs[nr - 1], G, d, m->block_size, m->kv_f16,
                          m->k_pool + (int64_t)layer * m->layer_stride + (int64_t)kvh * d,
                          m->v_pool + (int64_t)layer * m->layer_stride + (int64_t)kvh * d,
                          (int64_t)m->n_kv * d, table_of(c, layer, rs[nr - 1]), m->scale,
                          kvh == 0 && m->n_kv > 1};
        if (nr > 1 && grouped && m->kern->attn_rows(&a, nr, qs, k0s, k1s, outs, m->scratch[tid].f)) continue;
        for (int i = 0; i < nr; i++) {
            a.q = qs[i], a.table = table_of(c, layer, rs[i]);
            part_fn(&a, k0s[i], k1s[i], m->scratch[tid].f, outs[i], outs[i] + G, outs[i] + 2 * G);
        }
    }
}

/* Rows attend as groups: a row joins the previous row's group when it is that row's sequence one position
 * on (the same block tables over the previous row's keys), up to RL_GROUP_ROWS rows and
 * RL_ATTN_ROWS_HEADS query heads. Sets c->grp, c->gtask0 and c->n_groups. */
static void group_rows(rl_step_ctx *c) {
    const rl_model *m = c->m;
    int G = m->n_heads / m->n_kv, cap = RL_ATTN_ROWS_HEADS / G, ng = 0;
    cap = cap < 1 ? 1 : cap > RL_GROUP_ROWS ? RL_GROUP_ROWS : cap;
    c->grp[0] = 0;
    for (int r = 1; r < c->rows; r++) {
        size_t nb = (size_t)(c->pos[r - 1] / m->block_size + 1);
        const int32_t *a = c->tables + (size_t)(r - 1) * c->max_blocks, *b = c->tables + (size_t)r * c->max_blocks;
        const int32_t *wa = c->wtables + (size_t)(r - 1) * c->max_blocks, *wb = c->wtables + (size_t)r * c->max_blocks;
        int same = c->pos[r] == c->pos[r - 1] + 1 && r - c->grp[ng] < cap && !memcmp(a, b, nb * sizeof(int32_t)) &&
                   !memcmp(wa, wb, nb * sizeof(int32_t));
        if (!same) c->grp[++ng] = r;
    }
    c->grp[++ng] = c->rows;
    c->n_groups = ng;
    c->gtask0[0] = 0;
    for (int i = 0; i < ng; i++)
        c->gtask0[i + 1] = c->gtask0[i] + m->n_kv * attn_splits_of(c->pos[c->grp[i + 1] - 1] + 1);
}

/* every row's attention output [rows, heads * d] from the partials (each thread does it for itself) */
static void merge_attention(const rl_step_ctx *c, float *out) {
    const rl_model *m = c->m;
    int d = m->head_dim, G = m->n_heads / m->n_kv;
    for (int r = 0; r < c->rows; r++) {
        int S = attn_splits_of(c->pos[r] + 1);
        for (int kvh = 0; kvh < m->n_kv; kvh++) {
            const float *base = m->part + (size_t)(c->task0[r] + kvh) * G * (d + 2);
            const size_t step = (size_t)m->n_kv * G * (d + 2); /* from one key range's partial to the next */
            for (int g = 0; g < G; g++) {
                float mx = -INFINITY, den = 0.0f;
                for (int sp = 0; sp < S; sp++) mx = base[sp * step + g] > mx ? base[sp * step + g] : mx;
                float *o = out + (size_t)r * m->n_heads * d + (size_t)(kvh * G + g) * d;
                for (int i = 0; i < d; i++) o[i] = 0.0f;
                for (int sp = 0; sp < S; sp++) {
                    const float *p = base + sp * step;
                    float w = expf(p[g] - mx);
                    den += w * p[G + g];
                    const float *acc = p + 2 * G + (size_t)g * d;
                    for (int i = 0; i < d; i++) o[i] += w * acc[i];
                }
                float inv = 1.0f / den;
                for (int i = 0; i < d; i++) o[i] *= inv;
            }
        }
    }
}

/* RMSNorm in place of each row of out [rows, ld] (a layer output before the residual add), rows split
 * over the threads; barriers before (the matvec wrote all columns) and after */
static void post_norm(rl_step_ctx *c, float *out, int ld, const float *w, int tid, int nth) {
    int r0, r1;
    barrier(c->pool);
    split(c->rows, tid, nth, &r0, &r1);
    for (int r = r0; r < r1; r++) rms_norm_row(out + (size_t)r * ld, w, c->m->hidden, c->m->eps, out + (size_t)r * ld);
    barrier(c->pool);
}

static void step_job(void *arg, int tid, int nth) {
    rl_step_ctx *c = arg;
    rl_model *m = c->m;
    rl_pool *p = c->pool;
    rl_scratch *s = &m->scratch[tid];
    int B = c->rows, H = m->hidden, qs = m->n_heads * m->head_dim;
    int qkv_n = pad_rows(qs + 2 * m->n_kv * m->head_dim), hp = pad_rows(H), fp = pad_rows(m->ffn);
    for (int l = 0; l < m->n_layers; l++) {
        const rl_layer *L = &m->layers[l];
        rl_qact a = quantize_rows(m, s, c->x, H, B, H, L->attn_norm);
        matvec_parts(m, L->qkv, L->n_qkv, &a, B, m->qkv, qkv_n, tid, nth);
        barrier(p);
        rope_and_store(c, l, tid, nth);
        barrier(p);
        attend(c, l, tid, nth);
        barrier(p);
        float *attn_out = s->f;
        merge_attention(c, attn_out);
        a = quantize_rows(m, s, attn_out, qs, B, qs, NULL);
        matvec_part(m, &L->wo, &a, B, m->tmp, hp, tid, nth);
        if (L->post_attn_norm) post_norm(c, m->tmp, hp, L->post_attn_norm, tid, nth);
        int n0, n1, g0, g1;
        split(hp / RL_ROWS, tid, nth, &g0, &g1);
        n0 = g0 * RL_ROWS, n1 = g1 * RL_ROWS < H ? g1 * RL_ROWS : H;
        for (int r = 0; r < B; r++)
            for (int n = n0; n < n1; n++) c->x[(size_t)r * H + n] += m->tmp[(size_t)r * hp + n];
        barrier(p);
        a = quantize_rows(m, s, c->x, H, B, H, L->ffn_norm);
        matvec_part(m, &L->gate, &a, B, m->tmp, fp, tid, nth);
        matvec_part(m, &L->up, &a, B, m->tmp + (size_t)B * fp, fp, tid, nth);
        split(fp / RL_ROWS, tid, nth, &g0, &g1);
        n0 = g0 * RL_ROWS, n1 = g1 * RL_ROWS < m->ffn ? g1 * RL_ROWS : m->ffn;
        for (int r = 0; r < B && n1 > n0; r++) { /* SwiGLU: silu(gate) * up, exp vectorized */
            const float *gate = m->tmp + (size_t)r * fp, *up = m->tmp + (size_t)(B + r) * fp;
            float *e = s->f;
            if (m->gelu) /* tanh GELU: g * sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3)) */
                for (int n = n0; n < n1; n++)
                    e[n - n0] = -1.5957691216057308f * (gate[n] + 0.044715f * gate[n] * gate[n] * gate[n]);
            else
                for (int n = n0; n < n1; n++) e[n - n0] = -gate[n];
            m->kern->exp(e, n1 - n0);
            for (int n = n0; n < n1; n++) m->ffn_h[(size_t)r * m->ffn + n] = gate[n] / (1.0f + e[n - n0]) * up[n];
        }
        barrier(p);
        a = quantize_rows(m, s, m->ffn_h, m->ffn, B, m->ffn, NULL);
        matvec_part(m, &L->down, &a, B, m->tmp, hp, tid, nth);
        if (L->post_ffn_norm) post_norm(c, m->tmp, hp, L->post_ffn_norm, tid, nth);
        split(hp / RL_ROWS, tid, nth, &g0, &g1);
        n0 = g0 * RL_ROWS, n1 = g1 * RL_ROWS < H ? g1 * RL_ROWS : H;
        for (int r = 0; r < B; r++)
            for (int n = n0; n < n1; n++) c->x[(size_t)r * H + n] += m->tmp[(size_t)r * hp + n];
        barrier(p);
    }
    if (c->n_logits > 0) {
        /* the final norm of the rows that need logits, then the head */
        float *normed = s->f;
        for (int j = 0; j < c->n_logits; j++)
            rms_norm_row(c->x + (size_t)c->logit_rows[j] * H, m->out_norm, H, m->eps, normed + (size_t)j * H);
        if (tid == 0 && c->h_out) memcpy(c->h_out, normed, sizeof(float) * (size_t)c->n_logits * H);
        rl_qact a = {s->q, s->d, s->s, s->h};
        for (int j = 0; j < c->n_logits; j++)
            m->kern->quantize(normed + (size_t)j * H, H, a.q + (size_t)j * H, a.d + (size_t)j * (H / RL_QK),
                              a.s + (size_t)j * (H / RL_QK), a.h + (size_t)j * (H / RL_QK) * 2);
        matvec_part(m, &m->head, &a, c->n_logits, c->logits, pad_rows(m->head.n), tid, nth);
    }
    barrier(p);
}

/* One forward of `rows` rows. x [rows, hidden] holds their embeddings on entry (overwritten). `wtables`:
 * the sliding-window layers' block tables, of the same [rows, max_blocks] shape (NULL: `tables`). Returns 0,
 * or -1 when memory for the step's buffers could not be had. */
int rl_step(rl_model *m, int n_threads, int rows, float *x, const int32_t *pos, const int32_t *tables,
            const int32_t *wtables, int max_blocks, const int32_t *logit_rows, int n_logits, float *logits, float *h_out) {
    if (n_threads < 1) n_threads = 1;
    int max_len = 1;
    for (int r = 0; r < rows; r++) max_len = pos[r] + 1 > max_len ? pos[r] + 1 : max_len;
    pthread_mutex_lock(&POOL_MU);
    rl_pool *p = pool_get(n_threads);
    int rc = -1;
    if (p && reserve(m, rows > n_logits ? rows : n_logits, p->nth, max_len) == 0) {
        rl_step_ctx c = {m,         p,        rows,   x,     pos, tables, wtables ? wtables : tables, max_blocks,
                         logit_rows, n_logits, logits, h_out, m->task0};
        rope_tables(m, rows, pos);
        c.task0[0] = 0;
        for (int r = 0; r < rows; r++) c.task0[r + 1] = c.task0[r] + m->n_kv * attn_splits_of(pos[r] + 1);
        c.grp = m->task0 + (rows + 1), c.gtask0 = m->task0 + 2 * (rows + 1);
        group_rows(&c);
        pool_run(p, step_job, &c);
        rc = 0;
    }
    pthread_mutex_unlock(&POOL_MU);
    return rc;
}

/* ---- helpers of the torch prefill path ---------------------------------------------------------- */

typedef struct {
    int fmt, n, k;
    const uint8_t *data;
    float *out;
} rl_dequant_ctx;

static void dequant_job(void *arg, int tid, int nth) {
    rl_dequant_ctx *c = arg;
    int g0, g1;
    split(pad_rows(c->n) / RL_ROWS, tid, nth, &g0, &g1);
    int r0 = g0 * RL_ROWS, r1 = g1 * RL_ROWS < c->n ? g1 * RL_ROWS : c->n;
    if (r1 > r0) rl_dequant_rows(c->fmt, c->data, c->k, r0, r1 - r0, c->out + (size_t)r0 * c->k);
    barrier(POOL);
}

/* the whole [n, k] float32 weight of a repacked matrix, on the pool's threads */
int rl_dequant(int n_threads, int fmt, const uint8_t *data, int n, int k, float *out) {
    pthread_mutex_lock(&POOL_MU);
    rl_pool *p = pool_get(n_threads < 1 ? 1 : n_threads);
    if (p) {
        rl_dequant_ctx c = {fmt, n, k, data, out};
        pool_run(p, dequant_job, &c);
    }
    pthread_mutex_unlock(&POOL_MU);
    return p ? 0 : -1;
}

typedef struct {
    rl_model *m;
    int rows;
    const float *h;
    float *logits;
} rl_head_ctx;

static void head_job(void *arg, int tid, int nth) {
    rl_head_ctx *c = arg;
    rl_model *m = c->m;
    rl_scratch *s = &m->scratch[tid];
    int H = m->hidden;
    rl_qact a = {s->q, s->d, s->s, s->h};
    for (int j = 0; j < c->rows; j++)
        m->kern->quantize(c->h + (size_t)j * H, H, a.q + (size_t)j * H, a.d + (size_t)j * (H / RL_QK),
                          a.s + (size_t)j * (H / RL_QK), a.h + (size_t)j * (H / RL_QK) * 2);
    matvec_part(m, &m->head, &a, c->rows, c->logits, pad_rows(m->head.n), tid, nth);
    barrier(POOL);
}

/* logits [rows, pad_rows(vocab)] of final-normed hidden rows h [rows, hidden] (prefill's last rows) */
int rl_head(rl_model *m, int n_threads, int rows, const float *h, float *logits) {
    pthread_mutex_lock(&POOL_MU);
    rl_pool *p = pool_get(n_threads < 1 ? 1 : n_threads);
    int rc = -1;
    if (p && reserve(m, rows, p->nth, 1) == 0) {
        rl_head_ctx c = {m, rows, h, logits};
        pool_run(p, head_job, &c);
        rc = 0;
    }
    pthread_mutex_unlock(&POOL_MU);
    return rc;
}

/* ---- single kernels, for tests ------------------------------------------------------------------- */

/* a path this CPU runs and this build has (on ARM64, AVX2 is neither) */
int rl_isa_available(int isa) { return kernels_for(isa)->isa == isa; }

int rl_test_quantize(int isa, const float *x, int k, int8_t *q, float *d, float *s, int32_t *h) {
    const rl_kernels *K = kernels_for(isa);
    K->quantize(x, k, q, d, s, h);
    return K->isa;
}

int rl_test_matvec(int isa, int fmt, const uint8_t *data, int n, int k, const float *x, int rows, float *out) {
    const rl_kernels *K = kernels_for(isa);
    if (fmt <= 0 || fmt >= RL_N_FMT || !K->matvec[fmt]) return -1;
    rl_matrix w = {fmt, n, k, data, NULL};
    int nb = k / RL_QK;
    rl_qact a = {malloc((size_t)rows * k), malloc(sizeof(float) * (size_t)rows * nb),
                 malloc(sizeof(float) * (size_t)rows * nb), malloc(sizeof(int32_t) * (size_t)rows * nb * 2)};
    if (!a.q || !a.d || !a.s || !a.h) return -1;
    for (int r = 0; r < rows; r++)
        K->quantize(x + (size_t)r * k, k, a.q + (size_t)r * k, a.d + (size_t)r * nb, a.s + (size_t)r * nb,
                    a.h + (size_t)r * nb * 2);
    K->matvec[fmt](&w, &a, rows, nb, out, pad_rows(n), 0, pad_rows(n) / RL_ROWS);
    free(a.q), free(a.d), free(a.s), free(a.h);
    return K->isa;
}

int rl_test_exp(int isa, float *x, int n) {
    const rl_kernels *K = kernels_for(isa);
    K->exp(x, n);
    return K->isa;
}

/* one attention range over a plain (one block per key) f16/bf16 K/V array, for tests */
int rl_test_attn(int isa, const float *q, int G, int d, const uint16_t *k, const uint16_t *v, int n_keys,
                 int kv_f16, float scale, float *m, float *l, float *acc) {
    const rl_kernels *K = kernels_for(isa);
    int32_t *table = malloc(sizeof(int32_t) * (size_t)n_keys);
    float *scratch = malloc(sizeof(float) * ((size_t)G * n_keys + (size_t)d + 2 * (size_t)n_keys + 64));
    if (!table || !scratch) return -1;
    for (int i = 0; i < n_keys; i++) table[i] = i;
    rl_attn_args a = {q, G, d, 1, kv_f16, k, v, d, table, scale};
    K->attn_part(&a, 0, n_keys, scratch, m, l, acc);
    free(table), free(scratch);
    return K->isa;
}

/* R rows' grouped attention (attn_rows) over one plain K/V array against each row alone (attn_part): the
 * number of output floats whose bits differ (0 expected); -1 where the ISA has no grouped kernel for this
 * shape or memory fails. q [R][G][d]; row r attends over keys k0[r]..k1[r]-1 (non-decreasing in r). */
int rl_test_attn_rows(int isa, const float *q, int R, int G, int d, const uint16_t *k, const uint16_t *v,
                      const int *k0, const int *k1, int kv_f16, float scale) {
    const rl_kernels *K = kernels_for(isa);
    if (!K->attn_rows || R < 1 || R > RL_GROUP_ROWS) return -1;
    int n_keys = k1[R - 1], part = G * (d + 2), diff = 0;
    int32_t *table = malloc(sizeof(int32_t) * (size_t)n_keys);
    float *scratch = malloc(sizeof(float) * ((size_t)(R * G + 2) * n_keys + (size_t)d + 64));
    float *grouped = calloc((size_t)R * part, sizeof(float)), *alone = calloc((size_t)R * part, sizeof(float));
    if (!table || !scratch || !grouped || !alone) return -1;
    for (int i = 0; i < n_keys; i++) table[i] = i;
    rl_attn_args a = {q, G, d, 1, kv_f16, k, v, d, table, scale};
    const float *qs[RL_GROUP_ROWS];
    float *outs[RL_GROUP_ROWS];
    for (int r = 0; r < R; r++) qs[r] = q + (size_t)r * G * d, outs[r] = grouped + (size_t)r * part;
    int done = K->attn_rows(&a, R, qs, k0, k1, outs, scratch);
    for (int r = 0; r < R && done; r++) {
        float *o = alone + (size_t)r * part;
        a.q = qs[r];
        K->attn_part(&a, k0[r], k1[r], scratch, o, o + G, o + 2 * G);
    }
    for (size_t i = 0; i < (size_t)R * part && done; i++) diff += memcmp(grouped + i, alone + i, sizeof(float)) != 0;
    free(table), free(scratch), free(grouped), free(alone);
    return done ? diff : -1;
}

static int cmp_desc(const void *a, const void *b) {
    float x = ((const float *)a)[0], y = ((const float *)b)[0];
    return (x < y) - (x > y);
}

/* Recompute the leading candidates of each row of logits exactly (float64 dot products of the head's
 * dequantized rows with the normed hidden row), as runtime/model.py's _refine_top does: every token within
 * `margin` of the row's best, or the best max_cand / 4 where more than max_cand are that close. */
int rl_refine_top(int fmt, const uint8_t *head, int k, int vocab, const float *h, float *logits, int ldo, int rows,
                  float margin, int max_cand, float *work /* k + 2 * vocab floats */) {
    float *w = work, *cand = work + k;
    for (int r = 0; r < rows; r++) {
        float *row = logits + (size_t)r * ldo;
        const float *hr = h + (size_t)r * k;
        float mx = -INFINITY;
        for (int i = 0; i < vocab; i++) mx = row[i] > mx ? row[i] : mx;
        int n = 0;
        for (int i = 0; i < vocab; i++)
            if (row[i] >= mx - margin) cand[2 * n] = row[i], cand[2 * n + 1] = (float)i, n++;
        if (n > max_cand) { /* a flat row: its top max_cand / 4 only */
            qsort(cand, (size_t)n, 2 * sizeof(float), cmp_desc);
            n = max_cand / 4;
        }
        for (int j = 0; j < n; j++) {
            int id = (int)cand[2 * j + 1];
            rl_dequant_rows(fmt, head, k, id, 1, w);
            double acc = 0.0;
            for (int i = 0; i < k; i++) acc += (double)w[i] * (double)hr[i];
            row[id] = (float)acc;
        }
    }
    return 0;
}
