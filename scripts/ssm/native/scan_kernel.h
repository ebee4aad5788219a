/* The selective-scan kernels' interface: one parameter struct per kernel family, and each kernel's contract.
 *
 * Every kernel is exported in two element types, `<name>_f32` (float) and `<name>_f64` (double; the fused mixer
 * kernel only in float32), with one signature:
 *
 *     void <name>_f32(const <Family>Params *params, int64_t lo, int64_t hi, int64_t nthreads);
 *
 * It runs the work items lo..hi-1 (what an item is: per kernel, below), split over nthreads OpenMP threads when the
 * library is built with -fopenmp, else on the calling thread (the caller then splits the items over its own threads;
 * items never write the same output element, so any split gives the same result bit for bit).
 *
 * Pointers are untyped here: every array argument of a `_f32` entry point holds float32, of a `_f64` entry point
 * float64, except `index`, which is always int64. Arrays are C-contiguous in the stated shape unless a row stride is
 * given; "or NULL" marks an optional array. Shape letters: L time steps, lanes = batch * G scan lanes (lane
 * = b * G + g), G groups (the B / C sharing groups, in the mixers the direction-member sequences), P channels per
 * group, N states, R rank of the low-rank delta, K convolution width (or directions in the merge), M members.
 *
 * scripts/ssm/native/binding.py declares the matching ctypes Structures; kernel_struct_size and kernel_struct_field
 * (end of scan_kernel.c) report this header's layout so that a test can compare the two.
 */
#ifndef CLINICALFMAMBA_SCAN_KERNEL_H
#define CLINICALFMAMBA_SCAN_KERNEL_H

#include <stdint.h>

/* scan_f32 / scan_f64: the selective scan, forward, per (lane, block of W channels):
 *     d_t = softplus(delta_t + bias) (softplus != 0) or delta_t + bias
 *     h_t = exp(d_t * A) * h_{t-1} + d_t * u_t * B_t        y_t = <C_t, h_t> + D * u_t
 * Work items: lanes * ceil(P / W) channel blocks (W: scan_width()). Written: y, h, and ckpt when not NULL. */
typedef struct {
    int64_t L, lanes, G, P, N;
    const void *delta; /* (L, lanes, P); not read when dtr is not NULL */
    const void *u;     /* (L, lanes, P) */
    const void *A;     /* (G, N, P): the state matrix transposed */
    const void *B, *C; /* element (t, lane, n) at (t * lanes + lane) * bc_stride + n (row views of a projection) */
    int64_t bc_stride;
    const void *D, *bias; /* (G, P) or NULL: skip and delta bias */
    int64_t softplus;     /* 0 or 1 */
    void *y;              /* (L, lanes, P), written */
    void *h;              /* (lanes, N, P): initial state in, last state out */
    const void *dtr;      /* low-rank delta or NULL: element (t, lane, r) at (t * lanes + lane) * dt_stride + r, */
    int64_t dt_stride;    /* then delta_t[p] = sum_r dtr[t, lane, r] * wdt[g, r, p] (Mamba's dt projection)      */
    const void *wdt;      /* (G, R, P) */
    int64_t R;
    void *ckpt; /* (ceil(L / T), lanes, N, P) or NULL: the state before every T-th step, written (for the backward) */
    int64_t T;
} ScanParams;

/* scan_bwd_f32 / scan_bwd_f64: the scan's backward from the checkpoints of scan_* (same delta .. softplus, A
 * (G, N, P)), chunks of T steps from last to first, each recomputed from its checkpoint (T * N <= scan_tnmax()).
 * Work items: lanes.
 * Written: gdelta, gu (L, lanes, P); gB, gC (L, lanes, N), added into (the caller zeroes them); gA (lanes, N, P), gD
 * and gbias (lanes, P): per-lane sums (the caller adds the batch up). */
typedef struct {
    int64_t L, lanes, G, P, N, T;
    const void *delta, *u, *A, *B, *C;
    int64_t bc_stride;
    const void *D, *bias;
    int64_t softplus;
    const void *ckpt;  /* (ceil(L / T), lanes, N, P) from the forward */
    const void *gy;    /* (L, lanes, P) */
    const void *glast; /* (lanes, N, P) or NULL: gradient of the last state */
    void *gdelta, *gu, *gB, *gC, *gA, *gD, *gbias;
} ScanBwdParams;

/* conv_silu_f32 / conv_silu_f64: Mamba's causal depthwise convolution along time, then SiLU:
 *     out_t = silu(bias + sum_{k < K, k <= t} taps[K - 1 - k] * x_{t - k})
 * Row (t, lane) of x is row t * lanes + lane, or row index[t * lanes + lane] when index is not NULL (the mixers'
 * direction gather), rows x_stride apart. K <= scan_kmax(). Work items: time steps. Written: out. */
typedef struct {
    int64_t lanes, G, P, K;
    const void *x;
    int64_t x_stride;
    const int64_t *index; /* (L, lanes) int64 row numbers of x, or NULL */
    const void *taps;     /* (K, G, P) */
    const void *bias;     /* (G, P) */
    void *out;            /* (L, lanes, P) */
} ConvSiluParams;

/* gate_merge_f32 / gate_merge_f64: from scan directions back to tokens, with the output gate:
 *     out[m, b, l, :] = (1 / K) sum_k y[index[l, b, m, k], :] * silu(z[m, b, l, :])
 * then, with ln_w and ln_b, LayerNorm over P with member m's affine (P <= scan_pmax()). Work items: token
 * positions l. Written: out. */
typedef struct {
    int64_t L, B, M, K, P;
    const void *y;        /* rows of P */
    const int64_t *index; /* (L, B, M, K) int64 row numbers of y */
    const void *z;        /* rows of P, z_stride apart, in (M, B, L) order */
    int64_t z_stride;
    const void *ln_w, *ln_b; /* (M, P) or NULL */
    double eps;
    void *out; /* (M, B, L, P) */
} GateMergeParams;

/* mixer_scan_f32 (float32 only): a mixer between its input projection and its merge, for inference:
 *     u_t = silu(causal conv of the gathered token rows)            (as conv_silu_*)
 *     x_t = W_x[g] s_t, s_t = u_t or the gathered source row         (the x projection: dt (R), B (N), C (N))
 *     y_t = the scan (as scan_*, softplus on) with the low-rank delta, B and C from x_t
 * Without out: work items are lanes, y (L, lanes, P) is written. With out: work items are the B * M (batch, member)
 * sets (b = item / M); the KD direction lanes of a set add into their token rows of out (M, B, L, P), which are then
 * gated and normalised as gate_merge_* (z, ln_w, ln_b, eps); y is not used. P <= scan_fused_pmax(),
 * R + 2 N <= scan_xmax(), N <= scan_nmax(), K <= scan_kmax(). Written: y or out, and h. */
typedef struct {
    int64_t L, B, G, P, N, R, K;
    const void *x; /* token rows, x_stride apart */
    int64_t x_stride;
    const int64_t *index;  /* (L, B * G) int64 token row numbers */
    const void *taps;      /* (K, G, P) */
    const void *conv_bias; /* (G, P) */
    const void *src;       /* source token rows, src_stride apart, or NULL (cross-modal mixers) */
    int64_t src_stride;
    const void *wxt; /* (G, P, CP): the x projection transposed, its R + 2N columns zero-padded to CP (multiple of W) */
    int64_t CP;
    const void *wdt;     /* (G, R, P) */
    const void *dt_bias; /* (G, P) */
    const void *A;       /* (G, N, P) */
    const void *D;       /* (G, P) or NULL */
    void *y;             /* (L, B * G, P) or NULL */
    void *h;             /* (B * G, N, P): zero in, last state out */
    int64_t KD;          /* directions per member (with out) */
    void *out;           /* (M, B, L, P) or NULL */
    const void *z;       /* rows of P, z_stride apart, (M, B, L) order */
    int64_t z_stride;
    const void *ln_w, *ln_b; /* (M, P) or NULL */
    double eps;
} MixerScanParams;

#endif
