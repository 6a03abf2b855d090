/* Fused CPU kernels of ChannelLayerNorm: LayerNorm over dim 1 of a contiguous [N, C, S] float32 tensor (S: the
 * product of the spatial dims), i.e. over the channels at every position, as ConvNeXt's LayerNorm2d does.
 *
 * The positions of one sample are cut into tiles of TILE; a tile's C x TILE values (tens of KB) stay in cache
 * between the passes over it, so each kernel reads its inputs from memory once and writes its outputs once,
 * without the two transposes of permute + layer_norm + permute. Per position,
 *   y = (x - m) * r * w[c] + b[c],   m = mean_c x,  r = 1 / sqrt(var_c x + eps)  (biased variance)
 * and, with xh = (x - m) * r and g = dy * w[c],
 *   dx = r * (g - mean_c g - xh * mean_c(g * xh)),  dw[c] = sum dy * xh,  db[c] = sum dy.
 * The forward stores m and r ([N, S] each) for the backward. w, b may be NULL (ones, zeros); dx, dw, db may be
 * NULL (not wanted). The backward sums dw and db per thread (float64), then over the threads; it returns 0,
 * or -1 when its scratch memory cannot be allocated.
 */
#include <math.h>
#include <stdint.h>

void normswap_note_threads(int threads); /* row_kernels.c */
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

#define TILE 64
#define BLOCK 16

void normswap_cln_fwd(const float *x, const float *w, const float *b, float *y, float *mean, float *rstd,
                      int64_t N, int64_t C, int64_t S, double eps, int nthreads) {
    const int64_t tiles = (S + TILE - 1) / TILE;
    normswap_note_threads(nthreads);
    #pragma omp parallel for if(nthreads > 1) collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t s0 = t * TILE, len = S - s0 < TILE ? S - s0 : TILE;
            const float *xs = x + n * C * S + s0;
            /* Two passes over the tile (it stays in cache): the mean, then the variance about it, each summed in
             * float32 over blocks of BLOCK channels and the blocks in float64. A float32 running sum over
             * hundreds of channels lost up to ~300 ulp of the output (C = 538 in GhostNetV3; torch: 1 ulp). */
            double s1[TILE], s2[TILE];
            float part[TILE], m[TILE], r[TILE];
            for (int64_t j = 0; j < len; ++j) { s1[j] = 0.0; s2[j] = 0.0; }
            for (int64_t c0 = 0; c0 < C; c0 += BLOCK) {
                const int64_t c1 = c0 + BLOCK < C ? c0 + BLOCK : C;
                for (int64_t j = 0; j < len; ++j) part[j] = 0.0f;
                for (int64_t c = c0; c < c1; ++c) {
                    const float *xc = xs + c * S;
                    #pragma omp simd
                    for (int64_t j = 0; j < len; ++j) part[j] += xc[j];
                }
                for (int64_t j = 0; j < len; ++j) s1[j] += part[j];
            }
            for (int64_t j = 0; j < len; ++j) m[j] = (float)(s1[j] / (double)C);
            for (int64_t c0 = 0; c0 < C; c0 += BLOCK) {
                const int64_t c1 = c0 + BLOCK < C ? c0 + BLOCK : C;
                for (int64_t j = 0; j < len; ++j) part[j] = 0.0f;
                for (int64_t c = c0; c < c1; ++c) {
                    const float *xc = xs + c * S;
                    #pragma omp simd
                    for (int64_t j = 0; j < len; ++j) {
                        const float d = xc[j] - m[j];
                        part[j] += d * d;
                    }
                }
                for (int64_t j = 0; j < len; ++j) s2[j] += part[j];
            }
            for (int64_t j = 0; j < len; ++j) {
                const double var = s2[j] / (double)C;
                mean[n * S + s0 + j] = m[j];
                rstd[n * S + s0 + j] = r[j] = (float)(1.0 / sqrt(var + eps));
            }
            float *ys = y + n * C * S + s0;
            for (int64_t c = 0; c < C; ++c) {
                const float *xc = xs + c * S;
                float *yc = ys + c * S;
                const float wc = w ? w[c] : 1.0f, bc = b ? b[c] : 0.0f;
                #pragma omp simd
                for (int64_t j = 0; j < len; ++j) yc[j] = (xc[j] - m[j]) * r[j] * wc + bc;
            }
        }
    }
}

int normswap_cln_bwd(const float *dy, const float *x, const float *mean, const float *rstd, const float *w,
                     float *dx, float *dw, float *db, int64_t N, int64_t C, int64_t S, int nthreads) {
    const int64_t tiles = (S + TILE - 1) / TILE;
    const int want_p = dw != NULL || db != NULL;
    double *part = NULL;
    if (want_p) {
        part = (double *)calloc((size_t)nthreads * 2 * (size_t)C, sizeof(double));
        if (!part) return -1;
    }
    normswap_note_threads(nthreads);
    #pragma omp parallel for if(nthreads > 1) collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t s0 = t * TILE, len = S - s0 < TILE ? S - s0 : TILE;
            const int64_t base = n * C * S + s0;
            const float *m = mean + n * S + s0, *r = rstd + n * S + s0;
            double *pw = want_p ? part + (size_t)omp_get_thread_num() * 2 * C : NULL;
            float a[TILE], q[TILE];
            for (int64_t j = 0; j < len; ++j) { a[j] = 0.0f; q[j] = 0.0f; }
            for (int64_t c = 0; c < C; ++c) {
                const float *g = dy + base + c * S, *xc = x + base + c * S;
                const float wc = w ? w[c] : 1.0f;
                float sw = 0.0f, sb = 0.0f;
                #pragma omp simd reduction(+:sw, sb)
                for (int64_t j = 0; j < len; ++j) {
                    const float xh = (xc[j] - m[j]) * r[j], gw = g[j] * wc;
                    a[j] += gw;
                    q[j] += gw * xh;
                    sw += g[j] * xh;
                    sb += g[j];
                }
                if (pw) { pw[c] += sw; pw[C + c] += sb; }
            }
            if (!dx) continue;
            for (int64_t j = 0; j < len; ++j) { a[j] /= (float)C; q[j] /= (float)C; }
            for (int64_t c = 0; c < C; ++c) {
                const float *g = dy + base + c * S, *xc = x + base + c * S;
                float *o = dx + base + c * S;
                const float wc = w ? w[c] : 1.0f;
                #pragma omp simd
                for (int64_t j = 0; j < len; ++j) {
                    const float xh = (xc[j] - m[j]) * r[j];
                    o[j] = r[j] * (g[j] * wc - a[j] - xh * q[j]);
                }
            }
        }
    }
    if (want_p) {
        for (int64_t c = 0; c < C; ++c) {
            double sw = 0.0, sb = 0.0;
            for (int th = 0; th < nthreads; ++th) { sw += part[(size_t)th * 2 * C + c]; sb += part[(size_t)th * 2 * C + C + c]; }
            if (dw) dw[c] = (float)sw;
            if (db) db[c] = (float)sb;
        }
        free(part);
    }
    return 0;
}
