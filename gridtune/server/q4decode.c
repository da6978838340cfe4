/* Decode steps and prompts of a Llama-family model (Qwen, Mistral, Phi-3 and Gemma too: see
 * gt_model) on x86 with AVX2/FMA/F16C.
 *
 * Why C: a 135M model's step is ~120 small matmuls and ~1000 small ops; through torch
 * each op costs more in dispatch than in arithmetic, and torch's int4 kernel reads
 * 4-bit weights at ~3 GB/s on AVX2. Here a whole step is one call, and the weights
 * are read the way llama.cpp reads them: Q4_1 blocks (32 weights: fp16 scale d, fp16
 * min m, 16 bytes of nibbles; exactly the default model's GGUF blocks) against
 * activations quantised per 32 to int8 (d_x, sum), dot products in int8/int16 lanes.
 * The output head is Q8_0 (fp16 scale, 32 int8): exactly the GGUF's embedding blocks.
 *
 * One call takes any number of rows, each with its own slot and position: a decode
 * step of a batch (row r in slot r), or a prompt (its tokens as rows of one slot at
 * positions 0..n-1; every row's K/V is written before any row attends, so causal
 * attention is each row reading its slot up to its own position). Logits are made
 * only for the rows asked for (a prompt needs its last).
 *
 * 1-2 rows are bound by reading the weights: each block is unpacked in registers and
 * used at once. More rows are bound by arithmetic: four output rows' blocks are
 * unpacked once into an L1 buffer and every activation row runs against them.
 *
 * The KV cache, RoPE tables, norms and embedding are the caller's (torch) fp32 tensors.
 * Threads: one OpenMP team for the whole call (the caller's omp_get_max_threads()),
 * matmuls split by output rows, per-row work split by rows, a barrier between stages.
 * Built by cpukernel.py at first use: cc -O3 -mavx2 -mfma -mf16c -fopenmp -shared.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32
#define NT 8 /* output rows per tile in the many-row kernels */

typedef struct { uint16_t d, m; uint8_t qs[16]; } blk_q4_1; /* 20 bytes */
typedef struct { uint16_t d; int8_t qs[32]; } blk_q8_0;     /* 34 bytes */

typedef struct {
    int n_layers, hidden, n_heads, n_kv, head_dim, inter, vocab;
    int cap;          /* positions per slot in the cache */
    float eps;
    const float *embed;                 /* [vocab, hidden] */
    const float *cos, *sin;             /* [max_pos, head_dim], sign folded into sin */
    const float *const *ln1, *const *ln2;
    const void *const *qkv, *const *o, *const *gu, *const *down; /* Q4_1 blocks, or Q8_0 where q8 says */
    float *const *kc, *const *vc;       /* [slots, n_kv, cap, head_dim] each */
    const float *norm;
    const blk_q8_0 *head;               /* [vocab, hidden / 32] */
    const float *const *qkv_b;          /* per layer [NQKV] q/k/v biases (Qwen2), or NULL: none */
    const float *const *qk_norm;        /* per layer [2 * D]: q's then k's per-head norm (Qwen3, Gemma 3), or NULL */
    const float *const *post_attn, *const *post_ffn; /* Gemma: norms of attention's and the MLP's output, or NULL */
    const float *const *cos_l, *const *sin_l;        /* per layer RoPE tables (Gemma 3's local base), or NULL */
    const int32_t *window;              /* per layer: a query sees its last window positions; 0 (or NULL): all */
    int act;                            /* the MLP's gate: 0 SiLU, 1 GELU (tanh) */
    float embed_scale, attn_scale, attn_softcap;     /* 0: 1, 1/sqrt(D), none */
    const int32_t *q8;                  /* per layer: bits 0-3 (qkv, o, gu, down) in Q8_0 blocks; NULL: all Q4_1 */
} gt_model;

static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i unpack_q4(const uint8_t *qs) {
    __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_insertf128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1),
                            _mm256_set1_epi8(0x0F));
}

/* x [n] -> int8 per block of 32: q, scale d, and d * sum(q) (for the Q4_1 min term).
 * Rounding as lrintf (to nearest even), as the scalar form had it. */
static void quantize_row(const float *x, int n, int8_t *q, float *d, float *s) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
               v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4), dd = amax / 127.f, id = dd > 0.f ? 1.f / dd : 0.f;
        const __m256 mul = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        /* int32 -> int16 -> int8 packs work per 128-bit lane: undo the interleave */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * QK), p);
        d[b] = dd;
        s[b] = dd * (float)_mm_cvtsi128_si32(s4);
    }
}

/* y[r][n] = W[n] . x[r] for rows n in [n0, n1), R <= 2 activation rows. */
static void gemv_q4_1(const blk_q4_1 *w, int K, int n0, int n1, int R, const int8_t *xq, const float *xd,
                      const float *xs, float *y, int ystride) {
    const int G = K / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int n = n0; n < n1; n++) {
        const blk_q4_1 *row = w + (size_t)n * G;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        float m0 = 0.f, m1 = 0.f;
        for (int g = 0; g < G; g++) {
            const blk_q4_1 *b = row + g;
            __m256i qw = unpack_q4(b->qs);
            float d = h2f(b->d), m = h2f(b->m);
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, _mm256_loadu_si256((const __m256i *)(xq + g * QK))), ones);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[g]), _mm256_cvtepi32_ps(p), acc0);
            m0 += m * xs[g];
            if (R > 1) {
                __m256i p1 = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(qw, _mm256_loadu_si256((const __m256i *)(xq + K + g * QK))), ones);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[G + g]), _mm256_cvtepi32_ps(p1), acc1);
                m1 += m * xs[G + g];
            }
        }
        y[n] = hsum(acc0) + m0;
        if (R > 1) y[ystride + n] = hsum(acc1) + m1;
    }
}

/* The scale of output j (0..7) of ``sc`` in all eight lanes. */
#define LANE_OF(lo, hi, j) \
    ((j) < 4 ? _mm256_permute_ps(lo, ((j) & 3) * 0x55) : _mm256_permute_ps(hi, ((j) & 3) * 0x55))

/* Eight accumulators -> one vector of their eight sums. */
static inline __m256 sums8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {
    __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

/* The same for any R: NT = 8 output rows at a time (n1 - n0 a multiple of 8), their
 * blocks unpacked once into ``buf`` (NT * K bytes of weights, then NT * G scales and
 * mins, block-major), then every activation row against them: one activation load
 * serves eight outputs, and the eight sums leave in one vector. */
static void gemm_q4_1(const blk_q4_1 *w, int K, int n0, int n1, int R, const int8_t *xq, const float *xd,
                      const float *xs, float *y, int ystride, uint8_t *buf) {
    const int G = K / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    uint8_t *uw = buf;
    float *ud = (float *)(buf + (size_t)NT * K), *um = ud + NT * G;
    for (int n = n0; n < n1; n += NT) {
        for (int j = 0; j < NT; j++) {
            const blk_q4_1 *row = w + (size_t)(n + j) * G;
            for (int g = 0; g < G; g++) {
                _mm256_storeu_si256((__m256i *)(uw + ((size_t)g * NT + j) * QK), unpack_q4(row[g].qs));
                ud[g * NT + j] = h2f(row[g].d);
                um[g * NT + j] = h2f(row[g].m);
            }
        }
        for (int r = 0; r < R; r++) {
            const int8_t *xr = xq + (size_t)r * K;
            const float *dr = xd + (size_t)r * G, *sr = xs + (size_t)r * G;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            __m256 mins = a0;
            for (int g = 0; g < G; g++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + g * QK));
                const uint8_t *wg = uw + (size_t)g * NT * QK;
                const __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(ud + g * NT), _mm256_broadcast_ss(dr + g));
                const __m256 lo = _mm256_permute2f128_ps(sc, sc, 0x00), hi = _mm256_permute2f128_ps(sc, sc, 0x11);
                mins = _mm256_fmadd_ps(_mm256_loadu_ps(um + g * NT), _mm256_broadcast_ss(sr + g), mins);
#define DOT(a, j)                                                                                                \
    a = _mm256_fmadd_ps(LANE_OF(lo, hi, j),                                                                      \
                        _mm256_cvtepi32_ps(_mm256_madd_epi16(                                                    \
                            _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(wg + (j) * QK)), xv), ones)), \
                        a)
                DOT(a0, 0); DOT(a1, 1); DOT(a2, 2); DOT(a3, 3); DOT(a4, 4); DOT(a5, 5); DOT(a6, 6); DOT(a7, 7);
#undef DOT
            }
            _mm256_storeu_ps(y + (size_t)r * ystride + n, _mm256_add_ps(sums8(a0, a1, a2, a3, a4, a5, a6, a7), mins));
        }
    }
}

static void gemv_q8_0(const blk_q8_0 *w, int K, int n0, int n1, int R, const int8_t *xq, const float *xd,
                      float *y, int ystride) {
    const int G = K / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int n = n0; n < n1; n++) {
        const blk_q8_0 *row = w + (size_t)n * G;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int g = 0; g < G; g++) {
            __m256i qw = _mm256_loadu_si256((const __m256i *)row[g].qs);
            __m256i aw = _mm256_sign_epi8(qw, qw);
            float d = h2f(row[g].d);
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + g * QK));
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x0, qw)), ones);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[g]), _mm256_cvtepi32_ps(p), acc0);
            if (R > 1) {
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + K + g * QK));
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x1, qw)), ones);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[G + g]), _mm256_cvtepi32_ps(p1), acc1);
            }
        }
        y[n] = hsum(acc0);
        if (R > 1) y[ystride + n] = hsum(acc1);
    }
}

/* Q8_0 for any R, tiled like gemm_q4_1: |w| and w (for the sign) kept per tile. */
static void gemm_q8_0(const blk_q8_0 *w, int K, int n0, int n1, int R, const int8_t *xq, const float *xd,
                      float *y, int ystride, uint8_t *buf) {
    const int G = K / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    int8_t *sw = (int8_t *)buf, *aw = sw + (size_t)NT * K;
    float *ud = (float *)(buf + (size_t)2 * NT * K);
    for (int n = n0; n < n1; n += NT) {
        for (int j = 0; j < NT; j++) {
            const blk_q8_0 *row = w + (size_t)(n + j) * G;
            for (int g = 0; g < G; g++) {
                __m256i qw = _mm256_loadu_si256((const __m256i *)row[g].qs);
                _mm256_storeu_si256((__m256i *)(sw + ((size_t)g * NT + j) * QK), qw);
                _mm256_storeu_si256((__m256i *)(aw + ((size_t)g * NT + j) * QK), _mm256_sign_epi8(qw, qw));
                ud[g * NT + j] = h2f(row[g].d);
            }
        }
        for (int r = 0; r < R; r++) {
            const int8_t *xr = xq + (size_t)r * K;
            const float *dr = xd + (size_t)r * G;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            for (int g = 0; g < G; g++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + g * QK));
                const size_t at = (size_t)g * NT * QK;
                const __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(ud + g * NT), _mm256_broadcast_ss(dr + g));
                const __m256 lo = _mm256_permute2f128_ps(sc, sc, 0x00), hi = _mm256_permute2f128_ps(sc, sc, 0x11);
#define DOT(a, j)                                                                                                \
    a = _mm256_fmadd_ps(                                                                                         \
        LANE_OF(lo, hi, j),                                                                                      \
        _mm256_cvtepi32_ps(_mm256_madd_epi16(                                                                    \
            _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(aw + at + (j) * QK)),                      \
                                 _mm256_sign_epi8(xv, _mm256_loadu_si256((const __m256i *)(sw + at + (j) * QK)))), \
            ones)),                                                                                              \
        a)
                DOT(a0, 0); DOT(a1, 1); DOT(a2, 2); DOT(a3, 3); DOT(a4, 4); DOT(a5, 5); DOT(a6, 6); DOT(a7, 7);
#undef DOT
            }
            _mm256_storeu_ps(y + (size_t)r * ystride + n, sums8(a0, a1, a2, a3, a4, a5, a6, a7));
        }
    }
}

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static inline float dot(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* e^x for x <= 0 (softmax after the max is taken out), Cephes' polynomial: ~1e-7 relative. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* One query head against one slot's K/V for positions 0..n-1 (D a multiple of 8):
 * scores eight positions at a time (their eight sums leave in one vector), a
 * vectorised softmax, then the weighted V summed in registers, 64 lanes at a time. */
static void attend(const float *q, const float *K, const float *V, int n, int D, float scale, float cap,
                   float *sc, float *out) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    float mx = -INFINITY;
    int p = 0;
    for (; p + 8 <= n; p += 8) {
        const float *k = K + (size_t)p * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int i = 0; i < D; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + D + i), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * D + i), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * D + i), a3);
            a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 4 * D + i), a4);
            a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 5 * D + i), a5);
            a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 6 * D + i), a6);
            a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 7 * D + i), a7);
        }
        const __m256 s8 = _mm256_mul_ps(sums8(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_set1_ps(scale));
        _mm256_storeu_ps(sc + p, s8);
        vmax = _mm256_max_ps(vmax, s8);
    }
    for (; p < n; p++) {
        sc[p] = dot(q, K + (size_t)p * D, D) * scale;
        mx = fmaxf(mx, sc[p]);
    }
    float m8[8];
    _mm256_storeu_ps(m8, vmax);
    for (int i = 0; i < 8; i++) mx = fmaxf(mx, m8[i]);
    if (cap > 0.f) { /* Gemma 2's soft-capping: cap * tanh(score / cap) */
        mx = -INFINITY;
        for (p = 0; p < n; p++) { sc[p] = cap * tanhf(sc[p] / cap); mx = fmaxf(mx, sc[p]); }
    }
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    float sum = 0.f;
    for (p = 0; p + 8 <= n; p += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + p), vm));
        _mm256_storeu_ps(sc + p, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    for (; p < n; p++) { sc[p] = expf(sc[p] - mx); sum += sc[p]; }
    sum += hsum(vsum);
    const float inv = 1.f / sum;
    for (int c = 0; c < D; c += 64) {
        if (c + 64 <= D) {
            __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0, o4 = o0, o5 = o0, o6 = o0, o7 = o0;
            for (p = 0; p < n; p++) {
                const __m256 w = _mm256_broadcast_ss(sc + p);
                const float *v = V + (size_t)p * D + c;
                o0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), o0);
                o1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), o1);
                o2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), o2);
                o3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), o3);
                o4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 32), o4);
                o5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 40), o5);
                o6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 48), o6);
                o7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 56), o7);
            }
            const __m256 iv = _mm256_set1_ps(inv);
            _mm256_storeu_ps(out + c, _mm256_mul_ps(o0, iv));
            _mm256_storeu_ps(out + c + 8, _mm256_mul_ps(o1, iv));
            _mm256_storeu_ps(out + c + 16, _mm256_mul_ps(o2, iv));
            _mm256_storeu_ps(out + c + 24, _mm256_mul_ps(o3, iv));
            _mm256_storeu_ps(out + c + 32, _mm256_mul_ps(o4, iv));
            _mm256_storeu_ps(out + c + 40, _mm256_mul_ps(o5, iv));
            _mm256_storeu_ps(out + c + 48, _mm256_mul_ps(o6, iv));
            _mm256_storeu_ps(out + c + 56, _mm256_mul_ps(o7, iv));
        } else {
            for (int i = c; i < D; i++) out[i] = 0.f;
            for (p = 0; p < n; p++) {
                const float w = sc[p];
                const float *v = V + (size_t)p * D;
                for (int i = c; i < D; i++) out[i] += w * v[i];
            }
            for (int i = c; i < D; i++) out[i] *= inv;
        }
    }
}

/* The caller's thread count, spread over n rows in blocks of 8 (whole cache lines of y). */
static void split(int n, int *n0, int *n1) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int blocks = (n + 7) / 8, per = (blocks + nt - 1) / nt;
    *n0 = t * per * 8 < n ? t * per * 8 : n;
    *n1 = (t + 1) * per * 8 < n ? (t + 1) * per * 8 : n;
}

static void matmul(const void *w, int q8, int K, int N, int R, const int8_t *xq, const float *xd,
                   const float *xs, float *y, uint8_t *buf) {
    int n0, n1;
    split(N, &n0, &n1);
    if (q8) {
        if (R <= 2)
            gemv_q8_0(w, K, n0, n1, R, xq, xd, y, N);
        else
            gemm_q8_0(w, K, n0, n1, R, xq, xd, y, N, buf);
    } else if (R <= 2)
        gemv_q4_1(w, K, n0, n1, R, xq, xd, xs, y, N);
    else
        gemm_q4_1(w, K, n0, n1, R, xq, xd, xs, y, N, buf);
}

/* R rows: tokens[r] at positions[r] in slots[r]. Logits [nh, vocab] for rows heads[0..nh). */
int gt_forward(const gt_model *M, int R, const int64_t *tokens, const int64_t *positions, const int64_t *slots,
               int length, int nh, const int64_t *heads, float *logits) {
    const int H = M->n_heads, KV = M->n_kv, D = M->head_dim, E = M->hidden, I = M->inter;
    const int NQKV = (H + 2 * KV) * D, G = H / KV, maxk = (2 * I > E ? 2 * I : E);
    if (R < 1 || nh < 0 || nh > R || E % QK || I % QK || (H * D) % QK || NQKV % 8 || M->vocab % 8 || D % 8 || D > 512)
        return -1;
    for (int r = 0; r < R; r++)
        if (positions[r] < 0 || positions[r] >= M->cap || positions[r] >= length || slots[r] < 0) return -1;
    const int threads = omp_get_max_threads();
    /* per thread: NT * maxk unpacked weights (2x for Q8_0's sign), 2 * NT * G floats */
    const size_t per_thread = ((size_t)2 * NT * maxk + (size_t)3 * NT * (maxk / QK) * sizeof(float) + 63) / 64 * 64;
    float *x = calloc((size_t)R * E, sizeof(float)), *h = malloc(sizeof(float) * R * maxk);
    float *qkv = malloc(sizeof(float) * R * NQKV), *att = malloc(sizeof(float) * R * H * D);
    float *gu = malloc(sizeof(float) * R * 2 * I), *tmp = malloc(sizeof(float) * R * E);
    int8_t *xq = malloc((size_t)R * maxk);
    float *xd = malloc(sizeof(float) * R * maxk / QK), *xs = malloc(sizeof(float) * R * maxk / QK);
    float *scores = malloc(sizeof(float) * (size_t)R * H * length);
    float *hx = malloc(sizeof(float) * (size_t)(nh ? nh : 1) * E);
    uint8_t *bufs = aligned_alloc(64, per_thread * threads);
    if (!x || !h || !qkv || !att || !gu || !tmp || !xq || !xd || !xs || !scores || !hx || !bufs) {
        free(x); free(h); free(qkv); free(att); free(gu); free(tmp); free(xq); free(xd); free(xs); free(scores);
        free(hx); free(bufs);
        return -2;
    }
    const float es = M->embed_scale > 0.f ? M->embed_scale : 1.f;
    for (int r = 0; r < R; r++)
        for (int i = 0; i < E; i++) x[(size_t)r * E + i] = M->embed[(size_t)tokens[r] * E + i] * es;
    const float scale = M->attn_scale > 0.f ? M->attn_scale : 1.f / sqrtf((float)D);

#define Q8(bit) (M->q8 && (M->q8[l] >> (bit) & 1))
#pragma omp parallel
    {
        uint8_t *buf = bufs + per_thread * omp_get_thread_num();
        for (int l = 0; l < M->n_layers; l++) {
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++) {
                rmsnorm(x + (size_t)r * E, M->ln1[l], E, M->eps, h + (size_t)r * E);
                quantize_row(h + (size_t)r * E, E, xq + (size_t)r * E, xd + r * (E / QK), xs + r * (E / QK));
            }
            matmul(M->qkv[l], Q8(0), E, NQKV, R, xq, xd, xs, qkv, buf);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++) {  /* RoPE on q and k, then k and v into the row's slot */
                const float *c = (M->cos_l ? M->cos_l[l] : M->cos) + positions[r] * D;
                const float *s = (M->sin_l ? M->sin_l[l] : M->sin) + positions[r] * D;
                float *v = qkv + (size_t)r * NQKV;
                if (M->qkv_b) for (int i = 0; i < NQKV; i++) v[i] += M->qkv_b[l][i];
                for (int hh = 0; hh < H + KV; hh++) {
                    float *u = v + hh * D, rot[512];
                    if (M->qk_norm) rmsnorm(u, M->qk_norm[l] + (hh < H ? 0 : D), D, M->eps, u);
                    for (int i = 0; i < D; i++) rot[i] = u[i] * c[i] + u[(i + D / 2) % D] * s[i];
                    memcpy(u, rot, sizeof(float) * D);
                }
                for (int kh = 0; kh < KV; kh++) {
                    size_t at = (((size_t)slots[r] * KV + kh) * M->cap + positions[r]) * D;
                    memcpy(M->kc[l] + at, v + (H + kh) * D, sizeof(float) * D);
                    memcpy(M->vc[l] + at, v + (H + KV + kh) * D, sizeof(float) * D);
                }
            }
#pragma omp for schedule(dynamic, 4)
            for (int job = 0; job < R * H; job++) {  /* attention: one query head of one row */
                int r = job / H, hh = job % H, kh = hh / G, n = (int)positions[r] + 1;
                const int w = M->window ? M->window[l] : 0, first = (w > 0 && n > w) ? n - w : 0;
                const float *K = M->kc[l] + (((size_t)slots[r] * KV + kh) * M->cap + first) * D;
                const float *V = M->vc[l] + (((size_t)slots[r] * KV + kh) * M->cap + first) * D;
                attend(qkv + (size_t)r * NQKV + hh * D, K, V, n - first, D, scale, M->attn_softcap,
                       scores + (size_t)job * length, att + (size_t)r * H * D + hh * D);
            }
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++)
                quantize_row(att + (size_t)r * H * D, H * D, xq + (size_t)r * H * D, xd + r * (H * D / QK),
                             xs + r * (H * D / QK));
            matmul(M->o[l], Q8(1), H * D, E, R, xq, xd, xs, tmp, buf);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++) {
                if (M->post_attn) rmsnorm(tmp + (size_t)r * E, M->post_attn[l], E, M->eps, tmp + (size_t)r * E);
                for (int i = 0; i < E; i++) x[(size_t)r * E + i] += tmp[(size_t)r * E + i];
                rmsnorm(x + (size_t)r * E, M->ln2[l], E, M->eps, h + (size_t)r * E);
                quantize_row(h + (size_t)r * E, E, xq + (size_t)r * E, xd + r * (E / QK), xs + r * (E / QK));
            }
            matmul(M->gu[l], Q8(2), E, 2 * I, R, xq, xd, xs, gu, buf);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++) {
                float *g = gu + (size_t)r * 2 * I, *hr = h + (size_t)r * I;
                if (M->act == 1)
                    for (int i = 0; i < I; i++)
                        hr[i] = 0.5f * g[i] * (1.f + tanhf(0.7978845608f * (g[i] + 0.044715f * g[i] * g[i] * g[i])))
                                * g[I + i];
                else
                    for (int i = 0; i < I; i++) hr[i] = g[i] / (1.f + expf(-g[i])) * g[I + i];
                quantize_row(hr, I, xq + (size_t)r * I, xd + r * (I / QK), xs + r * (I / QK));
            }
            matmul(M->down[l], Q8(3), I, E, R, xq, xd, xs, tmp, buf);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++) {
                if (M->post_ffn) rmsnorm(tmp + (size_t)r * E, M->post_ffn[l], E, M->eps, tmp + (size_t)r * E);
                for (int i = 0; i < E; i++) x[(size_t)r * E + i] += tmp[(size_t)r * E + i];
            }
        }
        if (nh > 0) {
#pragma omp for schedule(static)
            for (int j = 0; j < nh; j++) {
                rmsnorm(x + (size_t)heads[j] * E, M->norm, E, M->eps, hx + (size_t)j * E);
                quantize_row(hx + (size_t)j * E, E, xq + (size_t)j * E, xd + j * (E / QK), xs + j * (E / QK));
            }
            int n0, n1;
            split(M->vocab, &n0, &n1);
            if (nh <= 2)
                gemv_q8_0(M->head, E, n0, n1, nh, xq, xd, logits, M->vocab);
            else
                gemm_q8_0(M->head, E, n0, n1, nh, xq, xd, logits, M->vocab, buf);
        }
    }
    free(x); free(h); free(qkv); free(att); free(gu); free(tmp); free(xq); free(xd); free(xs); free(scores);
    free(hx); free(bufs);
    return 0;
}
