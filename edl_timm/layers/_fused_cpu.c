/* Fused elementwise passes of the EDL solver on CPU (float32, contiguous tensors).

   Eager PyTorch spends one full memory pass per elementwise op (normalise, clamp, lerp, residual
   add, relu, rescale, and about twice as many in backward); together they cost 20-40% on top of
   the convolutions. Each function here does one of the solver's elementwise stages in a single
   pass (two where a per-sample reduction must finish first). The convolutions stay with PyTorch.

   Layout: N blocks of G consecutive values; a block is one sample of a convolution's (C, H, W)
   input or one row of a linear layer's input, and s[n] is that block's scale (its RMS). A NULL s
   means no input normalisation. The reweighting is
       f(r) = w r + (1 - w) clamp(r, -e, e),   f'(r) = w + (1 - w) [|r| < e],   df/dw = r - clamp(r).
   Built by edl_timm/layers/_fused.py with gcc -O3 -fopenmp; it shares torch's OpenMP runtime. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define CHUNK 32768 /* values per work item: big enough to amortise scheduling, small enough to split a sample */

static inline float clampf(float r, float e) { return r < -e ? -e : (r > e ? e : r); }
/* The reweighting f(r), its derivative applied to a gradient g, and df/dw = r - clamp(r). */
static inline float reweight(float r, float w, float e) { return w * r + (1.f - w) * clampf(r, e); }
static inline float reweight_back(float r, float g, float w, float e) { return (r > -e && r < e) ? g : w * g; }
static inline float reweight_dw(float r, float e) { return r - clampf(r, e); }

/* Reductions carry `omp simd reduction` so that gcc may reorder the sums and vectorise them
   (without -ffast-math it keeps float additions in order, one lane at a time). Work items are
   (block, chunk) pairs, so that a few large samples and many small rows both spread over the
   threads. */
static inline int64_t chunks_per_block(int64_t G) { return (G + CHUNK - 1) / CHUNK; }

/* Block n's total of the per-chunk partial sums part[n * C + c], in double. */
static inline double block_sum(const double *part, int64_t n, int64_t C) {
    double a = 0.0;
    for (int64_t c = 0; c < C; ++c) a += part[n * C + c];
    return a;
}

/* Sum of squares of xb[lo..hi). */
static inline float sum_sq(const float *xb, int64_t lo, int64_t hi) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = lo; i < hi; ++i) acc += xb[i] * xb[i];
    return acc;
}

/* The floored RMS from a sum of squares over G values (the eager path's _floored_rms). */
static inline float floored_rms(double sumsq, int64_t G) { return (float)sqrt(sumsq / (double)G + 1e-10); }

/* First step's map over xb[lo..hi): p = f(x / s), or x / s when has_rw == 0 (inv = 1 / s). */
static inline void first_map(const float *xb, float *pb, int64_t lo, int64_t hi, float inv, float w, float e, int has_rw) {
    if (has_rw) {
        for (int64_t i = lo; i < hi; ++i) pb[i] = reweight(xb[i] * inv, w, e);
    } else {
        for (int64_t i = lo; i < hi; ++i) pb[i] = xb[i] * inv;
    }
}

/* A per-sample reduction followed by a map over the same sample costs one trip to memory instead
   of two when each thread takes whole samples that stay in its L2 cache between the two loops. */
#define SAMPLE_IN_CACHE 131072 /* values per array per sample: 3 arrays of 512 KB */
static inline int whole_samples(int64_t N, int64_t G) { return G <= SAMPLE_IN_CACHE && N >= 2 * omp_get_max_threads(); }

/* s[n] = sqrt(sum(x_n^2) / G + 1e-10): the floored RMS (same rule as the eager path). */
static void edl_rms(const float *x, int64_t N, int64_t G, float *s) {
    const int64_t C = chunks_per_block(G), items = N * C;
    double *part = (double *)malloc(sizeof(double) * (size_t)items);
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t n = it / C, lo = (it % C) * CHUNK, hi = lo + CHUNK < G ? lo + CHUNK : G;
        part[it] = sum_sq(x + n * G, lo, hi);
    }
    for (int64_t n = 0; n < N; ++n) s[n] = floored_rms(block_sum(part, n, C), G);
    free(part);
}

/* First step: p = f(x / s) (or x / s when has_rw == 0). */
static void edl_first_chunks(const float *x, const float *s, int64_t N, int64_t G, float w, float e, int has_rw, float *p) {
    const int64_t C = chunks_per_block(G), items = N * C;
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t n = it / C, lo = (it % C) * CHUNK, hi = lo + CHUNK < G ? lo + CHUNK : G;
        first_map(x + n * G, p + n * G, lo, hi, s ? 1.f / s[n] : 1.f, w, e, has_rw);
    }
}

/* First step with the input normalisation: s = edl_rms(x), p = f(x / s); s may be NULL (no
   normalisation). */
void edl_first(const float *x, int64_t N, int64_t G, float w, float e, int has_rw, float *s, float *p) {
    if (!s || !whole_samples(N, G)) {
        if (s) edl_rms(x, N, G, s);
        edl_first_chunks(x, s, N, G, w, e, has_rw, p);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const float *xb = x + n * G;
        s[n] = floored_rms(sum_sq(xb, 0, G), G);
        first_map(xb, p + n * G, 0, G, 1.f / s[n], w, e, has_rw);
    }
}

/* Later steps: q holds A*(z); r = x / s - q and then p = f(r) are written over q (the backward
   recovers what it needs of r from p: f is strictly increasing for w > 0, and f'(r) depends only
   on whether |r| < e, which is whether |p| < e). */
void edl_residual(float *q, const float *x, const float *s, int64_t N, int64_t G, float w, float e, int has_rw) {
    const int64_t C = chunks_per_block(G), items = N * C;
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t n = it / C, lo = (it % C) * CHUNK, hi = lo + CHUNK < G ? lo + CHUNK : G;
        const float inv = s ? 1.f / s[n] : 1.f, *xb = x + n * G;
        float *qb = q + n * G;
        if (has_rw) {
            for (int64_t i = lo; i < hi; ++i) {
                const float r = xb[i] * inv - qb[i];
                qb[i] = reweight(r, w, e);
            }
        } else {
            for (int64_t i = lo; i < hi; ++i) qb[i] = xb[i] * inv - qb[i];
        }
    }
}

/* Code update, in place: v = relu(m v + z - thr), where v holds the analysis A(p) with unit atoms
   and m the step size times the reweighting constant (z may be NULL: the first step); times s[n]
   when s is given (the last step rescales the code to the input's scale), plus bias[i] when
   given (the layer's bias laid out over one block: the last step). */
void edl_code(float *v, const float *z, const float *s, int64_t N, int64_t G, float m, float thr, const float *bias) {
    const int64_t C = chunks_per_block(G), items = N * C;
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t n = it / C, lo = (it % C) * CHUNK, hi = lo + CHUNK < G ? lo + CHUNK : G;
        const float sc = s ? s[n] : 1.f;
        float *vb = v + n * G;
        const float *zb = z ? z + n * G : 0;
        if (zb) {
            for (int64_t i = lo; i < hi; ++i) { const float a = m * vb[i] + zb[i] - thr; vb[i] = a > 0.f ? a * sc : 0.f; }
        } else {
            for (int64_t i = lo; i < hi; ++i) { const float a = m * vb[i] - thr; vb[i] = a > 0.f ? a * sc : 0.f; }
        }
        if (bias) {
            for (int64_t i = lo; i < hi; ++i) vb[i] += bias[i];
        }
    }
}

/* Backward of the output stage out = s * relu(m v + ...) + bias: with c = out - bias (the scaled
   code), gv = m * g * s * [c > 0] (the gradient of the analysis output v, which the convolution's
   backward takes) and, when s is given, gs[n] = sum(g * c) / s[n] (the code's share of the scale's
   gradient). bias may be NULL. */
void edl_out_grad(const float *g, const float *out, const float *s, int64_t N, int64_t G, float m, const float *bias,
                  float *gv, float *gs) {
    const int64_t C = chunks_per_block(G), items = N * C;
    double *part = s ? (double *)malloc(sizeof(double) * (size_t)items) : 0;
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t n = it / C, lo = (it % C) * CHUNK, hi = lo + CHUNK < G ? lo + CHUNK : G;
        const float sc = (s ? s[n] : 1.f) * m, *gb = g + n * G, *ob = out + n * G;
        float *vb = gv + n * G, acc = 0.f;
        if (bias) {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = lo; i < hi; ++i) {
                const float gi = gb[i], c = ob[i] - bias[i];
                acc += gi * c;
                vb[i] = c > 0.f ? gi * sc : 0.f;
            }
        } else {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = lo; i < hi; ++i) {
                const float gi = gb[i], c = ob[i];
                acc += gi * c;
                vb[i] = c > 0.f ? gi * sc : 0.f;
            }
        }
        if (part) part[it] = acc;
    }
    if (part) {
        for (int64_t n = 0; n < N; ++n) {
            gs[n] = (float)(block_sum(part, n, C) / (double)s[n]);
        }
        free(part);
    }
}

/* Backward of p = f(r), from p, in place: gp <- gp * f'(r). Returns the lerp weight's gradient
   sum(gp * (r - clamp(r))) = sum(gp * (p - clamp(p))) / w (outside the clamp, p - sign(p) e =
   w (r - sign(r) e)); 0 when w = 0, where f is a plain clamp and w is not learned. */
double edl_reweight_grad(float *gp, const float *p, int64_t n, float w, float e) {
    const int64_t items = chunks_per_block(n); /* one block of n values */
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t lo = it * CHUNK, hi = lo + CHUNK < n ? lo + CHUNK : n;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = lo; i < hi; ++i) {
            const float pi = p[i], gi = gp[i];
            acc += gi * reweight_dw(pi, e);
            gp[i] = reweight_back(pi, gi, w, e);
        }
        total += acc;
    }
    return w > 0.f ? total / (double)w : 0.0;
}

/* Backward through z_t (t >= 1), in place: gz <- (gv - m gz) * [z > 0], where gz is the gradient
   through the synthesis A*(z) (which the residual subtracts) and gv = m * (the gradient through
   the skip connection of the next step): the result is m times the gradient of z_t's pre-threshold
   value, what the previous analysis's backward takes. */
void edl_mask_sub(float *gz, const float *gv, const float *z, int64_t n, float m) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) gz[i] = z[i] > 0.f ? gv[i] - m * gz[i] : 0.f;
}

/* Pass 1 over values lo..hi of one sample; returns the lerp weight's share, *acc_d the dot.
   has_rw and has_u are constants after inlining: gcc does not vectorise a loop that tests them
   (a conditional load of ub is control flow it cannot if-convert), and the scalar loop with its
   data-dependent branches ran 6x slower than a copy (11 ms for a 64x64x32x32 input). */
static inline __attribute__((always_inline)) float pass1_loop(float *pb, const float *xb, const float *ub, int64_t lo,
                                                              int64_t hi, float inv, float w, float e, const int has_rw,
                                                              const int has_u, float *acc_d) {
    float acc_w = 0.f, d = 0.f;
#pragma omp simd reduction(+ : acc_w, d)
    for (int64_t i = lo; i < hi; ++i) {
        const float xi = xb[i], r = xi * inv, gi = pb[i];
        float gr = gi;
        if (has_rw) {
            acc_w += gi * reweight_dw(r, e);
            gr = reweight_back(r, gi, w, e);
        }
        if (has_u) gr += ub[i];
        d += gr * xi;
        pb[i] = gr;
    }
    *acc_d = d;
    return acc_w;
}

static inline float first_grad_pass1(float *pb, const float *xb, const float *ub, int64_t lo, int64_t hi, float inv,
                                    float w, float e, int has_rw, float *acc_d) {
    if (has_rw) {
        return ub ? pass1_loop(pb, xb, ub, lo, hi, inv, w, e, 1, 1, acc_d)
                  : pass1_loop(pb, xb, ub, lo, hi, inv, w, e, 1, 0, acc_d);
    }
    return ub ? pass1_loop(pb, xb, ub, lo, hi, inv, w, e, 0, 1, acc_d)
              : pass1_loop(pb, xb, ub, lo, hi, inv, w, e, 0, 0, acc_d);
}

/* k[n] of pass 2, from the sample's dot d = sum(gut * x). */
static inline float scale_term(float gs, double d, double sn, int64_t G) {
    return (float)(((double)gs - d / (sn * sn)) / ((double)G * sn));
}

/* Backward of the first step and of the input normalisation.
   gp: gradient of p_0 = f(x / s), overwritten with the input gradient. gu: the gradient already
   collected for u = x / s by the later steps' residuals (NULL when T = 1). gs: the output's share
   of the scale's gradient (unused without s). Returns the lerp weight's gradient.
   Pass 1: gut = f'(u) gp + gu, dot[n] = sum(gut * x). Pass 2: gx = gut / s + k[n] x with
   k[n] = (gs[n] - dot[n] / s[n]^2) / (G s[n]), from s = sqrt(|x|^2 / G + 1e-10). */
static double edl_first_grad_chunks(float *gp, const float *x, const float *s, const float *gu, const float *gs,
                      int64_t N, int64_t G, float w, float e, int has_rw) {
    const int64_t C = chunks_per_block(G), items = N * C;
    double *part = s ? (double *)malloc(sizeof(double) * (size_t)items) : 0;
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t n = it / C, lo = (it % C) * CHUNK, hi = lo + CHUNK < G ? lo + CHUNK : G;
        const float inv = s ? 1.f / s[n] : 1.f, *ub = gu ? gu + n * G : 0;
        float acc_d;
        total += first_grad_pass1(gp + n * G, x + n * G, ub, lo, hi, inv, w, e, has_rw, &acc_d);
        if (part) part[it] = acc_d;
    }
    if (part) {
        float *k = (float *)malloc(sizeof(float) * (size_t)N);
        for (int64_t n = 0; n < N; ++n) {
            k[n] = scale_term(gs[n], block_sum(part, n, C), s[n], G);
        }
#pragma omp parallel for schedule(static)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t n = it / C, lo = (it % C) * CHUNK, hi = lo + CHUNK < G ? lo + CHUNK : G;
            const float inv = 1.f / s[n], kn = k[n], *xb = x + n * G;
            float *pb = gp + n * G;
            for (int64_t i = lo; i < hi; ++i) pb[i] = pb[i] * inv + kn * xb[i];
        }
        free(k);
        free(part);
    }
    return total;
}

double edl_first_grad(float *gp, const float *x, const float *s, const float *gu, const float *gs,
                      int64_t N, int64_t G, float w, float e, int has_rw) {
    if (!s || !whole_samples(N, G)) return edl_first_grad_chunks(gp, x, s, gu, gs, N, G, w, e, has_rw);
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t n = 0; n < N; ++n) {
        const float *xb = x + n * G, *ub = gu ? gu + n * G : 0;
        float *pb = gp + n * G, d;
        const float inv = 1.f / s[n];
        total += first_grad_pass1(pb, xb, ub, 0, G, inv, w, e, has_rw, &d);
        const float kn = scale_term(gs[n], d, s[n], G);
#pragma omp simd
        for (int64_t i = 0; i < G; ++i) pb[i] = pb[i] * inv + kn * xb[i];
    }
    return total;
}

/* The dictionary from the raw weight W (O rows of K values): D = W / |W_o| per row (W itself
   without atom normalisation); inv[o] gets 1 / |W_o| (or 1). The analysis uses D too: its scale m
   is applied by edl_code. */
void edl_dict(const float *W, int64_t O, int64_t K, int normalize, float *D, float *inv) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; ++o) {
        const float *wr = W + o * K;
        float a = 1.f;
        if (normalize) {
            double ss = 0.0; /* omp simd: without it gcc adds one value at a time (2.6 ms for 512x512x3x3) */
#pragma omp simd reduction(+ : ss)
            for (int64_t k = 0; k < K; ++k) ss += (double)wr[k] * wr[k];
            const double nrm = sqrt(ss);
            a = (float)(1.0 / (nrm > 1e-12 ? nrm : 1e-12));
        }
        inv[o] = a;
        for (int64_t k = 0; k < K; ++k) D[o * K + k] = wr[k] * a;
    }
}

/* Backward of edl_dict, summing the convolutions' weight gradients on the way: gan[0..na) are the
   analyses' gradients of D (their output gradients carry m), gsyn[0..ns) the gradients of the
   synthesis A*(z) = convT(z, D), which the residual subtracts. gD = sum(gan) - sum(gsyn);
   dW = (gD - D <gD, D>) inv per row (the derivative of W / |W|), or gD without normalisation.
   Returns dm = <sum(gan), D> / m (the analyses are linear in D and in m). */
double edl_dict_grad(const float *D, const float *inv, int64_t O, int64_t K, float m, int normalize,
                     const float *const *gan, int64_t na, const float *const *gsyn, int64_t ns, float *gW) {
    double dm = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : dm)
    for (int64_t o = 0; o < O; ++o) {
        const float *dr = D + o * K;
        float *gr = gW + o * K, dmo = 0.f;
        for (int64_t a = 0; a < na; ++a) {
            const float *g = gan[a] + o * K;
            if (a == 0) {
#pragma omp simd reduction(+ : dmo)
                for (int64_t k = 0; k < K; ++k) { dmo += g[k] * dr[k]; gr[k] = g[k]; }
            } else {
#pragma omp simd reduction(+ : dmo)
                for (int64_t k = 0; k < K; ++k) { dmo += g[k] * dr[k]; gr[k] += g[k]; }
            }
        }
        for (int64_t b = 0; b < ns; ++b) {
            const float *g = gsyn[b] + o * K;
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) gr[k] -= g[k];
        }
        dm += dmo;
        if (normalize) {
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t k = 0; k < K; ++k) dot += gr[k] * dr[k];
            const float a = inv[o];
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) gr[k] = (gr[k] - dr[k] * dot) * a;
        }
    }
    return dm / (double)m;
}
