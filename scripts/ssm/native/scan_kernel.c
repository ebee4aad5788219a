/* Fused selective-scan kernels for the ``compiled`` backend (scripts/ssm/native/): the forward (inference, and
 * training with checkpoints), the backward (training), and the fused mixer steps. Each kernel's parameters and
 * contract (shapes, layouts, element types, what it writes) are in scan_kernel.h.
 *
 * Compiled at run time by the system C compiler into a shared library (scripts/ssm/native/build.py) and called
 * through ctypes with one parameter struct per call (binding.py); plain C99 plus GCC/Clang vector extensions, no
 * PyTorch or Python headers (so it compiles in a few seconds).
 *
 * Per (batch, group) lane and block of W channels, over all L time steps, with the state in registers:
 *     d_t   = softplus(delta_t + delta_bias)            (or without the softplus)
 *     h_t   = exp(d_t * A) * h_{t-1} + d_t * u_t * B_t  (N states per channel)
 *     y_t   = <C_t, h_t> + D * u_t
 * Order of work in the float32 forward (docs/performance.md): the blocks of one lane take turns over
 * chunks of TIME_CHUNK steps (a chunk's rows, 8 KB apart at the mixers' shapes, stay in cache and TLB for the next
 * block), and each block computes DELTA_AHEAD steps' d_t before their recurrence steps, so that the softplus'
 * latency overlaps instead of sitting on every step's critical path. With AVX-512 the exponentials are
 * 2^(d (A log2 e)) by vreduceps + vscalefps (vexp2_decay: no rounding step, 9 instructions), about a third of the
 * Cephes exp's.
 *
 * float32 and float64. The float32 kernels below are vector code (W floats per vector, masked loads for a partial
 * block, polynomial exp / log1p, denormals flushed): their order of work, register blocking and approximations are
 * what makes them fast, and none of it carries over to double. The float64 kernels, the accuracy path that the
 * tests compare with the float64 reference, are the scalar definitions in scan_scalar.h, written once over an
 * element type (SCALAR_T) and instantiated here for double. The float32 vector code has no scalar tail (a partial
 * block is one masked vector), so the scalar template has no float32 instantiation; both paths share the contracts
 * of scan_kernel.h, the work items, and the tests against the float64 reference.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "scan_kernel.h"

#ifndef W
#if defined(__AVX512F__)
#define W 16
#elif defined(__AVX__)
#define W 8
#else
#define W 4
#endif
#endif
#define NMAX 64
#define KMAX 16 /* causal convolution width */
#define PMAX 4096 /* channels of a merged row normalised in the merge */
#define DELTA_AHEAD 8 /* steps whose deltas (softplus included) are computed before their recurrence steps */
#define TIME_CHUNK 16 /* steps a lane's channel blocks advance in turn (rows stay in cache and TLB between blocks) */

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline vf splat(float x) {
    vf v;
    for (int j = 0; j < W; ++j) v[j] = x;
    return v;
}

static inline vf blend(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

#if defined(__AVX512F__) && W == 16
#include <immintrin.h>
/* The first w (<= W) floats at p, zeros after; masked, so a partial block costs what a full one does (a memcpy of a
 * run-time length compiles to `rep movs`). */
static inline __mmask16 first_lanes(int64_t w) { return w >= W ? (__mmask16)0xFFFF : (__mmask16)((1u << w) - 1u); }
static inline vf load(const float *p, int64_t w) { return (vf)_mm512_maskz_loadu_ps(first_lanes(w), p); }
static inline void store(float *p, vf v, int64_t w) { _mm512_mask_storeu_ps(p, first_lanes(w), (__m512)v); }
#else
static inline vf load(const float *p, int64_t w) {
    vf v = splat(0.0f);
    if (w == W)
        memcpy(&v, p, sizeof v);
    else
        memcpy(&v, p, (size_t)w * sizeof(float));
    return v;
}

static inline void store(float *p, vf v, int64_t w) {
    if (w == W)
        memcpy(p, &v, sizeof v);
    else
        memcpy(p, &v, (size_t)w * sizeof(float));
}
#endif

static inline float hsum(vf v) {
    float s[W];
    memcpy(s, &v, sizeof v);
    for (int k = W / 2; k > 0; k /= 2)
        for (int j = 0; j < k; ++j) s[j] += s[j + k];
    return s[0];
}

/* All ones in the first w lanes. */
static inline vi lane_mask(int64_t w) {
    vi m;
    for (int j = 0; j < W; ++j) m[j] = j < w ? -1 : 0;
    return m;
}

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

#if defined(__AVX512F__) && W == 16
/* 2^t with AVX-512's vscalefps: t = n + r (n integer, |r| <= 1/2), 2^r by Cephes' degree-6 exp2f polynomial, scaled
 * by 2^n. t below -300 is raised to it (2^-300 scales to 0; -inf gives 0, not NaN); NaN stays NaN; overflow: +inf.
 * The scan multiplies A by log2(e) once per block, so exp(d A) = 2^(d (A log2 e)) costs one rounding, like d A. */
#define EXP2_SCALE 1.44269504088896341f
static inline vf scaled_exp2(vf r, __m512 n) { /* 2^r * 2^n for |r| <= 1/2 */
    vf p = splat(1.535336188319500e-4f);
    p = p * r + 1.339887440266574e-3f;
    p = p * r + 9.618437357674640e-3f;
    p = p * r + 5.550332471162809e-2f;
    p = p * r + 2.402264791363012e-1f;
    p = p * r + 6.931472028550421e-1f;
    p = p * r + 1.0f;
    return (vf)_mm512_scalef_ps((__m512)p, n);
}

static inline vf vexp2(vf t) {
    __m512 x = _mm512_max_ps(_mm512_set1_ps(-300.0f), (__m512)t);
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return scaled_exp2((vf)(x - n), n);
}
/* 2^t for t <= 0 (the state decay exp(d A) = 2^(d A log2 e), and the softplus' exp(-|x|)): vreduceps gives
 * r = t - floor(t) in [0, 1) in one instruction and vscalefps scales by 2^floor(t) from t itself, so there is no
 * rounding step and no subtraction (vexp2: 3 more instructions, 2 of them on the one port that also runs vscalefps).
 * 2^r by a degree-6 fit on [0, 1) with p(0) = 1, relative error 8.4e-8 in float32. No clamp is needed: t = -inf gives
 * r = 0 and a scale of 0; below about -126 the result is a denormal (0 where FTZ is set) and below -150 it is 0;
 * NaN stays NaN. vreduceps needs AVX-512DQ; without it vexp2 is used. */
#ifdef __AVX512DQ__
static inline vf vexp2_decay(vf t) {
    const vf r = (vf)_mm512_reduce_ps((__m512)t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    vf p = splat(2.1702254889532924e-4f);
    p = p * r + 1.2439688434824347e-3f;
    p = p * r + 9.678840637207031e-3f;
    p = p * r + 5.5483341217041016e-2f;
    p = p * r + 2.4022983014583588e-1f;
    p = p * r + 6.931470036506653e-1f;
    p = p * r + 1.0f;
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)t);
}
#else
#define vexp2_decay vexp2
#endif
/* exp(x) for an exact x (the SiLU's): x log2(e) split into a rounded product and its error (one FMA), so that the
 * result keeps about 1 ulp for large |x| like the Cephes vexp; overflow gives +inf, underflow 0. */
static inline vf vexp_exact_input(vf x) {
    const __m512 xs = (__m512)x, s = _mm512_set1_ps(EXP2_SCALE);
    const __m512 hi = _mm512_max_ps(_mm512_set1_ps(-300.0f), _mm512_mul_ps(xs, s));
    const __m512 lo = _mm512_fmadd_ps(xs, _mm512_set1_ps(1.925963033e-8f), _mm512_fmsub_ps(xs, s, hi));
    const __m512 n = _mm512_roundscale_ps(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return scaled_exp2((vf)_mm512_add_ps(_mm512_sub_ps(hi, n), lo), n);
}
#else
/* 2^t without AVX-512 (AVX2, SSE2, NEON: plain vector extensions): t clamped to [-127, 128], split into
 * k = floor(t) (truncation, one less where that rounded up) and r = t - k in [0, 1) (exact), 2^r by the degree-6 fit
 * of vexp2_decay above and 2^k put into the exponent field. Below -126 the result is 0 (2^-127 and smaller are
 * denormals, flushed by the float32 kernels anyway); 128 gives +inf; NaN stays NaN (the clamps keep it, the
 * polynomial carries it). About half the instructions of the Cephes vexp, which also rounds and clamps twice. */
#define EXP2_SCALE 1.44269504088896341f
static inline vf vexp2_decay(vf t) {
    vf x = blend(t < -127.0f, splat(-127.0f), t);
    x = blend(x > 128.0f, splat(128.0f), x);
    vi k = __builtin_convertvector(x, vi);
    k += (vi)(__builtin_convertvector(k, vf) > x); /* truncated up (x < 0, not an integer): one less */
    const vf r = x - __builtin_convertvector(k, vf);
    vf p = splat(2.1702254889532924e-4f);
    p = p * r + 1.2439688434824347e-3f;
    p = p * r + 9.678840637207031e-3f;
    p = p * r + 5.5483341217041016e-2f;
    p = p * r + 2.4022983014583588e-1f;
    p = p * r + 6.931470036506653e-1f;
    p = p * r + 1.0f;
    return p * (vf)((k + 127) << 23);
}
#define vexp_exact_input vexp
#endif

/* log1p(e) for e in [0, 1] as 2 atanh(s), s = e / (2 + e) in [0, 1/3]: 2 s (1 + s^2/3 + ... + s^12/13), truncated
 * below 2e-8 relative; no cancellation for tiny e. */
static inline vf vlog1p01(vf e) {
    const vf s = e / (e + 2.0f), z = s * s;
    vf p = splat(1.0f / 13.0f);
    p = p * z + 1.0f / 11.0f;
    p = p * z + 1.0f / 9.0f;
    p = p * z + 1.0f / 7.0f;
    p = p * z + 1.0f / 5.0f;
    p = p * z + 1.0f / 3.0f;
    p = p * z + 1.0f;
    return (s + s) * p;
}

/* exp(-|x|), the one exponential of the softplus and its derivative. */
static inline vf vexp_neg_abs(vf x) { return vexp2_decay((vf)((vi)x | (vi)splat(-0.0f)) * EXP2_SCALE); }

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)). */
static inline vf vsoftplus(vf x) { return blend(x > 0.0f, x, splat(0.0f)) + vlog1p01(vexp_neg_abs(x)); }

static inline __attribute__((always_inline)) void block_f32(
    int64_t L, int64_t P, int64_t N, int64_t row, int64_t u_row, int64_t bc_row, const float *delta, const float *u,
    const float *A, const float *Bm, const float *Cm, const float *D, const float *bias, int softplus, float *y,
    float *h, const float *dtr, int64_t dt_row, const float *wdt, int64_t R, float *ckpt, int64_t T,
    int64_t ckpt_row, int64_t tb, int64_t w) {
    vf hs[NMAX], a[NMAX];
    for (int64_t n = 0; n < N; ++n) {
        a[n] = load(A + n * P, w) * EXP2_SCALE;
        hs[n] = load(h + n * P, w);
    }
    const vf bi = bias ? load(bias, w) : splat(0.0f), dk = D ? load(D, w) : splat(0.0f);
    for (int64_t t0 = 0; t0 < L; t0 += DELTA_AHEAD) {
        const int64_t tn = L - t0 < DELTA_AHEAD ? L - t0 : DELTA_AHEAD;
        vf dbuf[DELTA_AHEAD], ubuf[DELTA_AHEAD];
        for (int64_t j = 0; j < tn; ++j) {
            const int64_t t = t0 + j;
            vf d = bi;
            if (dtr) {
                const float *dr = dtr + t * dt_row;
                for (int64_t r = 0; r < R; ++r) d += dr[r] * load(wdt + r * P, w);
            } else {
                d += load(delta + t * row, w);
            }
            if (softplus) d = vsoftplus(d);
            dbuf[j] = d;
            ubuf[j] = load(u + t * u_row, w);
        }
        for (int64_t j = 0; j < tn; ++j) {
            const int64_t t = t0 + j;
            const float *bt = Bm + t * bc_row, *ct = Cm + t * bc_row;
            if (ckpt && (tb + t) % T == 0)
                for (int64_t n = 0; n < N; ++n) store(ckpt + ((tb + t) / T) * ckpt_row + n * P, hs[n], w);
            const vf d = dbuf[j], ut = ubuf[j], du = d * ut;
            vf yv = dk * ut;
            for (int64_t n = 0; n < N; ++n) {
                vf hn = vexp2_decay(d * a[n]) * hs[n] + du * bt[n];
                hs[n] = hn;
                yv += ct[n] * hn;
            }
            store(y + t * row, yv, w);
        }
    }
    for (int64_t n = 0; n < N; ++n) store(h + n * P, hs[n], w);
}

/* block_f32 for a full block (w = W, a compile-time constant) and for a partial one. The per-block routines
 * (block_f32_*, chunk_bwd_f32_*) are internal and take their operands, pointers already advanced to the block, as
 * arguments rather than a struct: called with the fused mixer's compile-time shapes, the compiler clones them with
 * P, N and R as constants (interprocedural constant propagation), which it does for arguments, not reliably for
 * fields read through a pointer. The exported entry points take the structs of scan_kernel.h. */
#define BLOCK_F32_ARGS                                                                                              \
    int64_t L, int64_t P, int64_t N, int64_t row, int64_t u_row, int64_t bc_row, const float *delta, const float *u, \
        const float *A, const float *Bm, const float *Cm, const float *D, const float *bias, int softplus, float *y,  \
        float *h, const float *dtr, int64_t dt_row, const float *wdt, int64_t R, float *ckpt, int64_t T,             \
        int64_t ckpt_row, int64_t tb
#define BLOCK_F32_CALL                                                                                        \
    L, P, N, row, u_row, bc_row, delta, u, A, Bm, Cm, D, bias, softplus, y, h, dtr, dt_row, wdt, R, ckpt, T, \
        ckpt_row, tb
static void block_f32_full(BLOCK_F32_ARGS) { block_f32(BLOCK_F32_CALL, W); }
static void block_f32_part(BLOCK_F32_ARGS, int64_t w) { block_f32(BLOCK_F32_CALL, w); }

/* The scan (ScanParams), work items lo..hi-1. */
static void scan_f32_range(const ScanParams *p, int64_t lo, int64_t hi) {
    const int64_t L = p->L, lanes = p->lanes, G = p->G, P = p->P, N = p->N, R = p->R, T = p->T;
    const int64_t bc_stride = p->bc_stride, dt_stride = p->dt_stride;
    const float *delta = p->delta, *u = p->u, *A = p->A, *B = p->B, *C = p->C, *D = p->D, *bias = p->bias;
    const float *dtr = p->dtr, *wdt = p->wdt;
    float *y = p->y, *h = p->h, *ckpt = p->ckpt;
    const int softplus = p->softplus != 0;
    const int64_t blocks = (P + W - 1) / W, row = lanes * P, ckpt_row = lanes * N * P;
    const int64_t bc_row = lanes * bc_stride, dt_row = lanes * dt_stride;
    for (int64_t first = lo; first < hi;) {  /* the items of one lane: its blocks b0..b1-1, a chunk of time at a time */
        const int64_t lane = first / blocks, b0 = first % blocks;
        const int64_t last = (lane + 1) * blocks < hi ? (lane + 1) * blocks : hi;
        const int64_t b1 = last - lane * blocks, g = lane % G;
        for (int64_t t0 = 0; t0 < L; t0 += TIME_CHUNK) {
            const int64_t tn = L - t0 < TIME_CHUNK ? L - t0 : TIME_CHUNK;
            for (int64_t bk = b0; bk < b1; ++bk) {
                const int64_t p0 = bk * W, w = P - p0 < W ? P - p0 : W, off = t0 * row + lane * P + p0;
                const float *Dg = D ? D + g * P + p0 : 0, *bg = bias ? bias + g * P + p0 : 0;
                const float *dl = dtr ? dtr + t0 * dt_row + lane * dt_stride : 0, *wg = dtr ? wdt + g * R * P + p0 : 0;
                const float *dp = dtr ? 0 : delta + off;
                float *ck = ckpt ? ckpt + lane * N * P + p0 : 0;
                const float *Bl = B + t0 * bc_row + lane * bc_stride, *Cl = C + t0 * bc_row + lane * bc_stride;
                if (w == W)
                    block_f32_full(tn, P, N, row, row, bc_row, dp, u + off, A + g * N * P + p0, Bl, Cl, Dg, bg,
                                   softplus, y + off, h + lane * N * P + p0, dl, dt_row, wg, R, ck, T, ckpt_row, t0);
                else
                    block_f32_part(tn, P, N, row, row, bc_row, dp, u + off, A + g * N * P + p0, Bl, Cl, Dg, bg,
                                   softplus, y + off, h + lane * N * P + p0, dl, dt_row, wg, R, ck, T, ckpt_row, t0, w);
            }
        }
        first = last;
    }
}


/* Row k of xr: the input row of step t - k (already offset to the block's first channel). */
static inline __attribute__((always_inline)) void conv_block_f32(int64_t K, int64_t kmax, const float *const *xr,
                                                                  int64_t GP, const float *taps, const float *bias,
                                                                  float *out, int64_t w) {
    vf acc = load(bias, w);
    for (int64_t k = 0; k < kmax; ++k) acc += load(taps + (K - 1 - k) * GP, w) * load(xr[k], w);
    store(out, acc / (vexp_exact_input(-acc) + 1.0f), w); /* silu */
}

static void conv_block_f32_full(int64_t K, int64_t kmax, const float *const *xr, int64_t GP, const float *taps,
                                const float *bias, float *out) {
    conv_block_f32(K, kmax, xr, GP, taps, bias, out, W);
}

static void conv_block_f32_part(int64_t K, int64_t kmax, const float *const *xr, int64_t GP, const float *taps,
                                const float *bias, float *out, int64_t w) {
    conv_block_f32(K, kmax, xr, GP, taps, bias, out, w);
}

/* The input row of (step, lane): row number step * lanes + lane of x, or index[step * lanes + lane] of it (the
 * direction gather folded in), rows x_stride apart. */
#define CONV_ROW(x, step, lane) ((x) + (index ? index[(step) * lanes + (lane)] : (step) * lanes + (lane)) * x_stride)

/* One output row: every channel block of (step, lane) from its input rows xr[k] (step - k), group g's taps. */
static void conv_row_f32(int64_t K, int64_t kmax, const float *const *xr, int64_t P, int64_t GP, const float *taps,
                         const float *bias, float *out) {
    const float *xb[KMAX];
    for (int64_t p0 = 0; p0 < P; p0 += W) {
        for (int64_t k = 0; k < kmax; ++k) xb[k] = xr[k] + p0;
        if (P - p0 >= W)
            conv_block_f32_full(K, kmax, xb, GP, taps + p0, bias + p0, out + p0);
        else
            conv_block_f32_part(K, kmax, xb, GP, taps + p0, bias + p0, out + p0, P - p0);
    }
}

/* The causal convolution + SiLU (ConvSiluParams), work items (time steps) lo..hi-1. */
static void conv_silu_f32_range(const ConvSiluParams *p, int64_t lo, int64_t hi) {
    const int64_t lanes = p->lanes, G = p->G, P = p->P, K = p->K, x_stride = p->x_stride;
    const int64_t *index = p->index;
    const float *x = p->x, *taps = p->taps, *bias = p->bias;
    float *out = p->out;
    const int64_t row = lanes * P, GP = G * P;
    const float *xr[KMAX];
    for (int64_t t = lo; t < hi; ++t) {
        const int64_t kmax = t + 1 < K ? t + 1 : K;
        for (int64_t lane = 0; lane < lanes; ++lane) {
            const int64_t g = lane % G;
            for (int64_t k = 0; k < kmax; ++k) xr[k] = CONV_ROW(x, t - k, lane);
            conv_row_f32(K, kmax, xr, P, GP, taps + g * P, bias + g * P, out + t * row + lane * P);
        }
    }
}


static inline __attribute__((always_inline)) vf merge_block_f32(int64_t K, const float *y, const int64_t *idx,
                                                                 int64_t P, const float *z, float scale, int64_t w) {
    vf acc = splat(0.0f);
    for (int64_t k = 0; k < K; ++k) acc += load(y + idx[k] * P, w);
    const vf zv = load(z, w);
    return acc * scale * (zv / (vexp_exact_input(-zv) + 1.0f));
}

static vf merge_block_f32_full(int64_t K, const float *y, const int64_t *idx, int64_t P, const float *z, float scale) {
    return merge_block_f32(K, y, idx, P, z, scale, W);
}

static vf merge_block_f32_part(int64_t K, const float *y, const int64_t *idx, int64_t P, const float *z, float scale,
                               int64_t w) {
    return merge_block_f32(K, y, idx, P, z, scale, w);
}

/* One token row: the K rows idx[k] of y summed, times scale and silu(z), into buf, then (with ln_w) normalised over
 * the row and scaled as LayerNorm; out may be one of the y rows. */
static void gate_merge_f32_row(int64_t K, int64_t P, const float *y, const int64_t *idx, const float *z,
                               float row_scale, const float *ln_w, const float *ln_b, double eps, float *out) {
    vf buf[PMAX / W];
    for (int64_t p0 = 0, j = 0; p0 < P; p0 += W, ++j)
        buf[j] = P - p0 >= W ? merge_block_f32_full(K, y + p0, idx, P, z + p0, row_scale)
                             : merge_block_f32_part(K, y + p0, idx, P, z + p0, row_scale, P - p0);
    vf shift = splat(0.0f), scale = splat(1.0f);
    if (ln_w) { /* two passes over the row in registers: mean, then the mean square of the deviations */
        vf sum = splat(0.0f), sq = splat(0.0f);
        for (int64_t p0 = 0, j = 0; p0 < P; p0 += W, ++j) sum += buf[j]; /* partial blocks are zero-padded */
        const float mean = hsum(sum) / (float)P;
        for (int64_t p0 = 0, j = 0; p0 < P; p0 += W, ++j) {
            const int64_t w = P - p0 < W ? P - p0 : W;
            const vf dev = buf[j] - mean;
            sq += blend(lane_mask(w), dev * dev, splat(0.0f));
        }
        const float inv = 1.0f / sqrtf(hsum(sq) / (float)P + (float)eps);
        shift = splat(-mean * inv);
        scale = splat(inv);
    }
    for (int64_t p0 = 0, j = 0; p0 < P; p0 += W, ++j) {
        const int64_t w = P - p0 < W ? P - p0 : W;
        vf v = buf[j];
        if (ln_w) v = (v * scale + shift) * load(ln_w + p0, w) + load(ln_b + p0, w);
        store(out + p0, v, w);
    }
}

/* The gated merge (GateMergeParams), work items (token positions) lo..hi-1. */
static void gate_merge_f32_range(const GateMergeParams *p, int64_t lo, int64_t hi) {
    const int64_t L = p->L, B = p->B, M = p->M, K = p->K, P = p->P, z_stride = p->z_stride;
    const int64_t *index = p->index;
    const float *y = p->y, *z = p->z, *ln_w = p->ln_w, *ln_b = p->ln_b;
    const double eps = p->eps;
    float *out = p->out;
    for (int64_t l = lo; l < hi; ++l)
        for (int64_t b = 0; b < B; ++b)
            for (int64_t m = 0; m < M; ++m) {
                const int64_t token = (m * B + b) * L + l;
                const int64_t *idx = index + ((l * B + b) * M + m) * K;
                gate_merge_f32_row(K, P, y, idx, z + token * z_stride, 1.0f / (float)K, ln_w ? ln_w + m * P : 0,
                                   ln_b ? ln_b + m * P : 0, eps, out + token * P);
            }
}


/* The mixer between its input projection and its merge, per lane and chunk of TIME_CHUNK steps, for inference:
 *     u_t    = silu(causal conv of the gathered token rows)              (conv_silu_*, into a buffer)
 *     x_t    = W_x[g] s_t, s_t = u_t or the gathered source row src      (the x projection: dt (R), B (N), C (N))
 *     y_t    = the scan (block_f32) with the low-rank delta, B, C from x_t and u_t from the buffer
 * so that u and the projection never go through memory. x (tokens), x_stride, index: as conv_silu_*; src rows
 * src_stride apart or NULL; wxt (G, P, CP): the x projection transposed, its R + 2N columns zero-padded to CP, a
 * multiple of W; wdt (G, R, P); dt_bias, D (G, P) or NULL; A (G, N, P); y (L, lanes, P);
 * h (lanes, N, P) zero in, last state out. Work items are lanes lo..hi-1. P <= FUSED_PMAX, R + 2N <= XMAX. */
#define FUSED_PMAX 1024
#define XMAX 192
#define XROWS 4 /* projection rows computed together (each weight load feeds XROWS FMAs) */
#define XVECS 2 /* projection output vectors per pass over a row */

/* out[r * C + c] = <s[r], column c of wxt> for r < rows (<= XROWS), with wxt (P, CP) the projection transposed and
 * zero-padded to CP (a multiple of W) columns: vectors over the outputs, so no horizontal sums; each weight vector
 * feeds XROWS FMAs, each row value is one broadcast operand. Rows past `rows` repeat the last (discarded). */
static void project_rows_f32(int64_t rows, int64_t P, int64_t C, int64_t CP, const float *const *s, const float *wxt,
                             float *out) {
    const float *sr[XROWS];
    for (int r = 0; r < XROWS; ++r) sr[r] = s[r < rows ? r : rows - 1];
    for (int64_t c0 = 0; c0 < CP; c0 += XVECS * W) {
        const int nv = CP - c0 >= XVECS * W ? XVECS : (int)((CP - c0) / W);
        vf acc[XROWS][XVECS];
        for (int r = 0; r < XROWS; ++r)
            for (int v = 0; v < XVECS; ++v) acc[r][v] = splat(0.0f);
        for (int64_t p = 0; p < P; ++p) {
            vf wv[XVECS];
            for (int v = 0; v < XVECS; ++v) wv[v] = load(wxt + p * CP + c0 + (v < nv ? v : 0) * W, W);
            for (int r = 0; r < XROWS; ++r) {
                const float sp = sr[r][p];
                for (int v = 0; v < XVECS; ++v) acc[r][v] += wv[v] * sp;
            }
        }
        for (int64_t r = 0; r < rows; ++r)
            for (int v = 0; v < nv; ++v) {
                const int64_t c = c0 + v * W, n = C - c < W ? C - c : W;
                if (n > 0) store(out + r * C + c, acc[r][v], n);
            }
    }
}

/* One lane of the fused mixer kernel (MixerScanParams; P, N, R passed separately so that they can be compile-time
 * constants), all L steps: conv, projection and scan per chunk; the chunk's outputs go to y (time-major rows) or,
 * with `tokens` set, are added into the token rows out[index[t, lane]] (stored for the first direction, first = 1).
 * ubuf, xd, ybuf: the chunk's buffers (TIME_CHUNK rows of P, of R + 2N, of P). */
static inline __attribute__((always_inline)) void mixer_lane_f32(const MixerScanParams *prm, int64_t P, int64_t N,
                                                                 int64_t R, int64_t lane, float *tokens, int first,
                                                                 float *ubuf, float *xd, float *ybuf) {
    const int64_t L = prm->L, G = prm->G, lanes = prm->B * prm->G, K = prm->K, x_stride = prm->x_stride;
    const int64_t src_stride = prm->src_stride, CP = prm->CP, *index = prm->index;
    const float *x = prm->x, *taps = prm->taps, *conv_bias = prm->conv_bias, *src = prm->src, *wxt = prm->wxt;
    const float *wdt = prm->wdt, *dt_bias = prm->dt_bias, *A = prm->A, *D = prm->D;
    float *y = prm->y, *h = prm->h;
    const int64_t g = lane % G, row = lanes * P, C = R + 2 * N, GP = G * P;
    const float *xr[KMAX], *s[XROWS];
    for (int64_t t0 = 0; t0 < L; t0 += TIME_CHUNK) {
        const int64_t tn = L - t0 < TIME_CHUNK ? L - t0 : TIME_CHUNK;
        for (int64_t j = 0; j < tn; ++j) { /* causal conv + SiLU of the gathered rows */
            const int64_t t = t0 + j, kmax = t + 1 < K ? t + 1 : K;
            for (int64_t k = 0; k < kmax; ++k) xr[k] = x + index[(t - k) * lanes + lane] * x_stride;
            conv_row_f32(K, kmax, xr, P, GP, taps + g * P, conv_bias + g * P, ubuf + j * P);
        }
        for (int64_t j = 0; j < tn; j += XROWS) { /* x projection */
            const int64_t rows = tn - j < XROWS ? tn - j : XROWS;
            for (int64_t r = 0; r < rows; ++r)
                s[r] = src ? src + index[(t0 + j + r) * lanes + lane] * src_stride : ubuf + (j + r) * P;
            project_rows_f32(rows, P, C, CP, s, wxt + g * P * CP, xd + j * C);
        }
        for (int64_t p0 = 0; p0 < P; p0 += W) { /* the scan over the chunk, block by block */
            const int64_t w = P - p0 < W ? P - p0 : W;
            const float *Dg = D ? D + g * P + p0 : 0, *bg = dt_bias ? dt_bias + g * P + p0 : 0;
            float *yo = tokens ? ybuf + p0 : y + t0 * row + lane * P + p0, *hl = h + lane * N * P + p0;
            const int64_t y_row = tokens ? P : row;
            if (w == W)
                block_f32_full(tn, P, N, y_row, P, C, 0, ubuf + p0, A + g * N * P + p0, xd + R, xd + R + N, Dg, bg, 1,
                               yo, hl, xd, C, wdt + g * R * P + p0, R, 0, 1, 0, t0);
            else
                block_f32_part(tn, P, N, y_row, P, C, 0, ubuf + p0, A + g * N * P + p0, xd + R, xd + R + N, Dg, bg, 1,
                               yo, hl, xd, C, wdt + g * R * P + p0, R, 0, 1, 0, t0, w);
        }
        if (tokens)
            for (int64_t j = 0; j < tn; ++j) { /* into the token rows this direction visited */
                float *dst = tokens + index[(t0 + j) * lanes + lane] * P;
                const float *src_row = ybuf + j * P;
                if (first)
                    memcpy(dst, src_row, (size_t)P * sizeof(float));
                else
                    for (int64_t p = 0; p < P; ++p) dst[p] += src_row[p];
            }
    }
}

/* Work items: lanes lo..hi-1 writing y, or with `out` set, member sets (b, m) lo..hi-1 (b = item / M): the KD
 * direction lanes of the set are summed into out's token rows (M, B, L, P), then each row is gated by silu(z) (rows
 * z_stride apart in (M, B, L) order), scaled by 1 / KD and normalised with ln_w, ln_b (M, P) when not NULL, as
 * gate_merge_*: no time-major y at all. */
static inline __attribute__((always_inline)) void mixer_scan_f32_range(const MixerScanParams *prm, int64_t P,
                                                                       int64_t N, int64_t R, int64_t lo, int64_t hi) {
    const int64_t L = prm->L, B = prm->B, G = prm->G, KD = prm->KD, z_stride = prm->z_stride;
    const float *z = prm->z, *ln_w = prm->ln_w, *ln_b = prm->ln_b;
    const double eps = prm->eps;
    float *out = prm->out;
    vf ubuf_v[TIME_CHUNK * FUSED_PMAX / W], ybuf_v[TIME_CHUNK * FUSED_PMAX / W];
    float xd[TIME_CHUNK * XMAX];
#define LANE(lane, tokens, first) \
    mixer_lane_f32(prm, P, N, R, lane, tokens, first, (float *)ubuf_v, xd, (float *)ybuf_v)
    for (int64_t item = lo; item < hi; ++item) {
        if (!out) {
            LANE(item, 0, 0);
            continue;
        }
        const int64_t M = G / KD, b = item / M, m = item % M;
        for (int64_t k = 0; k < KD; ++k) LANE(b * G + m * KD + k, out, k == 0);
        for (int64_t l = 0; l < L; ++l) {
            const int64_t token = (m * B + b) * L + l;
            gate_merge_f32_row(1, P, out, &token, z + token * z_stride, 1.0f / (float)KD, ln_w ? ln_w + m * P : 0,
                               ln_b ? ln_b + m * P : 0, eps, out + token * P);
        }
    }
#undef LANE
}

/* mixer_scan_f32_range with the channel count P, the state size N and the delta rank R as compile-time constants for
 * the shipped networks' mixers (2D: P 256, N 8 or 16, R 8; 3D: P 128, N 8, R 4), so that the loops over channels,
 * states and ranks unroll and their operands stay in registers; other shapes run the generic code. */
static void mixer_scan_f32_items(const MixerScanParams *prm, int64_t lo, int64_t hi) {
    const int64_t P = prm->P, N = prm->N, R = prm->R;
#define RANGE(p, n, r) mixer_scan_f32_range(prm, p, n, r, lo, hi)
    if (P == 256 && N == 8 && R == 8)
        RANGE(256, 8, 8);
    else if (P == 256 && N == 16 && R == 8)
        RANGE(256, 16, 8);
    else if (P == 128 && N == 8 && R == 4)
        RANGE(128, 8, 4);
    else
        RANGE(P, N, R);
#undef RANGE
}

/* Backward of the scan (training). The forward above stores, with ckpt not NULL, the state before every T-th step
 * (ckpt (ceil(L / T), lanes, N, P)); the backward walks the chunks of T steps from last to first, recomputes the
 * chunk's states from its checkpoint into a buffer, and runs the adjoint recurrence back through it:
 *     g_t   = gh_t + C_t gy_t                 (gh_t: adjoint reaching h_t from later steps; gh_{L-1} = glast)
 *     gh_{t-1} = exp(d_t A) g_t
 *     gC_t  += sum_p h_t gy_t,  gB_t += sum_p g_t d_t u_t,  gdu_t = sum_n B_t g_t
 *     gd_t  = gdu_t u_t + sum_n A g_t h_{t-1} exp(d_t A),  gA += g_t h_{t-1} exp(d_t A) d_t
 *     gdelta_t = gd_t * sigmoid(delta_t + bias) (softplus) or gd_t,  gu_t = gdu_t d_t + D gy_t
 * gy, gdelta, gu (L, lanes, P); gB, gC (L, lanes, N) contiguous, zeroed by the caller (the channel blocks of a lane
 * add into them); glast (lanes, N, P) or NULL; gA (lanes, N, P), gD and gbias (lanes, P): per-lane sums (the caller
 * adds the batch up). Work items are lanes lo..hi-1, so no two threads write the same gB/gC row. T * N <= TNMAX. */
#define TNMAX 256 /* T * N: the states of a recomputed chunk */
#define GHMAX 256 /* blocks * N: the adjoint carried per block group */


/* softplus(x) as vsoftplus, and sigmoid(x) (its derivative) from the same exponential. */
static inline vf vsoftplus_sigmoid(vf x, vf *sigmoid) {
    const vf e = vexp_neg_abs(x), w = e + 1.0f;
    const vi pos = x > 0.0f;
    *sigmoid = blend(pos, 1.0f / w, e / w);
    return blend(pos, x, splat(0.0f)) + vlog1p01(e);
}

/* One chunk (steps t0 .. t0 + steps - 1) of one block of w channels: recompute the states from the checkpoint h0,
 * then run the adjoint back through them. gh (N): adjoint reaching the chunk's last state, updated to the one
 * reaching the state before the chunk; gav (N), gdv, gbv: the block's running sums for gA, gD, gbias; accB, accC
 * (steps x N): this chunk's gB / gC terms, summed over the blocks of a group before one horizontal sum each. */
static inline __attribute__((always_inline)) void chunk_bwd_f32(
    int64_t t0, int64_t steps, int64_t P, int64_t N, int64_t row, int64_t bc_row, const float *delta, const float *u,
    const float *A, const float *Bm, const float *Cm, const float *D, const float *bias, int softplus,
    const float *h0, const float *gy, float *gdelta, float *gu, vf *gh, vf *gav, vf *gdv, vf *gbv, vf *accB,
    vf *accC, vf *hbuf, vf *ebuf, vf *dbuf, vf *sbuf, int64_t w) {
    vf a[NMAX], a2[NMAX];
    for (int64_t n = 0; n < N; ++n) {
        a[n] = load(A + n * P, w);
        a2[n] = a[n] * EXP2_SCALE; /* as the forward: the same states, bit for bit */
    }
    const vf bi = bias ? load(bias, w) : splat(0.0f), dk = D ? load(D, w) : splat(0.0f);
    for (int64_t s = 0; s < steps; ++s) { /* recompute the chunk's states */
        const int64_t t = t0 + s;
        const float *bt = Bm + t * bc_row;
        vf x = bi + load(delta + t * row, w), sg = splat(1.0f);
        const vf d = softplus ? vsoftplus_sigmoid(x, &sg) : x, du = d * load(u + t * row, w);
        dbuf[s] = d;
        sbuf[s] = sg;
        for (int64_t n = 0; n < N; ++n) {
            const vf e = vexp2_decay(d * a2[n]), hp = s ? hbuf[(s - 1) * N + n] : load(h0 + n * P, w);
            ebuf[s * N + n] = e;
            hbuf[s * N + n] = e * hp + du * bt[n];
        }
    }
    vf gdsum = *gdv, gbsum = *gbv;
    for (int64_t s = steps - 1; s >= 0; --s) { /* adjoint recurrence back through the chunk */
        const int64_t t = t0 + s;
        const float *bt = Bm + t * bc_row, *ct = Cm + t * bc_row;
        const vf gyt = load(gy + t * row, w), ut = load(u + t * row, w), d = dbuf[s], du = d * ut;
        vf gdu = splat(0.0f), gd = splat(0.0f);
        for (int64_t n = 0; n < N; ++n) {
            const vf g = gh[n] + ct[n] * gyt, e = ebuf[s * N + n];
            const vf hp = s ? hbuf[(s - 1) * N + n] : load(h0 + n * P, w);
            accC[s * N + n] += hbuf[s * N + n] * gyt;
            accB[s * N + n] += g * du;
            gdu += bt[n] * g;
            const vf gda = g * hp * e;
            gd += gda * a[n];
            gav[n] += gda * d;
            gh[n] = e * g;
        }
        gd += gdu * ut;
        const vf gx = gd * sbuf[s];
        gbsum += gx;
        gdsum += gyt * ut;
        store(gdelta + t * row, gx, w);
        store(gu + t * row, gdu * d + gyt * dk, w);
    }
    *gdv = gdsum;
    *gbv = gbsum;
}

#define CHUNK_BWD_F32_ARGS                                                                                        \
    int64_t t0, int64_t steps, int64_t P, int64_t N, int64_t row, int64_t bc_row, const float *delta,             \
        const float *u, const float *A, const float *Bm, const float *Cm, const float *D, const float *bias,       \
        int softplus, const float *h0, const float *gy, float *gdelta, float *gu, vf *gh, vf *gav, vf *gdv,        \
        vf *gbv, vf *accB, vf *accC, vf *hbuf, vf *ebuf, vf *dbuf, vf *sbuf
#define CHUNK_BWD_F32_CALL                                                                                        \
    t0, steps, P, N, row, bc_row, delta, u, A, Bm, Cm, D, bias, softplus, h0, gy, gdelta, gu, gh, gav, gdv, gbv, \
        accB, accC, hbuf, ebuf, dbuf, sbuf

static void chunk_bwd_f32_full(CHUNK_BWD_F32_ARGS) { chunk_bwd_f32(CHUNK_BWD_F32_CALL, W); }
static void chunk_bwd_f32_part(CHUNK_BWD_F32_ARGS, int64_t w) { chunk_bwd_f32(CHUNK_BWD_F32_CALL, w); }

/* Per lane: channel blocks in groups of up to GHMAX / N blocks; per group, chunks from last to first, and per chunk
 * every block of the group, so that the gB / gC terms of a chunk are summed over the group's channels as vectors
 * and reduced horizontally once. Buffers on the stack: (4 * GHMAX + 6 * TNMAX) vectors, 160 KB with W = 16 (threads
 * get 2 MB or more by default on Linux and 512 KB on macOS). */
static void scan_bwd_f32_range(const ScanBwdParams *prm, int64_t lo, int64_t hi) {
    const int64_t L = prm->L, lanes = prm->lanes, G = prm->G, P = prm->P, N = prm->N, T = prm->T;
    const int64_t bc_stride = prm->bc_stride;
    const float *delta = prm->delta, *u = prm->u, *A = prm->A, *B = prm->B, *C = prm->C, *D = prm->D;
    const float *bias = prm->bias, *ckpt = prm->ckpt, *gy = prm->gy, *glast = prm->glast;
    float *gdelta = prm->gdelta, *gu = prm->gu, *gB = prm->gB, *gC = prm->gC, *gA = prm->gA, *gD = prm->gD;
    float *gbias = prm->gbias;
    const int softplus = prm->softplus != 0;
    vf gh[GHMAX], gav[GHMAX], gdv[GHMAX], gbv[GHMAX];
    vf accB[TNMAX], accC[TNMAX], hbuf[TNMAX], ebuf[TNMAX], dbuf[TNMAX], sbuf[TNMAX];
    const int64_t row = lanes * P, ckpt_row = lanes * N * P, blocks = (P + W - 1) / W;
    const int64_t per_group = GHMAX / N > 0 ? GHMAX / N : 1;
    for (int64_t lane = lo; lane < hi; ++lane) {
        const int64_t g = lane % G, bc_row = lanes * bc_stride;
        const float *Bl = B + lane * bc_stride, *Cl = C + lane * bc_stride;
        for (int64_t b0 = 0; b0 < blocks; b0 += per_group) {
            const int64_t b1 = b0 + per_group < blocks ? b0 + per_group : blocks;
            for (int64_t b = b0; b < b1; ++b) {
                const int64_t p0 = b * W, w = P - p0 < W ? P - p0 : W, st = lane * N * P + p0;
                for (int64_t n = 0; n < N; ++n) {
                    gh[(b - b0) * N + n] = glast ? load(glast + st + n * P, w) : splat(0.0f);
                    gav[(b - b0) * N + n] = splat(0.0f);
                }
                gdv[b - b0] = gbv[b - b0] = splat(0.0f);
            }
            for (int64_t c = (L - 1) / T; c >= 0; --c) {
                const int64_t t0 = c * T, steps = L - t0 < T ? L - t0 : T;
                for (int64_t k = 0; k < steps * N; ++k) accB[k] = accC[k] = splat(0.0f);
                for (int64_t b = b0; b < b1; ++b) {
                    const int64_t p0 = b * W, off = lane * P + p0, st = lane * N * P + p0, j = b - b0;
                    const float *Dg = D ? D + g * P + p0 : 0, *bg = bias ? bias + g * P + p0 : 0;
#define ARGS t0, steps, P, N, row, bc_row, delta + off, u + off, A + g * N * P + p0, Bl, Cl, Dg, bg, softplus,  \
             ckpt + c * ckpt_row + st, gy + off, gdelta + off, gu + off, gh + j * N, gav + j * N, gdv + j, gbv + j, \
             accB, accC, hbuf, ebuf, dbuf, sbuf
                    if (P - p0 >= W)
                        chunk_bwd_f32_full(ARGS);
                    else
                        chunk_bwd_f32_part(ARGS, P - p0);
#undef ARGS
                }
                for (int64_t s = 0; s < steps; ++s) {
                    float *gbt = gB + ((t0 + s) * lanes + lane) * N, *gct = gC + ((t0 + s) * lanes + lane) * N;
                    for (int64_t n = 0; n < N; ++n) {
                        gbt[n] += hsum(accB[s * N + n]);
                        gct[n] += hsum(accC[s * N + n]);
                    }
                }
            }
            for (int64_t b = b0; b < b1; ++b) {
                const int64_t p0 = b * W, w = P - p0 < W ? P - p0 : W, st = lane * N * P + p0, j = b - b0;
                for (int64_t n = 0; n < N; ++n) store(gA + st + n * P, gav[j * N + n], w);
                store(gD + lane * P + p0, gdv[j], w);
                store(gbias + lane * P + p0, gbv[j], w);
            }
        }
    }
}


/* The scalar kernels (scan_scalar.h), instantiated for double: the float64 entry points. */
#define SCALAR_T double
#define SUFFIX f64
#define EXP exp
#define LOG1P log1p
#define FABS fabs
#define SQRT sqrt
#include "scan_scalar.h"
#undef SCALAR_T
#undef SUFFIX
#undef EXP
#undef LOG1P
#undef FABS
#undef SQRT

/* Exported entry points (scan_kernel.h): the work items lo..hi-1, split over nthreads OpenMP threads when the library
 * is built with -fopenmp (build.py links it to the OpenMP runtime PyTorch already loaded, so the kernel runs on the
 * threads that PyTorch's own operators use), else run on the calling thread (the caller splits them). */
/* The float32 entry points run with denormals flushed to zero (FTZ, DAZ) on each thread, restored on return: an
 * exp(d A) in the denormal range (d |A| between about 87 and 103, large steps) otherwise costs a microcode assist per
 * state, which made a whole mixer call 3x slower; the values are below 1.2e-38 either way. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
static inline unsigned denormals_off(void) {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);
    return csr;
}
static inline void denormals_restore(unsigned csr) { _mm_setcsr(csr); }
#else
static inline unsigned denormals_off(void) { return 0; }
static inline void denormals_restore(unsigned csr) { (void)csr; }
#endif
#define FLUSHED(call)                                  \
    do {                                               \
        const unsigned csr_ = denormals_off();         \
        call;                                          \
        denormals_restore(csr_);                       \
    } while (0)

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

/* Each entry point runs its kernel's range function on the items of each thread (the float32 ones with denormals
 * flushed): void NAME(const PARAMS *p, int64_t lo, int64_t hi, int64_t nthreads). */
#define DEFINE_ENTRY(name, Params, CALL)                                     \
    void name(const Params *p, int64_t lo, int64_t hi, int64_t nthreads) {   \
        (void)nthreads; /* unused without OpenMP: the caller splits the items */ \
        PARALLEL_RANGE(nthreads, lo, hi, CALL);                              \
    }
#define SCAN_F32(a, b) FLUSHED(scan_f32_range(p, a, b))
#define SCAN_F64(a, b) scan_f64_range(p, a, b)
#define SCAN_BWD_F32(a, b) FLUSHED(scan_bwd_f32_range(p, a, b))
#define SCAN_BWD_F64(a, b) scan_bwd_f64_range(p, a, b)
#define CONV_SILU_F32(a, b) FLUSHED(conv_silu_f32_range(p, a, b))
#define CONV_SILU_F64(a, b) conv_silu_f64_range(p, a, b)
#define GATE_MERGE_F32(a, b) FLUSHED(gate_merge_f32_range(p, a, b))
#define GATE_MERGE_F64(a, b) gate_merge_f64_range(p, a, b)
#define MIXER_SCAN_F32(a, b) FLUSHED(mixer_scan_f32_items(p, a, b))
DEFINE_ENTRY(scan_f32, ScanParams, SCAN_F32)
DEFINE_ENTRY(scan_f64, ScanParams, SCAN_F64)
DEFINE_ENTRY(scan_bwd_f32, ScanBwdParams, SCAN_BWD_F32)
DEFINE_ENTRY(scan_bwd_f64, ScanBwdParams, SCAN_BWD_F64)
DEFINE_ENTRY(conv_silu_f32, ConvSiluParams, CONV_SILU_F32)
DEFINE_ENTRY(conv_silu_f64, ConvSiluParams, CONV_SILU_F64)
DEFINE_ENTRY(gate_merge_f32, GateMergeParams, GATE_MERGE_F32)
DEFINE_ENTRY(gate_merge_f64, GateMergeParams, GATE_MERGE_F64)
DEFINE_ENTRY(mixer_scan_f32, MixerScanParams, MIXER_SCAN_F32)

/* The layout of scan_kernel.h's structs, for the test that compares it with binding.py's ctypes Structures:
 * kernel_struct_size(name) is sizeof (0 for an unknown name); kernel_struct_field(name, i, &offset) the name of field
 * i in declaration order and its offsetof (NULL past the last field). */
typedef struct {
    const char *name;
    int64_t offset;
} FieldInfo;
#define FIELD(S, f) {#f, (int64_t)offsetof(S, f)}
static const FieldInfo scan_fields[] = {
    FIELD(ScanParams, L), FIELD(ScanParams, lanes), FIELD(ScanParams, G), FIELD(ScanParams, P),
    FIELD(ScanParams, N), FIELD(ScanParams, delta), FIELD(ScanParams, u), FIELD(ScanParams, A),
    FIELD(ScanParams, B), FIELD(ScanParams, C), FIELD(ScanParams, bc_stride), FIELD(ScanParams, D),
    FIELD(ScanParams, bias), FIELD(ScanParams, softplus), FIELD(ScanParams, y), FIELD(ScanParams, h),
    FIELD(ScanParams, dtr), FIELD(ScanParams, dt_stride), FIELD(ScanParams, wdt), FIELD(ScanParams, R),
    FIELD(ScanParams, ckpt), FIELD(ScanParams, T), {0, 0}};
static const FieldInfo scan_bwd_fields[] = {
    FIELD(ScanBwdParams, L), FIELD(ScanBwdParams, lanes), FIELD(ScanBwdParams, G), FIELD(ScanBwdParams, P),
    FIELD(ScanBwdParams, N), FIELD(ScanBwdParams, T), FIELD(ScanBwdParams, delta), FIELD(ScanBwdParams, u),
    FIELD(ScanBwdParams, A), FIELD(ScanBwdParams, B), FIELD(ScanBwdParams, C), FIELD(ScanBwdParams, bc_stride),
    FIELD(ScanBwdParams, D), FIELD(ScanBwdParams, bias), FIELD(ScanBwdParams, softplus), FIELD(ScanBwdParams, ckpt),
    FIELD(ScanBwdParams, gy), FIELD(ScanBwdParams, glast), FIELD(ScanBwdParams, gdelta), FIELD(ScanBwdParams, gu),
    FIELD(ScanBwdParams, gB), FIELD(ScanBwdParams, gC), FIELD(ScanBwdParams, gA), FIELD(ScanBwdParams, gD),
    FIELD(ScanBwdParams, gbias), {0, 0}};
static const FieldInfo conv_silu_fields[] = {
    FIELD(ConvSiluParams, lanes), FIELD(ConvSiluParams, G), FIELD(ConvSiluParams, P), FIELD(ConvSiluParams, K),
    FIELD(ConvSiluParams, x), FIELD(ConvSiluParams, x_stride), FIELD(ConvSiluParams, index),
    FIELD(ConvSiluParams, taps), FIELD(ConvSiluParams, bias), FIELD(ConvSiluParams, out), {0, 0}};
static const FieldInfo gate_merge_fields[] = {
    FIELD(GateMergeParams, L), FIELD(GateMergeParams, B), FIELD(GateMergeParams, M), FIELD(GateMergeParams, K),
    FIELD(GateMergeParams, P), FIELD(GateMergeParams, y), FIELD(GateMergeParams, index), FIELD(GateMergeParams, z),
    FIELD(GateMergeParams, z_stride), FIELD(GateMergeParams, ln_w), FIELD(GateMergeParams, ln_b),
    FIELD(GateMergeParams, eps), FIELD(GateMergeParams, out), {0, 0}};
static const FieldInfo mixer_scan_fields[] = {
    FIELD(MixerScanParams, L), FIELD(MixerScanParams, B), FIELD(MixerScanParams, G), FIELD(MixerScanParams, P),
    FIELD(MixerScanParams, N), FIELD(MixerScanParams, R), FIELD(MixerScanParams, K), FIELD(MixerScanParams, x),
    FIELD(MixerScanParams, x_stride), FIELD(MixerScanParams, index), FIELD(MixerScanParams, taps),
    FIELD(MixerScanParams, conv_bias), FIELD(MixerScanParams, src), FIELD(MixerScanParams, src_stride),
    FIELD(MixerScanParams, wxt), FIELD(MixerScanParams, CP), FIELD(MixerScanParams, wdt),
    FIELD(MixerScanParams, dt_bias), FIELD(MixerScanParams, A), FIELD(MixerScanParams, D), FIELD(MixerScanParams, y),
    FIELD(MixerScanParams, h), FIELD(MixerScanParams, KD), FIELD(MixerScanParams, out), FIELD(MixerScanParams, z),
    FIELD(MixerScanParams, z_stride), FIELD(MixerScanParams, ln_w), FIELD(MixerScanParams, ln_b),
    FIELD(MixerScanParams, eps), {0, 0}};
#undef FIELD
static const struct {
    const char *name;
    int64_t size;
    const FieldInfo *fields;
} kernel_structs[] = {
    {"ScanParams", sizeof(ScanParams), scan_fields},
    {"ScanBwdParams", sizeof(ScanBwdParams), scan_bwd_fields},
    {"ConvSiluParams", sizeof(ConvSiluParams), conv_silu_fields},
    {"GateMergeParams", sizeof(GateMergeParams), gate_merge_fields},
    {"MixerScanParams", sizeof(MixerScanParams), mixer_scan_fields},
};

static const FieldInfo *struct_fields(const char *name, int64_t *size) {
    for (size_t s = 0; s < sizeof kernel_structs / sizeof kernel_structs[0]; ++s)
        if (strcmp(kernel_structs[s].name, name) == 0) {
            *size = kernel_structs[s].size;
            return kernel_structs[s].fields;
        }
    *size = 0;
    return 0;
}

int64_t kernel_struct_size(const char *name) {
    int64_t size;
    struct_fields(name, &size);
    return size;
}

const char *kernel_struct_field(const char *name, int64_t i, int64_t *offset) {
    int64_t size;
    const FieldInfo *fields = struct_fields(name, &size);
    if (!fields || i < 0) return 0;
    for (int64_t k = 0; k <= i; ++k)
        if (!fields[k].name) return 0;
    *offset = fields[i].offset;
    return fields[i].name;
}

int scan_nmax(void) { return NMAX; }
int scan_fused_pmax(void) { return FUSED_PMAX; }
int scan_xmax(void) { return XMAX; }
int scan_tnmax(void) { return TNMAX; }
int scan_width(void) { return W; }
/* The vector instruction set the float32 kernels were built for (compiled_scan_info()["isa"]). */
const char *scan_isa(void) {
#if defined(__AVX512F__)
    return "AVX-512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "AVX2+FMA";
#elif defined(__AVX__)
    return "AVX";
#elif defined(__SSE2__)
    return "SSE2";
#elif defined(__ARM_NEON)
    return "NEON";
#else
    return "generic";
#endif
}
int scan_kmax(void) { return KMAX; }
int scan_pmax(void) { return PMAX; }
