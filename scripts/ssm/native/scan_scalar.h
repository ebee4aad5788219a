/* The scalar kernels, one definition for every element type: included by scan_kernel.c once per type with
 *     SCALAR_T  the element type (double)
 *     SUFFIX    the name suffix of the functions it defines (f64: scan_f64_range, ...)
 *     EXP, LOG1P, FABS, SQRT  the C library functions of that type (exp, log1p, fabs, sqrt)
 * It defines <kernel>_<SUFFIX>_range(params, lo, hi) for the scan, its backward, the causal convolution + SiLU and the
 * gated merge, with the contracts of scan_kernel.h (work items as there). One (channel, lane) at a time, in the
 * order of the reference scan; accuracy over speed. No include guard: it is meant to be included more than once. */
#ifndef SCALAR_T
#error "define SCALAR_T, SUFFIX, EXP, LOG1P, FABS and SQRT before including scan_scalar.h"
#endif
#define SCALAR_CAT_(name, suffix) name##_##suffix##_range
#define SCALAR_CAT(name, suffix) SCALAR_CAT_(name, suffix)
#define FN(name) SCALAR_CAT(name, SUFFIX) /* FN(scan): scan_f64_range */

/* The recurrence of scan_kernel.h (ScanParams); work items are (lane, block of W channels), as the vector kernel's. */
static void FN(scan)(const ScanParams *prm, int64_t lo, int64_t hi) {
    const int64_t L = prm->L, lanes = prm->lanes, G = prm->G, P = prm->P, N = prm->N, bc_stride = prm->bc_stride;
    const int64_t dt_stride = prm->dt_stride, R = prm->R, T = prm->T;
    const SCALAR_T *delta = prm->delta, *u = prm->u, *A = prm->A, *B = prm->B, *C = prm->C, *D = prm->D;
    const SCALAR_T *bias = prm->bias;
    const SCALAR_T *dtr = prm->dtr, *wdt = prm->wdt;
    SCALAR_T *y = prm->y, *h = prm->h, *ckpt = prm->ckpt;
    const int softplus = prm->softplus != 0;

    const int64_t blocks = (P + W - 1) / W, row = lanes * P, ckpt_row = lanes * N * P;
    for (int64_t item = lo; item < hi; ++item) {
        const int64_t lane = item / blocks, p0 = (item % blocks) * W, g = lane % G;
        const int64_t w = P - p0 < W ? P - p0 : W;
        for (int64_t p = p0; p < p0 + w; ++p) {
            SCALAR_T *hp = h + lane * N * P + p;
            const SCALAR_T *ap = A + g * N * P + p;
            const SCALAR_T bi = bias ? bias[g * P + p] : (SCALAR_T)0, dk = D ? D[g * P + p] : (SCALAR_T)0;
            for (int64_t t = 0; t < L; ++t) {
                const SCALAR_T *bt = B + (t * lanes + lane) * bc_stride, *ct = C + (t * lanes + lane) * bc_stride;
                if (ckpt && t % T == 0)
                    for (int64_t n = 0; n < N; ++n) ckpt[(t / T) * ckpt_row + lane * N * P + n * P + p] = hp[n * P];
                SCALAR_T x = bi;
                if (dtr) {
                    const SCALAR_T *dr = dtr + (t * lanes + lane) * dt_stride, *wp = wdt + g * R * P + p;
                    for (int64_t r = 0; r < R; ++r) x += dr[r] * wp[r * P];
                } else {
                    x += delta[t * row + lane * P + p];
                }
                const SCALAR_T ut = u[t * row + lane * P + p];
                const SCALAR_T d = softplus ? (x > (SCALAR_T)0 ? x : (SCALAR_T)0) + LOG1P(EXP(-FABS(x))) : x;
                SCALAR_T yv = dk * ut;
                for (int64_t n = 0; n < N; ++n) {
                    hp[n * P] = EXP(d * ap[n * P]) * hp[n * P] + d * ut * bt[n];
                    yv += ct[n] * hp[n * P];
                }
                y[t * row + lane * P + p] = yv;
            }
        }
    }
}

/* Causal convolution + SiLU (ConvSiluParams); work items are time steps. */
static void FN(conv_silu)(const ConvSiluParams *prm, int64_t lo, int64_t hi) {
    const int64_t lanes = prm->lanes, G = prm->G, P = prm->P, K = prm->K, x_stride = prm->x_stride;
    const int64_t *index = prm->index;
    const SCALAR_T *x = prm->x, *taps = prm->taps, *bias = prm->bias;
    SCALAR_T *out = prm->out;

    const int64_t row = lanes * P;
    for (int64_t t = lo; t < hi; ++t) {
        const int64_t kmax = t + 1 < K ? t + 1 : K;
        for (int64_t lane = 0; lane < lanes; ++lane) {
            const int64_t g = lane % G;
            for (int64_t p = 0; p < P; ++p) {
                SCALAR_T acc = bias[g * P + p];
                for (int64_t k = 0; k < kmax; ++k)
                    acc += taps[((K - 1 - k) * G + g) * P + p] * CONV_ROW(x, t - k, lane)[p];
                out[t * row + lane * P + p] = acc / ((SCALAR_T)1 + EXP(-acc));
            }
        }
    }
}

/* Gated merge with the optional LayerNorm (GateMergeParams); work items are token positions. */
static void FN(gate_merge)(const GateMergeParams *prm, int64_t lo, int64_t hi) {
    const int64_t L = prm->L, B = prm->B, M = prm->M, K = prm->K, P = prm->P, z_stride = prm->z_stride;
    const int64_t *index = prm->index;
    const SCALAR_T *y = prm->y, *z = prm->z, *ln_w = prm->ln_w, *ln_b = prm->ln_b;
    const double eps = prm->eps;
    SCALAR_T *out = prm->out;

    for (int64_t l = lo; l < hi; ++l)
        for (int64_t b = 0; b < B; ++b)
            for (int64_t m = 0; m < M; ++m) {
                const int64_t token = (m * B + b) * L + l;
                const int64_t *idx = index + ((l * B + b) * M + m) * K;
                SCALAR_T *o = out + token * P, mean = (SCALAR_T)0, var = (SCALAR_T)0;
                for (int64_t p = 0; p < P; ++p) {
                    SCALAR_T acc = (SCALAR_T)0;
                    for (int64_t k = 0; k < K; ++k) acc += y[idx[k] * P + p];
                    const SCALAR_T zv = z[token * z_stride + p];
                    o[p] = acc / (SCALAR_T)K * (zv / ((SCALAR_T)1 + EXP(-zv)));
                    mean += o[p];
                }
                if (!ln_w) continue;
                mean /= (SCALAR_T)P;
                for (int64_t p = 0; p < P; ++p) var += (o[p] - mean) * (o[p] - mean);
                const SCALAR_T inv = (SCALAR_T)1 / SQRT(var / (SCALAR_T)P + (SCALAR_T)eps);
                for (int64_t p = 0; p < P; ++p) o[p] = (o[p] - mean) * inv * ln_w[m * P + p] + ln_b[m * P + p];
            }
}

/* Backward of the scan (ScanBwdParams); work items are lanes. */
static void FN(scan_bwd)(const ScanBwdParams *prm, int64_t lo, int64_t hi) {
    const int64_t L = prm->L, lanes = prm->lanes, G = prm->G, P = prm->P, N = prm->N, T = prm->T;
    const int64_t bc_stride = prm->bc_stride;
    const SCALAR_T *delta = prm->delta, *u = prm->u, *A = prm->A, *B = prm->B, *C = prm->C, *D = prm->D;
    const SCALAR_T *bias = prm->bias;
    const SCALAR_T *ckpt = prm->ckpt, *gy = prm->gy, *glast = prm->glast;
    SCALAR_T *gdelta = prm->gdelta, *gu = prm->gu, *gB = prm->gB, *gC = prm->gC, *gA = prm->gA, *gD = prm->gD;
    SCALAR_T *gbias = prm->gbias;
    const int softplus = prm->softplus != 0;

    SCALAR_T hbuf[TNMAX], ebuf[TNMAX], dbuf[TNMAX], sbuf[TNMAX], gh[NMAX], gav[NMAX];
    const int64_t row = lanes * P, ckpt_row = lanes * N * P;
    for (int64_t lane = lo; lane < hi; ++lane) {
        const int64_t g = lane % G;
        for (int64_t p = 0; p < P; ++p) {
            const int64_t st = lane * N * P + p;
            const SCALAR_T *ap = A + g * N * P + p;
            const SCALAR_T bi = bias ? bias[g * P + p] : (SCALAR_T)0, dk = D ? D[g * P + p] : (SCALAR_T)0;
            SCALAR_T gdv = (SCALAR_T)0, gbv = (SCALAR_T)0;
            for (int64_t n = 0; n < N; ++n) {
                gh[n] = glast ? glast[st + n * P] : (SCALAR_T)0;
                gav[n] = (SCALAR_T)0;
            }
            for (int64_t c = (L - 1) / T; c >= 0; --c) {
                const int64_t t0 = c * T, steps = L - t0 < T ? L - t0 : T;
                const SCALAR_T *h0 = ckpt + c * ckpt_row + st;
                for (int64_t s = 0; s < steps; ++s) {
                    const int64_t t = t0 + s;
                    const SCALAR_T *bt = B + (t * lanes + lane) * bc_stride;
                    const SCALAR_T x = bi + delta[t * row + lane * P + p];
                    SCALAR_T d = x, sg = (SCALAR_T)1;
                    if (softplus) {
                        const SCALAR_T e = EXP(-FABS(x));
                        d = (x > (SCALAR_T)0 ? x : (SCALAR_T)0) + LOG1P(e);
                        sg = x > (SCALAR_T)0 ? (SCALAR_T)1 / ((SCALAR_T)1 + e) : e / ((SCALAR_T)1 + e);
                    }
                    dbuf[s] = d;
                    sbuf[s] = sg;
                    const SCALAR_T du = d * u[t * row + lane * P + p];
                    for (int64_t n = 0; n < N; ++n) {
                        const SCALAR_T e = EXP(d * ap[n * P]), hp = s ? hbuf[(s - 1) * N + n] : h0[n * P];
                        ebuf[s * N + n] = e;
                        hbuf[s * N + n] = e * hp + du * bt[n];
                    }
                }
                for (int64_t s = steps - 1; s >= 0; --s) {
                    const int64_t t = t0 + s, at = t * row + lane * P + p;
                    const SCALAR_T *bt = B + (t * lanes + lane) * bc_stride, *ct = C + (t * lanes + lane) * bc_stride;
                    SCALAR_T *gbt = gB + (t * lanes + lane) * N, *gct = gC + (t * lanes + lane) * N;
                    const SCALAR_T gyt = gy[at], ut = u[at], d = dbuf[s], du = d * ut;
                    SCALAR_T gdu = (SCALAR_T)0, gd = (SCALAR_T)0;
                    for (int64_t n = 0; n < N; ++n) {
                        const SCALAR_T gn = gh[n] + ct[n] * gyt, e = ebuf[s * N + n];
                        const SCALAR_T hp = s ? hbuf[(s - 1) * N + n] : h0[n * P];
                        gct[n] += hbuf[s * N + n] * gyt;
                        gbt[n] += gn * du;
                        gdu += bt[n] * gn;
                        const SCALAR_T gda = gn * hp * e;
                        gd += gda * ap[n * P];
                        gav[n] += gda * d;
                        gh[n] = e * gn;
                    }
                    gd += gdu * ut;
                    gdelta[at] = gd * sbuf[s];
                    gbv += gdelta[at];
                    gdv += gyt * ut;
                    gu[at] = gdu * d + gyt * dk;
                }
            }
            for (int64_t n = 0; n < N; ++n) gA[st + n * P] = gav[n];
            gD[lane * P + p] = gdv;
            gbias[lane * P + p] = gbv;
        }
    }
}

#undef FN
#undef SCALAR_CAT
#undef SCALAR_CAT_
