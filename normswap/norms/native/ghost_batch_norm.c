/* Fused CPU backward of normswap's GhostBatchNorm (training mode), float32, channels-first contiguous input.
 *
 * The input [N, C, S] (S: the product of the spatial dims, 1 for BatchNorm1d on [N, C]) is cut along N into
 * k virtual batches, sample offsets starts[0] = 0 < starts[1] < ... < starts[k] = N. Each (virtual batch,
 * channel) pair is one task: a first pass sums dy and dy * (x - mean) over its M = n * S values, a second pass
 * writes the input gradient of training-mode batch norm,
 *
 *     dx = w * invstd * (dy - sum(dy) / M - (x - mean) * invstd^2 * sum(dy * (x - mean)) / M)
 *
 * while the task's values are still in cache. torch's own batch-norm backward has no variant that writes
 * into a slice of a larger tensor (its out= form computes elsewhere, then copies), which costs a GhostBN an
 * extra copy of dx; this kernel writes each task's slice of dx in place.
 *
 * Outputs gw, gb: [k, C] per-virtual-batch sums, sum(dy * xhat) and sum(dy) (the caller sums over k).
 * w may be NULL (ones); dx may be NULL (no input gradient).
 */
#include <math.h>
#include <stdint.h>

void normswap_note_threads(int threads); /* row_kernels.c */

void normswap_ghost_bn_bwd(const float *dy, const float *x, const float *mean, const float *invstd,
                           const float *w, float *dx, float *gw, float *gb, const int64_t *starts, int64_t k,
                           int64_t C, int64_t S, int nthreads) {
    normswap_note_threads(nthreads);
    #pragma omp parallel for if(nthreads > 1) collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < k; ++i) {
        for (int64_t c = 0; c < C; ++c) {
            const int64_t n0 = starts[i], n1 = starts[i + 1];
            const float m = mean[i * C + c], iv = invstd[i * C + c];
            double sdy = 0.0, sdyx = 0.0; /* a task can sum ~10^6 values: float64 across samples */
            for (int64_t n = n0; n < n1; ++n) {
                const float *g = dy + (n * C + c) * S, *xv = x + (n * C + c) * S;
                float a = 0.0f, b = 0.0f;
                #pragma omp simd reduction(+:a, b)
                for (int64_t s = 0; s < S; ++s) {
                    a += g[s];
                    b += g[s] * (xv[s] - m);
                }
                sdy += a;
                sdyx += b;
            }
            gb[i * C + c] = (float)sdy;
            gw[i * C + c] = (float)(sdyx * iv);
            if (!dx) continue;
            const double count = (double)((n1 - n0) * S);
            const float scale = (w ? w[c] : 1.0f) * iv;
            const float k1 = (float)(sdy / count), k2 = (float)(sdyx * iv * iv / count);
            for (int64_t n = n0; n < n1; ++n) {
                const int64_t p = (n * C + c) * S;
                const float *g = dy + p, *xv = x + p;
                float *o = dx + p;
                #pragma omp simd
                for (int64_t s = 0; s < S; ++s) o[s] = scale * (g[s] - k1 - (xv[s] - m) * k2);
            }
        }
    }
}

/* Fused CPU forward of GhostBatchNorm (training mode), same layout as the backward above. Each (virtual
 * batch, channel) task sums its M = n * S values and their squares (shifted by the task's first value, which
 * keeps the one-pass variance accurate when the mean is large against the spread), then writes
 *
 *     y = (x - mean) * invstd * w + b,    invstd = 1 / sqrt(var + eps)   (var: biased, as batch norm uses)
 *
 * while the task's values (n * S floats, a few hundred KB for usual sizes) are still in cache, so the input
 * is read from memory once. Outputs mean, invstd: [k, C]; var_unbiased: [k, C] or NULL (for the running
 * statistics). w, b may be NULL (ones, zeros).
 */
void normswap_ghost_bn_fwd(const float *x, const float *w, const float *b, float *y, float *mean, float *invstd,
                           float *var_unbiased, const int64_t *starts, int64_t k, int64_t C, int64_t S, double eps,
                           int nthreads) {
    normswap_note_threads(nthreads);
    #pragma omp parallel for if(nthreads > 1) collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < k; ++i) {
        for (int64_t c = 0; c < C; ++c) {
            const int64_t n0 = starts[i], n1 = starts[i + 1];
            const float shift = x[(n0 * C + c) * S];
            double s1 = 0.0, s2 = 0.0;
            for (int64_t n = n0; n < n1; ++n) {
                const float *xv = x + (n * C + c) * S;
                float a = 0.0f, q = 0.0f;
                #pragma omp simd reduction(+:a, q)
                for (int64_t s = 0; s < S; ++s) {
                    const float d = xv[s] - shift;
                    a += d;
                    q += d * d;
                }
                s1 += a;
                s2 += q;
            }
            const double count = (double)((n1 - n0) * S);
            const double dm = s1 / count;
            double var = s2 / count - dm * dm;
            if (var < 0.0) var = 0.0;
            const double m = (double)shift + dm;
            const float iv = (float)(1.0 / sqrt(var + eps));
            mean[i * C + c] = (float)m;
            invstd[i * C + c] = iv;
            if (var_unbiased) var_unbiased[i * C + c] = (float)(count > 1.0 ? var * count / (count - 1.0) : 0.0);
            const float scale = (w ? w[c] : 1.0f) * iv, bias = b ? b[c] : 0.0f, mf = (float)m;
            for (int64_t n = n0; n < n1; ++n) {
                const int64_t p = (n * C + c) * S;
                const float *xv = x + p;
                float *o = y + p;
                #pragma omp simd
                for (int64_t s = 0; s < S; ++s) o[s] = (xv[s] - mf) * scale + bias;
            }
        }
    }
}
