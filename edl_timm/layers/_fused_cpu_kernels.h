/* The activation-sized passes of the EDL solver, written once for both activation types.

   Included twice by _fused_cpu.c: with ACT = float (suffix _f32) and with ACT = uint16_t holding
   bfloat16 (suffix _bf16, the training path under CPU autocast). The including file defines
   ACT, LD(p, i) (element i of an ACT array, as a float), ST(v) (a float stored as ACT) and
   KERNEL(name) (the name with its suffix). All arithmetic is float32 whatever ACT is, and every
   sum is accumulated in float32 lanes and finished in double, so a bfloat16 pass rounds only
   where it stores: each stored value is within half a bfloat16 ulp (2^-9 relative) of the
   float32 result of the same pass. Scales (s, gs), biases, the dictionary and the weight
   gradient stay float32. */

/* Sum of squares of xb[lo..hi). */
static inline float KERNEL(sum_sq)(const ACT *xb, int64_t lo, int64_t hi) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = lo; i < hi; ++i) {
        const float v = LD(xb, i);
        acc += v * v;
    }
    return acc;
}

/* First step's map over xb[lo..hi): p = f(x / s), or x / s when has_rw == 0 (inv = 1 / s). */
static inline void KERNEL(first_map)(const ACT *xb, ACT *pb, int64_t lo, int64_t hi, float inv, float w, float e,
                                     int has_rw) {
    if (has_rw) {
        for (int64_t i = lo; i < hi; ++i) pb[i] = ST(reweight(LD(xb, i) * inv, w, e));
    } else {
        for (int64_t i = lo; i < hi; ++i) pb[i] = ST(LD(xb, i) * inv);
    }
}

/* s[n] = sqrt(sum(x_n^2) / G + 1e-10): the floored RMS (same rule as the eager path). */
static void KERNEL(edl_rms)(const ACT *x, int64_t N, int64_t G, float *s) {
    const int64_t C = chunks_per_block(G), items = N * C;
    double *part = (double *)malloc(sizeof(double) * (size_t)items);
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const struct chunk c = chunk_of(it, C, G);
        part[it] = KERNEL(sum_sq)(x + c.n * G, c.lo, c.hi);
    }
    for (int64_t n = 0; n < N; ++n) s[n] = floored_rms(block_sum(part, n, C), G);
    free(part);
}

/* First step: p = f(x / s) (or x / s when has_rw == 0). */
static void KERNEL(edl_first_chunks)(const ACT *x, const float *s, int64_t N, int64_t G, float w, float e, int has_rw,
                                     ACT *p) {
    const int64_t C = chunks_per_block(G), items = N * C;
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const struct chunk c = chunk_of(it, C, G);
        KERNEL(first_map)(x + c.n * G, p + c.n * G, c.lo, c.hi, s ? 1.f / s[c.n] : 1.f, w, e, has_rw);
    }
}

/* First step with the input normalisation: s = edl_rms(x), p = f(x / s); s may be NULL (no
   normalisation). */
void KERNEL(edl_first)(const ACT *x, int64_t N, int64_t G, float w, float e, int has_rw, float *s, ACT *p) {
    if (!s || !whole_samples(N, G)) {
        if (s) KERNEL(edl_rms)(x, N, G, s);
        KERNEL(edl_first_chunks)(x, s, N, G, w, e, has_rw, p);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const ACT *xb = x + n * G;
        s[n] = floored_rms(KERNEL(sum_sq)(xb, 0, G), G);
        KERNEL(first_map)(xb, p + n * G, 0, G, 1.f / s[n], w, e, has_rw);
    }
}

/* Later steps: q holds A*(z); r = x / s - q and then p = f(r) are written over q (the backward
   recovers what it needs of r from p: f is strictly increasing for w > 0, and f'(r) depends only
   on whether |r| < e, which is whether |p| < e). */
void KERNEL(edl_residual)(ACT *q, const ACT *x, const float *s, int64_t N, int64_t G, float w, float e, int has_rw) {
    const int64_t C = chunks_per_block(G), items = N * C;
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const struct chunk c = chunk_of(it, C, G);
        const float inv = s ? 1.f / s[c.n] : 1.f;
        const ACT *xb = x + c.n * G;
        ACT *qb = q + c.n * G;
        if (has_rw) {
            for (int64_t i = c.lo; i < c.hi; ++i) qb[i] = ST(reweight(LD(xb, i) * inv - LD(qb, i), w, e));
        } else {
            for (int64_t i = c.lo; i < c.hi; ++i) qb[i] = ST(LD(xb, i) * inv - LD(qb, i));
        }
    }
}

/* The ReLUs below test !(a <= 0) rather than a > 0: the same for every number, but a NaN passes
   through as in torch.relu (and its backward, whose mask is out <= 0), so a NaN or inf input gives
   non-finite codes, as a convolution's output would be, and not silently finite ones. The scale
   multiplies the zeros too, as the eager path's z * s does (0 * inf is NaN). */

/* Code update, in place: v = relu(m v + z - thr), where v holds the analysis A(p) with unit atoms
   and m the step size times the reweighting constant (z may be NULL: the first step); times s[n]
   when s is given (the last step rescales the code to the input's scale), plus bias[i] when
   given (the layer's bias laid out over one block: the last step). */
void KERNEL(edl_code)(ACT *v, const ACT *z, const float *s, int64_t N, int64_t G, float m, float thr, const float *bias) {
    const int64_t C = chunks_per_block(G), items = N * C;
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const struct chunk c = chunk_of(it, C, G);
        const float sc = s ? s[c.n] : 1.f;
        ACT *vb = v + c.n * G;
        const ACT *zb = z ? z + c.n * G : 0;
        if (zb && bias) {
            for (int64_t i = c.lo; i < c.hi; ++i) {
                const float a = m * LD(vb, i) + LD(zb, i) - thr;
                vb[i] = ST((!(a <= 0.f) ? a : 0.f) * sc + bias[i]);
            }
        } else if (zb) {
            for (int64_t i = c.lo; i < c.hi; ++i) {
                const float a = m * LD(vb, i) + LD(zb, i) - thr;
                vb[i] = ST((!(a <= 0.f) ? a : 0.f) * sc);
            }
        } else if (bias) {
            for (int64_t i = c.lo; i < c.hi; ++i) {
                const float a = m * LD(vb, i) - thr;
                vb[i] = ST((!(a <= 0.f) ? a : 0.f) * sc + bias[i]);
            }
        } else {
            for (int64_t i = c.lo; i < c.hi; ++i) {
                const float a = m * LD(vb, i) - thr;
                vb[i] = ST((!(a <= 0.f) ? a : 0.f) * sc);
            }
        }
    }
}

/* Backward of the output stage out = s * relu(m v + ...) + bias: with c = out - bias (the scaled
   code), gv = m * g * s * [c > 0] (the gradient of the analysis output v, which the convolution's
   backward takes) and, when s is given, gs[n] = sum(g * c) / s[n] (the code's share of the scale's
   gradient). bias may be NULL. (The bfloat16 path adds the bias outside the node, in PyTorch: a
   positive code below half an ulp of its bias would not show in out - bias.) */
void KERNEL(edl_out_grad)(const ACT *g, const ACT *out, const float *s, int64_t N, int64_t G, float m,
                          const float *bias, ACT *gv, float *gs) {
    const int64_t C = chunks_per_block(G), items = N * C;
    double *part = s ? (double *)malloc(sizeof(double) * (size_t)items) : 0;
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const struct chunk c = chunk_of(it, C, G);
        const float sc = (s ? s[c.n] : 1.f) * m;
        const ACT *gb = g + c.n * G, *ob = out + c.n * G;
        ACT *vb = gv + c.n * G;
        float acc = 0.f;
        if (bias) {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = c.lo; i < c.hi; ++i) {
                const float gi = LD(gb, i), ci = LD(ob, i) - bias[i];
                acc += gi * ci;
                vb[i] = ST(!(ci <= 0.f) ? gi * sc : 0.f);
            }
        } else {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = c.lo; i < c.hi; ++i) {
                const float gi = LD(gb, i), ci = LD(ob, i);
                acc += gi * ci;
                vb[i] = ST(!(ci <= 0.f) ? gi * sc : 0.f);
            }
        }
        if (part) part[it] = acc;
    }
    if (part) {
        for (int64_t n = 0; n < N; ++n) gs[n] = (float)(block_sum(part, n, C) / (double)s[n]);
        free(part);
    }
}

/* Backward of p = f(r), from p, in place: gp <- gp * f'(r). Returns the lerp weight's gradient
   sum(gp * (r - clamp(r))) = sum(gp * (p - clamp(p))) / w (outside the clamp, p - sign(p) e =
   w (r - sign(r) e)); 0 when w = 0, where f is a plain clamp and w is not learned. */
double KERNEL(edl_reweight_grad)(ACT *gp, const ACT *p, int64_t n, float w, float e) {
    const int64_t items = chunks_per_block(n); /* one block of n values */
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t it = 0; it < items; ++it) {
        const struct chunk c = chunk_of(it, items, n);
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = c.lo; i < c.hi; ++i) {
            const float pi = LD(p, i), gi = LD(gp, i);
            acc += gi * reweight_dw(pi, e);
            gp[i] = ST(reweight_back(pi, gi, w, e));
        }
        total += acc;
    }
    return w > 0.f ? total / (double)w : 0.0;
}

/* Backward through z_t (t >= 1), in place: gz <- (gv - m gz) * [z > 0], where gz is the gradient
   through the synthesis A*(z) (which the residual subtracts) and gv = m * (the gradient through
   the skip connection of the next step): the result is m times the gradient of z_t's pre-threshold
   value, what the previous analysis's backward takes. */
void KERNEL(edl_mask_sub)(ACT *gz, const ACT *gv, const ACT *z, int64_t n, float m) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) gz[i] = ST(!(LD(z, i) <= 0.f) ? LD(gv, i) - m * LD(gz, i) : 0.f);
}

/* Pass 1 over values lo..hi of one sample; returns the lerp weight's share, *acc_d the dot.
   has_rw and has_u are constants after inlining: gcc does not vectorise a loop that tests them
   (a conditional load of ub is control flow it cannot if-convert), and the scalar loop with its
   data-dependent branches ran 6x slower than a copy (11 ms for a 64x64x32x32 input). */
static inline __attribute__((always_inline)) float KERNEL(pass1_loop)(ACT *pb, const ACT *xb, const ACT *ub, int64_t lo,
                                                                       int64_t hi, float inv, float w, float e,
                                                                       const int has_rw, const int has_u, float *acc_d) {
    float acc_w = 0.f, d = 0.f;
#pragma omp simd reduction(+ : acc_w, d)
    for (int64_t i = lo; i < hi; ++i) {
        const float xi = LD(xb, i), r = xi * inv, gi = LD(pb, i);
        float gr = gi;
        if (has_rw) {
            acc_w += gi * reweight_dw(r, e);
            gr = reweight_back(r, gi, w, e);
        }
        if (has_u) gr += LD(ub, i);
        d += gr * xi;
        pb[i] = ST(gr);
    }
    *acc_d = d;
    return acc_w;
}

static inline float KERNEL(first_grad_pass1)(ACT *pb, const ACT *xb, const ACT *ub, int64_t lo, int64_t hi, float inv,
                                             float w, float e, int has_rw, float *acc_d) {
    if (has_rw) {
        return ub ? KERNEL(pass1_loop)(pb, xb, ub, lo, hi, inv, w, e, 1, 1, acc_d)
                  : KERNEL(pass1_loop)(pb, xb, ub, lo, hi, inv, w, e, 1, 0, acc_d);
    }
    return ub ? KERNEL(pass1_loop)(pb, xb, ub, lo, hi, inv, w, e, 0, 1, acc_d)
              : KERNEL(pass1_loop)(pb, xb, ub, lo, hi, inv, w, e, 0, 0, acc_d);
}

/* Pass 2 over values lo..hi of one sample: gx = gut / s + k x. */
static inline void KERNEL(first_grad_pass2)(ACT *pb, const ACT *xb, int64_t lo, int64_t hi, float inv, float kn) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) pb[i] = ST(LD(pb, i) * inv + kn * LD(xb, i));
}

/* Backward of the first step and of the input normalisation.
   gp: gradient of p_0 = f(x / s), overwritten with the input gradient. gu: the gradient already
   collected for u = x / s by the later steps' residuals (NULL when T = 1). gs: the output's share
   of the scale's gradient (unused without s). Returns the lerp weight's gradient.
   Pass 1: gut = f'(u) gp + gu, dot[n] = sum(gut * x). Pass 2: gx = gut / s + k[n] x with
   k[n] = (gs[n] - dot[n] / s[n]^2) / (G s[n]), from s = sqrt(|x|^2 / G + 1e-10). */
static double KERNEL(edl_first_grad_chunks)(ACT *gp, const ACT *x, const float *s, const ACT *gu, const float *gs,
                                            int64_t N, int64_t G, float w, float e, int has_rw) {
    const int64_t C = chunks_per_block(G), items = N * C;
    double *part = s ? (double *)malloc(sizeof(double) * (size_t)items) : 0;
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t it = 0; it < items; ++it) {
        const struct chunk c = chunk_of(it, C, G);
        const float inv = s ? 1.f / s[c.n] : 1.f;
        const ACT *ub = gu ? gu + c.n * G : 0;
        float acc_d;
        total += KERNEL(first_grad_pass1)(gp + c.n * G, x + c.n * G, ub, c.lo, c.hi, inv, w, e, has_rw, &acc_d);
        if (part) part[it] = acc_d;
    }
    if (part) {
        float *k = (float *)malloc(sizeof(float) * (size_t)N);
        for (int64_t n = 0; n < N; ++n) k[n] = scale_term(gs[n], block_sum(part, n, C), s[n], G);
#pragma omp parallel for schedule(static)
        for (int64_t it = 0; it < items; ++it) {
            const struct chunk c = chunk_of(it, C, G);
            KERNEL(first_grad_pass2)(gp + c.n * G, x + c.n * G, c.lo, c.hi, 1.f / s[c.n], k[c.n]);
        }
        free(k);
        free(part);
    }
    return total;
}

double KERNEL(edl_first_grad)(ACT *gp, const ACT *x, const float *s, const ACT *gu, const float *gs, int64_t N,
                              int64_t G, float w, float e, int has_rw) {
    if (!s || !whole_samples(N, G)) return KERNEL(edl_first_grad_chunks)(gp, x, s, gu, gs, N, G, w, e, has_rw);
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t n = 0; n < N; ++n) {
        const ACT *xb = x + n * G, *ub = gu ? gu + n * G : 0;
        ACT *pb = gp + n * G;
        float d;
        const float inv = 1.f / s[n];
        total += KERNEL(first_grad_pass1)(pb, xb, ub, 0, G, inv, w, e, has_rw, &d);
        KERNEL(first_grad_pass2)(pb, xb, 0, G, inv, scale_term(gs[n], d, s[n], G));
    }
    return total;
}

/* Backward of edl_dict, summing the convolutions' weight gradients on the way: gan[0..na) are the
   analyses' gradients of D (their output gradients carry m), gsyn[0..ns) the gradients of the
   synthesis A*(z) = convT(z, D), which the residual subtracts; both in the activations' type
   (the convolutions run in it). gD = sum(gan) - sum(gsyn), in float32;
   dW = (gD - D <gD, D>) inv per row (the derivative of W / |W|), or gD without normalisation.
   Returns dm = <sum(gan), D> / m (the analyses are linear in D and in m). */
double KERNEL(edl_dict_grad)(const float *D, const float *inv, int64_t O, int64_t K, float m, int normalize,
                             const ACT *const *gan, int64_t na, const ACT *const *gsyn, int64_t ns, float *gW) {
    double dm = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : dm)
    for (int64_t o = 0; o < O; ++o) {
        const float *dr = D + o * K;
        float *gr = gW + o * K, dmo = 0.f;
        for (int64_t a = 0; a < na; ++a) {
            const ACT *g = gan[a] + o * K;
            if (a == 0) {
#pragma omp simd reduction(+ : dmo)
                for (int64_t k = 0; k < K; ++k) { const float gk = LD(g, k); dmo += gk * dr[k]; gr[k] = gk; }
            } else {
#pragma omp simd reduction(+ : dmo)
                for (int64_t k = 0; k < K; ++k) { const float gk = LD(g, k); dmo += gk * dr[k]; gr[k] += gk; }
            }
        }
        for (int64_t b = 0; b < ns; ++b) {
            const ACT *g = gsyn[b] + o * K;
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) gr[k] -= LD(g, k);
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
