/* Fused selective-scan forward kernel (inference) for the ``compiled`` backend (scripts/ssm/compiled.py).
 *
 * Compiled at run time by the system C compiler into a temporary shared library and called through ctypes;
 * plain C99 plus GCC/Clang vector extensions, no PyTorch or Python headers (so it compiles in about a second).
 *
 * Per (batch, group) lane and block of W channels, over all L time steps, with the state in registers:
 *     d_t   = softplus(delta_t + delta_bias)            (or without the softplus)
 *     h_t   = exp(d_t * A) * h_{t-1} + d_t * u_t * B_t  (N states per channel)
 *     y_t   = <C_t, h_t> + D * u_t
 * Layout (time-major, as ChunkedSelectiveScan): delta, u, y (L, lanes, P) contiguous, lane = batch * G + group;
 * A (G, N, P); element (t, lane, n) of B and C at (t * lanes + lane) * bc_stride + n; D, bias (G, P) or NULL;
 * h (lanes, N, P): initial state in, last state out. Work items lo..hi-1 of lanes * ceil(P / W) blocks, so
 * that the caller can split the items over threads.
 *
 * Low-rank delta (Mamba's dt projection folded in): when dtr is not NULL, delta is not read and
 *     delta_t[p] = sum_r dtr[t, lane, r] * wdt[g, r, p]
 * with element (t, lane, r) of dtr at (t * lanes + lane) * dt_stride + r and wdt (G, R, P), so the (L, lanes, P)
 * delta tensor is never materialised.
 *
 * conv_silu_*: Mamba's causal depthwise convolution along time followed by SiLU, in one pass:
 *     out_t = silu(bias + sum_{k < K, k <= t} taps[K - 1 - k] * x_{t - k})
 * x, out (L, lanes, P) contiguous, taps (K, G, P), bias (G, P); work items are time steps lo..hi-1.
 *
 * gate_merge_*: the mixer's way back from scan directions to tokens, with the output gate:
 *     out[m, b, l, :] = (1 / K) sum_k y[index[l, b, m, k], :] * silu(z[m, b, l, :])
 * y rows of P (any number), index (L, B, M, K) int64 row numbers of y, z rows of P at z_stride apart in
 * (M, B, L) order, out (M, B, L, P) contiguous; work items are token positions l in lo..hi-1.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef W
#define W 16
#endif
#define NMAX 64

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline vf splat(float x) {
    vf v;
    for (int j = 0; j < W; ++j) v[j] = x;
    return v;
}

static inline vf blend(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

static inline vf load(const float *p, int64_t w) {
    vf v = splat(0.0f);
    memcpy(&v, p, (size_t)w * sizeof(float));
    return v;
}

static inline void store(float *p, vf v, int64_t w) { memcpy(p, &v, (size_t)w * sizeof(float)); }

/* Cephes expf, about 1 ulp on [-87.3, 88.7]; exactly 0 below -87.3 (where float32 exp underflows). */
static inline vf vexp(vf x) {
    const vf lo = splat(-87.33654f), hi = splat(88.72283f);
    vi under = x < lo;
    vf c = blend(under, lo, blend(x > hi, hi, x));
    const vf shift = splat(12582912.0f); /* 1.5 * 2^23: round to nearest */
    vf n = (c * 1.44269504088896341f + shift) - shift;
    vf r = c - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vf e = p * r * r + r + 1.0f;
    vi k = __builtin_convertvector(n, vi);
    vf scale = (vf)((k + 127) << 23);
    return (vf)((vi)(e * scale) & ~under);
}

/* Cephes logf for x in [1, 2] (all that the softplus needs). */
static inline vf vlog12(vf x) {
    vi bits = (vi)x;
    vf k = __builtin_convertvector((bits >> 23) - 127, vf);
    vf m = (vf)((bits & 0x007fffff) | 0x3f800000);
    vi big = m > 1.41421356f;
    m = blend(big, m * 0.5f, m);
    k = blend(big, k + 1.0f, k);
    vf t = m - 1.0f, z = t * t;
    vf y = splat(7.0376836292e-2f);
    y = y * t - 1.1514610310e-1f;
    y = y * t + 1.1676998740e-1f;
    y = y * t - 1.2420140846e-1f;
    y = y * t + 1.4249322787e-1f;
    y = y * t - 1.6668057665e-1f;
    y = y * t + 2.0000714765e-1f;
    y = y * t - 2.4999993993e-1f;
    y = y * t + 3.3333331174e-1f;
    y = y * t * z;
    y = y - 2.12194440e-4f * k;
    y = y - 0.5f * z;
    return (t + y) + 0.693359375f * k;
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(e) = log(1 + e) * e / ((1 + e) - 1) (Goldberg), exact
 * to rounding for tiny e. */
static inline vf vsoftplus(vf x) {
    vf e = vexp((vf)((vi)x | (vi)splat(-0.0f)));
    vf w = e + 1.0f;
    vf den = w - 1.0f;
    vi exact = den == 0.0f;
    vf l = vlog12(w) * (e / blend(exact, splat(1.0f), den));
    return blend(x > 0.0f, x, splat(0.0f)) + blend(exact, e, l);
}

static inline __attribute__((always_inline)) void block_f32(
    int64_t L, int64_t P, int64_t N, int64_t row, int64_t bc_row, const float *delta, const float *u,
    const float *A, const float *Bm, const float *Cm, const float *D, const float *bias, int softplus, float *y,
    float *h, const float *dtr, int64_t dt_row, const float *wdt, int64_t R, int64_t w) {
    vf hs[NMAX], a[NMAX];
    for (int64_t n = 0; n < N; ++n) {
        a[n] = load(A + n * P, w);
        hs[n] = load(h + n * P, w);
    }
    const vf bi = bias ? load(bias, w) : splat(0.0f), dk = D ? load(D, w) : splat(0.0f);
    for (int64_t t = 0; t < L; ++t) {
        const float *bt = Bm + t * bc_row, *ct = Cm + t * bc_row;
        vf d = bi;
        if (dtr) {
            const float *dr = dtr + t * dt_row;
            for (int64_t r = 0; r < R; ++r) d += dr[r] * load(wdt + r * P, w);
        } else {
            d += load(delta + t * row, w);
        }
        if (softplus) d = vsoftplus(d);
        const vf ut = load(u + t * row, w), du = d * ut;
        vf yv = dk * ut;
        for (int64_t n = 0; n < N; ++n) {
            vf hn = vexp(d * a[n]) * hs[n] + du * bt[n];
            hs[n] = hn;
            yv += ct[n] * hn;
        }
        store(y + t * row, yv, w);
    }
    for (int64_t n = 0; n < N; ++n) store(h + n * P, hs[n], w);
}

static void block_f32_full(int64_t L, int64_t P, int64_t N, int64_t row, int64_t bc_row, const float *delta,
                           const float *u, const float *A, const float *Bm, const float *Cm, const float *D,
                           const float *bias, int softplus, float *y, float *h, const float *dtr, int64_t dt_row,
                           const float *wdt, int64_t R) {
    block_f32(L, P, N, row, bc_row, delta, u, A, Bm, Cm, D, bias, softplus, y, h, dtr, dt_row, wdt, R, W);
}

static void block_f32_part(int64_t L, int64_t P, int64_t N, int64_t row, int64_t bc_row, const float *delta,
                           const float *u, const float *A, const float *Bm, const float *Cm, const float *D,
                           const float *bias, int softplus, float *y, float *h, const float *dtr, int64_t dt_row,
                           const float *wdt, int64_t R, int64_t w) {
    block_f32(L, P, N, row, bc_row, delta, u, A, Bm, Cm, D, bias, softplus, y, h, dtr, dt_row, wdt, R, w);
}

static void scan_f32_range(int64_t L, int64_t lanes, int64_t G, int64_t P, int64_t N, const float *delta,
                           const float *u, const float *A, const float *B, const float *C, int64_t bc_stride,
                           const float *D, const float *bias, int softplus, float *y, float *h, const float *dtr,
                           int64_t dt_stride, const float *wdt, int64_t R, int64_t lo, int64_t hi) {
    const int64_t blocks = (P + W - 1) / W, row = lanes * P;
    for (int64_t item = lo; item < hi; ++item) {
        const int64_t lane = item / blocks, p0 = (item % blocks) * W, g = lane % G;
        const int64_t w = P - p0 < W ? P - p0 : W, off = lane * P + p0;
        const float *Dg = D ? D + g * P + p0 : 0, *bg = bias ? bias + g * P + p0 : 0;
        const float *dl = dtr ? dtr + lane * dt_stride : 0, *wg = dtr ? wdt + g * R * P + p0 : 0;
        const float *dp = dtr ? 0 : delta + off;
        if (w == W)
            block_f32_full(L, P, N, row, lanes * bc_stride, dp, u + off, A + g * N * P + p0,
                           B + lane * bc_stride, C + lane * bc_stride, Dg, bg, softplus, y + off,
                           h + lane * N * P + p0, dl, lanes * dt_stride, wg, R);
        else
            block_f32_part(L, P, N, row, lanes * bc_stride, dp, u + off, A + g * N * P + p0,
                           B + lane * bc_stride, C + lane * bc_stride, Dg, bg, softplus, y + off,
                           h + lane * N * P + p0, dl, lanes * dt_stride, wg, R, w);
    }
}

/* float64: the same recurrence, scalar, with the C library's exp and log1p (accuracy over speed). */
static void scan_f64_range(int64_t L, int64_t lanes, int64_t G, int64_t P, int64_t N, const double *delta,
                           const double *u, const double *A, const double *B, const double *C, int64_t bc_stride,
                           const double *D, const double *bias, int softplus, double *y, double *h, const double *dtr,
                           int64_t dt_stride, const double *wdt, int64_t R, int64_t lo, int64_t hi) {
    const int64_t blocks = (P + W - 1) / W, row = lanes * P;
    for (int64_t item = lo; item < hi; ++item) {
        const int64_t lane = item / blocks, p0 = (item % blocks) * W, g = lane % G;
        const int64_t w = P - p0 < W ? P - p0 : W;
        for (int64_t p = p0; p < p0 + w; ++p) {
            double *hp = h + lane * N * P + p;
            const double *ap = A + g * N * P + p;
            const double bi = bias ? bias[g * P + p] : 0.0, dk = D ? D[g * P + p] : 0.0;
            for (int64_t t = 0; t < L; ++t) {
                const double *bt = B + (t * lanes + lane) * bc_stride, *ct = C + (t * lanes + lane) * bc_stride;
                double x = bi;
                if (dtr) {
                    const double *dr = dtr + (t * lanes + lane) * dt_stride, *wp = wdt + g * R * P + p;
                    for (int64_t r = 0; r < R; ++r) x += dr[r] * wp[r * P];
                } else {
                    x += delta[t * row + lane * P + p];
                }
                const double ut = u[t * row + lane * P + p];
                const double d = softplus ? (x > 0.0 ? x : 0.0) + log1p(exp(-fabs(x))) : x;
                double yv = dk * ut;
                for (int64_t n = 0; n < N; ++n) {
                    hp[n * P] = exp(d * ap[n * P]) * hp[n * P] + d * ut * bt[n];
                    yv += ct[n] * hp[n * P];
                }
                y[t * row + lane * P + p] = yv;
            }
        }
    }
}

static inline __attribute__((always_inline)) void conv_block_f32(int64_t K, int64_t kmax, int64_t row, int64_t GP,
                                                                  const float *x, const float *taps, const float *bias,
                                                                  float *out, int64_t w) {
    vf acc = load(bias, w);
    for (int64_t k = 0; k < kmax; ++k) acc += load(taps + (K - 1 - k) * GP, w) * load(x - k * row, w);
    store(out, acc / (vexp(-acc) + 1.0f), w);
}

static void conv_block_f32_full(int64_t K, int64_t kmax, int64_t row, int64_t GP, const float *x, const float *taps,
                                const float *bias, float *out) {
    conv_block_f32(K, kmax, row, GP, x, taps, bias, out, W);
}

static void conv_block_f32_part(int64_t K, int64_t kmax, int64_t row, int64_t GP, const float *x, const float *taps,
                                const float *bias, float *out, int64_t w) {
    conv_block_f32(K, kmax, row, GP, x, taps, bias, out, w);
}

static void conv_silu_f32_range(int64_t L, int64_t lanes, int64_t G, int64_t P, int64_t K, const float *x,
                                const float *taps, const float *bias, float *out, int64_t lo, int64_t hi) {
    const int64_t row = lanes * P, GP = G * P;
    for (int64_t t = lo; t < hi; ++t) {
        const int64_t kmax = t + 1 < K ? t + 1 : K;
        for (int64_t lane = 0; lane < lanes; ++lane) {
            const int64_t g = lane % G, off = t * row + lane * P;
            for (int64_t p0 = 0; p0 < P; p0 += W) {
                if (P - p0 >= W)
                    conv_block_f32_full(K, kmax, row, GP, x + off + p0, taps + g * P + p0, bias + g * P + p0, out + off + p0);
                else
                    conv_block_f32_part(K, kmax, row, GP, x + off + p0, taps + g * P + p0, bias + g * P + p0, out + off + p0,
                                        P - p0);
            }
        }
    }
}

static void conv_silu_f64_range(int64_t L, int64_t lanes, int64_t G, int64_t P, int64_t K, const double *x,
                                const double *taps, const double *bias, double *out, int64_t lo, int64_t hi) {
    const int64_t row = lanes * P;
    for (int64_t t = lo; t < hi; ++t) {
        const int64_t kmax = t + 1 < K ? t + 1 : K;
        for (int64_t lane = 0; lane < lanes; ++lane) {
            const int64_t g = lane % G;
            for (int64_t p = 0; p < P; ++p) {
                double acc = bias[g * P + p];
                for (int64_t k = 0; k < kmax; ++k) acc += taps[((K - 1 - k) * G + g) * P + p] * x[(t - k) * row + lane * P + p];
                out[t * row + lane * P + p] = acc / (1.0 + exp(-acc));
            }
        }
    }
}

static inline __attribute__((always_inline)) void merge_block_f32(int64_t K, const float *y, const int64_t *idx,
                                                                   int64_t P, const float *z, float *out, int64_t w) {
    vf acc = splat(0.0f);
    for (int64_t k = 0; k < K; ++k) acc += load(y + idx[k] * P, w);
    const vf zv = load(z, w);
    store(out, acc * (1.0f / (float)K) * (zv / (vexp(-zv) + 1.0f)), w);
}

static void merge_block_f32_full(int64_t K, const float *y, const int64_t *idx, int64_t P, const float *z, float *out) {
    merge_block_f32(K, y, idx, P, z, out, W);
}

static void merge_block_f32_part(int64_t K, const float *y, const int64_t *idx, int64_t P, const float *z, float *out,
                                 int64_t w) {
    merge_block_f32(K, y, idx, P, z, out, w);
}

static void gate_merge_f32_range(int64_t L, int64_t B, int64_t M, int64_t K, int64_t P, const float *y,
                                 const int64_t *index, const float *z, int64_t z_stride, float *out, int64_t lo,
                                 int64_t hi) {
    for (int64_t l = lo; l < hi; ++l)
        for (int64_t b = 0; b < B; ++b)
            for (int64_t m = 0; m < M; ++m) {
                const int64_t token = (m * B + b) * L + l;
                const int64_t *idx = index + ((l * B + b) * M + m) * K;
                for (int64_t p0 = 0; p0 < P; p0 += W) {
                    if (P - p0 >= W)
                        merge_block_f32_full(K, y + p0, idx, P, z + token * z_stride + p0, out + token * P + p0);
                    else
                        merge_block_f32_part(K, y + p0, idx, P, z + token * z_stride + p0, out + token * P + p0, P - p0);
                }
            }
}

static void gate_merge_f64_range(int64_t L, int64_t B, int64_t M, int64_t K, int64_t P, const double *y,
                                 const int64_t *index, const double *z, int64_t z_stride, double *out, int64_t lo,
                                 int64_t hi) {
    for (int64_t l = lo; l < hi; ++l)
        for (int64_t b = 0; b < B; ++b)
            for (int64_t m = 0; m < M; ++m) {
                const int64_t token = (m * B + b) * L + l;
                const int64_t *idx = index + ((l * B + b) * M + m) * K;
                for (int64_t p = 0; p < P; ++p) {
                    double acc = 0.0;
                    for (int64_t k = 0; k < K; ++k) acc += y[idx[k] * P + p];
                    const double zv = z[token * z_stride + p];
                    out[token * P + p] = acc / (double)K * (zv / (1.0 + exp(-zv)));
                }
            }
}

/* Exported entry points: the work items lo..hi-1, split over nthreads OpenMP threads when the library is built
 * with -fopenmp (compiled.py links it to the OpenMP runtime PyTorch already loaded, so the kernel runs on the
 * threads that PyTorch's own operators use), else run on the calling thread (the caller splits them). */
#ifdef _OPENMP
#include <omp.h>
#define PARALLEL_RANGE(nthreads, lo, hi, CALL)                                                            \
    do {                                                                                                  \
        if ((nthreads) > 1 && (hi) - (lo) > 1) {                                                          \
            _Pragma("omp parallel num_threads((int)(nthreads))") {                                        \
                const int64_t n_ = omp_get_num_threads(), t_ = omp_get_thread_num();                      \
                CALL((lo) + ((hi) - (lo)) * t_ / n_, (lo) + ((hi) - (lo)) * (t_ + 1) / n_);               \
            }                                                                                             \
        } else {                                                                                          \
            CALL(lo, hi);                                                                                 \
        }                                                                                                 \
    } while (0)
int scan_openmp(void) { return 1; }
#else
#define PARALLEL_RANGE(nthreads, lo, hi, CALL) CALL(lo, hi)
int scan_openmp(void) { return 0; }
#endif

void scan_f32(int64_t L, int64_t lanes, int64_t G, int64_t P, int64_t N, const float *delta, const float *u,
              const float *A, const float *B, const float *C, int64_t bc_stride, const float *D, const float *bias,
              int softplus, float *y, float *h, const float *dtr, int64_t dt_stride, const float *wdt, int64_t R,
              int64_t lo, int64_t hi, int64_t nthreads) {
#define CALL(a, b) scan_f32_range(L, lanes, G, P, N, delta, u, A, B, C, bc_stride, D, bias, softplus, y, h, dtr, \
                   dt_stride, wdt, R, a, b)
    PARALLEL_RANGE(nthreads, lo, hi, CALL);
#undef CALL
}

void scan_f64(int64_t L, int64_t lanes, int64_t G, int64_t P, int64_t N, const double *delta, const double *u,
              const double *A, const double *B, const double *C, int64_t bc_stride, const double *D,
              const double *bias, int softplus, double *y, double *h, const double *dtr, int64_t dt_stride,
              const double *wdt, int64_t R, int64_t lo, int64_t hi, int64_t nthreads) {
#define CALL(a, b) scan_f64_range(L, lanes, G, P, N, delta, u, A, B, C, bc_stride, D, bias, softplus, y, h, dtr, \
                   dt_stride, wdt, R, a, b)
    PARALLEL_RANGE(nthreads, lo, hi, CALL);
#undef CALL
}

void conv_silu_f32(int64_t L, int64_t lanes, int64_t G, int64_t P, int64_t K, const float *x, const float *taps,
                   const float *bias, float *out, int64_t lo, int64_t hi, int64_t nthreads) {
#define CALL(a, b) conv_silu_f32_range(L, lanes, G, P, K, x, taps, bias, out, a, b)
    PARALLEL_RANGE(nthreads, lo, hi, CALL);
#undef CALL
}

void conv_silu_f64(int64_t L, int64_t lanes, int64_t G, int64_t P, int64_t K, const double *x, const double *taps,
                   const double *bias, double *out, int64_t lo, int64_t hi, int64_t nthreads) {
#define CALL(a, b) conv_silu_f64_range(L, lanes, G, P, K, x, taps, bias, out, a, b)
    PARALLEL_RANGE(nthreads, lo, hi, CALL);
#undef CALL
}

void gate_merge_f32(int64_t L, int64_t B, int64_t M, int64_t K, int64_t P, const float *y, const int64_t *index,
                    const float *z, int64_t z_stride, float *out, int64_t lo, int64_t hi, int64_t nthreads) {
#define CALL(a, b) gate_merge_f32_range(L, B, M, K, P, y, index, z, z_stride, out, a, b)
    PARALLEL_RANGE(nthreads, lo, hi, CALL);
#undef CALL
}

void gate_merge_f64(int64_t L, int64_t B, int64_t M, int64_t K, int64_t P, const double *y, const int64_t *index,
                    const double *z, int64_t z_stride, double *out, int64_t lo, int64_t hi, int64_t nthreads) {
#define CALL(a, b) gate_merge_f64_range(L, B, M, K, P, y, index, z, z_stride, out, a, b)
    PARALLEL_RANGE(nthreads, lo, hi, CALL);
#undef CALL
}

int scan_nmax(void) { return NMAX; }
int scan_width(void) { return W; }
