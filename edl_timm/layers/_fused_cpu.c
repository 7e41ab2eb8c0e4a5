/* Fused elementwise passes of the EDL solver on CPU (float32 or bfloat16 activations, contiguous
   tensors).

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
#include <string.h>
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

/* Work item `it` of a pass over blocks of G values cut into C chunks each: block n, values lo..hi. */
struct chunk {
    int64_t n, lo, hi;
};
static inline struct chunk chunk_of(int64_t it, int64_t C, int64_t G) {
    const int64_t n = it / C, lo = (it % C) * CHUNK;
    return (struct chunk){n, lo, lo + CHUNK < G ? lo + CHUNK : G};
}

/* Block n's total of the per-chunk partial sums part[n * C + c], in double. */
static inline double block_sum(const double *part, int64_t n, int64_t C) {
    double a = 0.0;
    for (int64_t c = 0; c < C; ++c) a += part[n * C + c];
    return a;
}

/* The floored RMS from a sum of squares over G values (the eager path's _floored_rms). */
static inline float floored_rms(double sumsq, int64_t G) { return (float)sqrt(sumsq / (double)G + 1e-10); }

/* A per-sample reduction followed by a map over the same sample costs one trip to memory instead
   of two when each thread takes whole samples that stay in its L2 cache between the two loops. */
#define SAMPLE_IN_CACHE 131072 /* values per array per sample: 3 arrays of 512 KB */
static inline int whole_samples(int64_t N, int64_t G) { return G <= SAMPLE_IN_CACHE && N >= 2 * omp_get_max_threads(); }

/* k[n] of the first step's backward pass 2, from the sample's dot d = sum(gut * x). */
static inline float scale_term(float gs, double d, double sn, int64_t G) {
    return (float)(((double)gs - d / (sn * sn)) / ((double)G * sn));
}

/* bfloat16 held in a uint16_t: the top half of a float32. Widening is exact; narrowing rounds to
   nearest even, as PyTorch's own conversion does, and keeps a NaN a (quiet) NaN. Written with
   integer operations that gcc vectorises. */
static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x40u : rounded);
}

/* The kernels, once per activation type (see _fused_cpu_kernels.h). */
#define ACT float
#define LD(p, i) ((p)[i])
#define ST(v) (v)
#define KERNEL(name) name##_f32
#include "_fused_cpu_kernels.h"
#undef ACT
#undef LD
#undef ST
#undef KERNEL

#define ACT uint16_t
#define LD(p, i) bf16_to_f32((p)[i])
#define ST(v) f32_to_bf16(v)
#define KERNEL(name) name##_bf16
#include "_fused_cpu_kernels.h"

/* The dictionary from the raw weight W (O rows of K values): D = W / |W_o| per row (W itself
   without atom normalisation); inv[o] gets 1 / |W_o| (or 1). The analysis uses D too: its scale m
   is applied by edl_code. Dh, when not NULL, gets D in bfloat16 as well: the copy the
   convolutions take under autocast (D stays float32 for the backward's weight-gradient pass). */
void edl_dict(const float *W, int64_t O, int64_t K, int normalize, float *D, uint16_t *Dh, float *inv) {
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
        float *dr = D + o * K;
        for (int64_t k = 0; k < K; ++k) dr[k] = wr[k] * a;
        if (Dh) {
            uint16_t *hr = Dh + o * K;
            for (int64_t k = 0; k < K; ++k) hr[k] = f32_to_bf16(dr[k]);
        }
    }
}
