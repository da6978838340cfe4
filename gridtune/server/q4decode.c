/* One decode step of a Llama-family model for 1-2 rows, on x86 with AVX2/FMA/F16C.
 *
 * Why C: a 135M model's step is ~120 small matmuls and ~1000 small ops; through torch
 * each op costs more in dispatch than in arithmetic, and torch's int4 kernel reads
 * 4-bit weights at ~3 GB/s on AVX2. Here the whole step is one call, and the weights
 * are read the way llama.cpp reads them: Q4_1 blocks (32 weights: fp16 scale d, fp16
 * min m, 16 bytes of nibbles; exactly the default model's GGUF blocks) against
 * activations quantised per 32 to int8 (d_x, sum), dot products in int8/int16 lanes.
 * The output head is Q8_0 (fp16 scale, 32 int8): exactly the GGUF's embedding blocks.
 *
 * The KV cache, RoPE tables, norms and embedding are the caller's (torch) fp32 tensors.
 * Threads: one OpenMP team for the whole step (the caller's omp_get_max_threads()),
 * work split by output rows, a barrier between dependent stages.
 * Built by fastlm.py at first use: cc -O3 -mavx2 -mfma -mf16c -fopenmp -shared.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32

typedef struct { uint16_t d, m; uint8_t qs[16]; } blk_q4_1; /* 20 bytes */
typedef struct { uint16_t d; int8_t qs[32]; } blk_q8_0;     /* 34 bytes */

typedef struct {
    int n_layers, hidden, n_heads, n_kv, head_dim, inter, vocab;
    int cap;          /* positions per slot in the cache */
    float eps;
    const float *embed;                 /* [vocab, hidden] */
    const float *cos, *sin;             /* [max_pos, head_dim], sign folded into sin */
    const float *const *ln1, *const *ln2;
    const blk_q4_1 *const *qkv, *const *o, *const *gu, *const *down;
    float *const *kc, *const *vc;       /* [slots, n_kv, cap, head_dim] each */
    const float *norm;
    const blk_q8_0 *head;               /* [vocab, hidden / 32] */
} gt_model;

static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [n] -> int8 per block of 32: q, scale d, and d * sum(q) (for the Q4_1 min term). */
static void quantize_row(const float *x, int n, int8_t *q, float *d, float *s) {
    for (int b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float dd = amax / 127.f, id = dd > 0.f ? 1.f / dd : 0.f;
        int sum = 0;
        for (int i = 0; i < QK; i++) {
            int v = (int)lrintf(xb[i] * id);
            q[b * QK + i] = (int8_t)v;
            sum += v;
        }
        d[b] = dd;
        s[b] = dd * (float)sum;
    }
}

/* y[r][n] = W[n] . x[r] for rows n in [n0, n1), R <= 2 activation rows. */
static void gemv_q4_1(const blk_q4_1 *w, int K, int n0, int n1, int R, const int8_t *xq, const float *xd,
                      const float *xs, float *y, int ystride) {
    const int G = K / QK;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int n = n0; n < n1; n++) {
        const blk_q4_1 *row = w + (size_t)n * G;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        float m0 = 0.f, m1 = 0.f;
        for (int g = 0; g < G; g++) {
            const blk_q4_1 *b = row + g;
            __m128i raw = _mm_loadu_si128((const __m128i *)b->qs);
            __m256i qw = _mm256_and_si256(
                _mm256_insertf128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1), low);
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

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* The caller's thread count, spread over n rows in blocks of 8 (whole cache lines of y). */
static void split(int n, int *n0, int *n1) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int blocks = (n + 7) / 8, per = (blocks + nt - 1) / nt;
    *n0 = t * per * 8 < n ? t * per * 8 : n;
    *n1 = (t + 1) * per * 8 < n ? (t + 1) * per * 8 : n;
}

int gt_decode(const gt_model *M, int R, const int64_t *tokens, const int64_t *positions, int length,
              float *logits) {
    const int H = M->n_heads, KV = M->n_kv, D = M->head_dim, E = M->hidden, I = M->inter;
    const int NQKV = (H + 2 * KV) * D, G = H / KV, maxk = (2 * I > E ? 2 * I : E);
    if (R < 1 || R > 2 || E % QK || I % QK || (H * D) % QK) return -1;
    float *x = calloc((size_t)R * E, sizeof(float)), *h = malloc(sizeof(float) * R * maxk);
    float *qkv = malloc(sizeof(float) * R * NQKV), *att = malloc(sizeof(float) * R * H * D);
    float *gu = malloc(sizeof(float) * R * 2 * I), *tmp = malloc(sizeof(float) * R * E);
    int8_t *xq = malloc((size_t)R * maxk);
    float *xd = malloc(sizeof(float) * R * maxk / QK), *xs = malloc(sizeof(float) * R * maxk / QK);
    float *scores = malloc(sizeof(float) * (size_t)R * H * length);
    if (!x || !h || !qkv || !att || !gu || !tmp || !xq || !xd || !xs || !scores) {
        free(x); free(h); free(qkv); free(att); free(gu); free(tmp); free(xq); free(xd); free(xs); free(scores);
        return -2;
    }
    for (int r = 0; r < R; r++) memcpy(x + r * E, M->embed + (size_t)tokens[r] * E, sizeof(float) * E);
    const float scale = 1.f / sqrtf((float)D);

#pragma omp parallel
    {
        int n0, n1;
        for (int l = 0; l < M->n_layers; l++) {
#pragma omp single
            for (int r = 0; r < R; r++) {
                rmsnorm(x + r * E, M->ln1[l], E, M->eps, h + r * E);
                quantize_row(h + r * E, E, xq + r * E, xd + r * (E / QK), xs + r * (E / QK));
            }
            split(NQKV, &n0, &n1);
            gemv_q4_1(M->qkv[l], E, n0, n1, R, xq, xd, xs, qkv, NQKV);
#pragma omp barrier
#pragma omp single
            for (int r = 0; r < R; r++) {  /* RoPE on q and k, then k and v into the row's slot */
                const float *c = M->cos + positions[r] * D, *s = M->sin + positions[r] * D;
                float *v = qkv + r * NQKV;
                for (int hh = 0; hh < H + KV; hh++) {
                    float *u = v + hh * D, rot[512];
                    for (int i = 0; i < D; i++) rot[i] = u[i] * c[i] + u[(i + D / 2) % D] * s[i];
                    memcpy(u, rot, sizeof(float) * D);
                }
                for (int kh = 0; kh < KV; kh++) {
                    size_t at = (((size_t)r * KV + kh) * M->cap + positions[r]) * D;
                    memcpy(M->kc[l] + at, v + (H + kh) * D, sizeof(float) * D);
                    memcpy(M->vc[l] + at, v + (H + KV + kh) * D, sizeof(float) * D);
                }
            }
#pragma omp for schedule(static)
            for (int job = 0; job < R * H; job++) {  /* attention: one query head of one row */
                int r = job / H, hh = job % H, kh = hh / G, n = (int)positions[r] + 1;
                const float *q = qkv + r * NQKV + hh * D;
                const float *K = M->kc[l] + ((size_t)r * KV + kh) * M->cap * D;
                const float *V = M->vc[l] + ((size_t)r * KV + kh) * M->cap * D;
                float *sc = scores + (size_t)job * length, mx = -INFINITY, sum = 0.f;
                for (int p = 0; p < n; p++) {
                    float dot = 0.f;
                    for (int i = 0; i < D; i++) dot += q[i] * K[(size_t)p * D + i];
                    sc[p] = dot * scale;
                    mx = fmaxf(mx, sc[p]);
                }
                for (int p = 0; p < n; p++) { sc[p] = expf(sc[p] - mx); sum += sc[p]; }
                float *out = att + r * H * D + hh * D, inv = 1.f / sum;
                for (int i = 0; i < D; i++) out[i] = 0.f;
                for (int p = 0; p < n; p++) {
                    float w = sc[p] * inv;
                    for (int i = 0; i < D; i++) out[i] += w * V[(size_t)p * D + i];
                }
            }
#pragma omp single
            for (int r = 0; r < R; r++)
                quantize_row(att + r * H * D, H * D, xq + r * H * D, xd + r * (H * D / QK), xs + r * (H * D / QK));
            split(E, &n0, &n1);
            gemv_q4_1(M->o[l], H * D, n0, n1, R, xq, xd, xs, tmp, E);
#pragma omp barrier
#pragma omp single
            for (int r = 0; r < R; r++) {
                for (int i = 0; i < E; i++) x[r * E + i] += tmp[r * E + i];
                rmsnorm(x + r * E, M->ln2[l], E, M->eps, h + r * E);
                quantize_row(h + r * E, E, xq + r * E, xd + r * (E / QK), xs + r * (E / QK));
            }
            split(2 * I, &n0, &n1);
            gemv_q4_1(M->gu[l], E, n0, n1, R, xq, xd, xs, gu, 2 * I);
#pragma omp barrier
#pragma omp single
            for (int r = 0; r < R; r++) {
                float *g = gu + r * 2 * I;
                for (int i = 0; i < I; i++) h[r * I + i] = g[i] / (1.f + expf(-g[i])) * g[I + i];
                quantize_row(h + r * I, I, xq + r * I, xd + r * (I / QK), xs + r * (I / QK));
            }
            split(E, &n0, &n1);
            gemv_q4_1(M->down[l], I, n0, n1, R, xq, xd, xs, tmp, E);
#pragma omp barrier
#pragma omp single
            for (int r = 0; r < R; r++)
                for (int i = 0; i < E; i++) x[r * E + i] += tmp[r * E + i];
        }
#pragma omp single
        for (int r = 0; r < R; r++) {
            rmsnorm(x + r * E, M->norm, E, M->eps, h + r * E);
            quantize_row(h + r * E, E, xq + r * E, xd + r * (E / QK), xs + r * (E / QK));
        }
        split(M->vocab, &n0, &n1);
        gemv_q8_0(M->head, E, n0, n1, R, xq, xd, logits, M->vocab);
    }
    free(x); free(h); free(qkv); free(att); free(gu); free(tmp); free(xq); free(xd); free(xs); free(scores);
    return 0;
}
