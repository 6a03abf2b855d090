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
#include <stdint.h>

void normswap_ghost_bn_bwd(const float *dy, const float *x, const float *mean, const float *invstd,
                           const float *w, float *dx, float *gw, float *gb, const int64_t *starts, int64_t k,
                           int64_t C, int64_t S, int nthreads) {
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
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
