/* Fused CPU kernels of normswap's row norms (RMSNorm and the BERT LayerNorm), float32.
 *
 * Every function works on a row-major [rows, d] input, one row at a time: a row (a few KB) stays in the L1/L2
 * cache between the passes over it, so a kernel reads its inputs from memory once and writes its outputs
 * once, as torch's fused LayerNorm kernels do. Rows are split over at most `nthreads` OpenMP threads in
 * contiguous blocks (fewer for small inputs, where the fork/join would cost more than it saves). The weight
 * and bias gradients are summed per thread, then over the threads in float64.
 *
 * Both norms are y = w * (x - m) * r + b per row (w = 1 and b = 0 when absent), with
 *   RMSNorm   m = 0,          r = 1 / sqrt(mean(x^2) + eps)
 *   BERT LN   m = mean(x),    r = 1 / (s + eps),  s = sqrt(sum((x - m)^2) / (d - 1))  (unbiased std)
 * and, with gw = dy * w, xc = x - m, the gradients
 *   dw = sum_rows dy * xc * r,  db = sum_rows dy
 *   RMSNorm   dx = r * gw - xc * r^3 * sum(gw * xc) / d
 *   BERT LN   dx = r * (gw - mean(gw)) - xc * r^2 * sum(gw * xc) / ((d - 1) * s)
 *             (the last term is 0 when s == 0, as autograd of the python formula gives)
 *
 * Per-row statistics: RMSNorm stores r ([rows, 1]); the BERT LN stores m, r, s ([rows, 3]).
 * Pointers documented "or NULL" may be NULL: no weight / bias, or that gradient is not wanted.
 * The backward functions return 0, or -1 when their scratch memory cannot be allocated.
 * Built without OpenMP (a compiler that lacks it), everything runs on one thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { RMS = 0, BERT = 1 };

/* How many threads the last kernel call asked for (read by tests through normswap_last_threads). */
static int last_threads = 0;

void normswap_note_threads(int threads) { last_threads = threads; }

int normswap_last_threads(void) { return last_threads; }

int normswap_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static int threads_for(int64_t rows, int64_t d, int nthreads) {
    int64_t by_size = (rows * d) / 32768 + 1; /* ~32K elements per thread at least */
    int64_t t = nthreads < by_size ? nthreads : by_size;
    if (t > rows) t = rows;
    return t < 1 ? 1 : (int)t;
}

/* ---------------------------------------------------------------------------------------------------------
 * Forward.
 * ------------------------------------------------------------------------------------------------------- */

static void row_norm_fwd(int kind, const float *x, const float *w, const float *b, float *y, float *stats,
                         int64_t rows, int64_t d, double eps, int nthreads) {
    const int64_t stride = kind == RMS ? 1 : 3;
    const int threads = threads_for(rows, d, nthreads);
    normswap_note_threads(threads);
    /* if(threads > 1): one thread never enters an OpenMP team, which keeps a forked child (a DataLoader
     * worker, where torch runs one thread) clear of the parent's thread pool */
    #pragma omp parallel for if(threads > 1) num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
        const float *xr = x + i * d;
        float *yr = y + i * d;
        float m = 0.0f, r;
        if (kind == RMS) {
            float ss = 0.0f;
            #pragma omp simd reduction(+:ss)
            for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
            r = (float)(1.0 / sqrt((double)ss / (double)d + eps));
            stats[i] = r;
        } else {
            float sum = 0.0f, ss = 0.0f;
            #pragma omp simd reduction(+:sum)
            for (int64_t j = 0; j < d; ++j) sum += xr[j];
            m = sum / (float)d;
            #pragma omp simd reduction(+:ss)
            for (int64_t j = 0; j < d; ++j) ss += (xr[j] - m) * (xr[j] - m);
            const double s = sqrt((double)ss / (double)(d - 1));
            r = (float)(1.0 / (s + eps));
            stats[stride * i] = m;
            stats[stride * i + 1] = r;
            stats[stride * i + 2] = (float)s;
        }
        #pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
            float v = (xr[j] - m) * r;
            if (w) v *= w[j];
            if (b) v += b[j];
            yr[j] = v;
        }
    }
}

/* y: [rows, d] out; rstd: [rows] out; w, b: [d] or NULL. */
void normswap_rms_fwd(const float *x, const float *w, const float *b, float *y, float *rstd,
                      int64_t rows, int64_t d, double eps, int nthreads) {
    row_norm_fwd(RMS, x, w, b, y, rstd, rows, d, eps, nthreads);
}

/* y: [rows, d] out; stats: [rows, 3] out (m, r, s); w, b: [d] or NULL. */
void normswap_bert_fwd(const float *x, const float *w, const float *b, float *y, float *stats,
                       int64_t rows, int64_t d, double eps, int nthreads) {
    row_norm_fwd(BERT, x, w, b, y, stats, rows, d, eps, nthreads);
}

/* ---------------------------------------------------------------------------------------------------------
 * Backward.
 * ------------------------------------------------------------------------------------------------------- */

/* The first backward pass over one row: sum(gw) and sum(gw * xc), plus this thread's weight / bias gradient
 * sums. Called with literal has_* flags, so each call site is compiled into its own branch-free vector loop
 * (a run-time test inside the loop would keep the compiler from vectorizing it). */
ALWAYS_INLINE void row_sums(const float *restrict gr, const float *restrict xr, const float *restrict w,
                            float *restrict tw, float *restrict tb, float m, float r, int64_t d,
                            float *sg_out, float *sgx_out, const int has_w, const int has_tw, const int has_tb) {
    float sg = 0.0f, sgx = 0.0f;
    #pragma omp simd reduction(+:sg, sgx)
    for (int64_t j = 0; j < d; ++j) {
        const float g = has_w ? gr[j] * w[j] : gr[j], xc = xr[j] - m;
        sg += g;
        sgx += g * xc;
        if (has_tw) tw[j] += gr[j] * (xc * r);
        if (has_tb) tb[j] += gr[j];
    }
    *sg_out = sg;
    *sgx_out = sgx;
}

/* row_sums with the literal flags matching the pointers w, tw, tb. */
ALWAYS_INLINE void row_sums_dispatch(const float *gr, const float *xr, const float *w, float *tw, float *tb,
                                     float m, float r, int64_t d, float *sg, float *sgx) {
#define ROW_SUMS(hw, htw, htb) row_sums(gr, xr, w, tw, tb, m, r, d, sg, sgx, hw, htw, htb)
    if (w) {
        if (tw) { if (tb) ROW_SUMS(1, 1, 1); else ROW_SUMS(1, 1, 0); }
        else    { if (tb) ROW_SUMS(1, 0, 1); else ROW_SUMS(1, 0, 0); }
    } else {
        if (tw) { if (tb) ROW_SUMS(0, 1, 1); else ROW_SUMS(0, 1, 0); }
        else    { if (tb) ROW_SUMS(0, 0, 1); else ROW_SUMS(0, 0, 0); }
    }
#undef ROW_SUMS
}

static void reduce_partials(const float *partial, float *out, int threads, int64_t d) {
    if (!partial) return;
    for (int64_t j = 0; j < d; ++j) {
        double acc = 0.0;
        for (int t = 0; t < threads; ++t) acc += partial[(int64_t)t * d + j];
        out[j] = (float)acc;
    }
}

static int row_norm_bwd(int kind, const float *dy, const float *x, const float *stats, const float *w, float *dx,
                        float *dw, float *db, int64_t rows, int64_t d, int nthreads) {
    const int threads = threads_for(rows, d, nthreads);
    const int64_t stride = kind == RMS ? 1 : 3;
    /* Per-thread partial sums of the weight / bias gradients: [threads, d] each, zeroed. */
    float *pw = dw ? (float *)calloc((size_t)threads * (size_t)d, sizeof(float)) : NULL;
    float *pb = db ? (float *)calloc((size_t)threads * (size_t)d, sizeof(float)) : NULL;
    if ((dw && !pw) || (db && !pb)) {
        free(pw);
        free(pb);
        return -1;
    }
    normswap_note_threads(threads);
    #pragma omp parallel if(threads > 1) num_threads(threads)
    {
        float *tw = pw ? pw + (int64_t)omp_get_thread_num() * d : NULL;
        float *tb = pb ? pb + (int64_t)omp_get_thread_num() * d : NULL;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i) {
            const float *xr = x + i * d, *gr = dy + i * d;
            const float m = kind == RMS ? 0.0f : stats[stride * i];
            const float r = kind == RMS ? stats[i] : stats[stride * i + 1];
            float sg, sgx;
            row_sums_dispatch(gr, xr, w, tw, tb, m, r, d, &sg, &sgx);
            if (!dx) continue;
            /* dx = r * gw - a - c * xc */
            float a, c;
            if (kind == RMS) {
                a = 0.0f;
                c = r * r * r * sgx / (float)d;
            } else {
                const float s = stats[stride * i + 2];
                a = r * sg / (float)d;
                c = s > 0.0f ? (float)((double)r * r * sgx / ((double)(d - 1) * s)) : 0.0f;
            }
            float *dr = dx + i * d;
            if (w) {
                #pragma omp simd
                for (int64_t j = 0; j < d; ++j) dr[j] = r * gr[j] * w[j] - a - c * (xr[j] - m);
            } else {
                #pragma omp simd
                for (int64_t j = 0; j < d; ++j) dr[j] = r * gr[j] - a - c * (xr[j] - m);
            }
        }
    }
    reduce_partials(pw, dw, threads, d);
    reduce_partials(pb, db, threads, d);
    free(pw);
    free(pb);
    return 0;
}

/* dx: [rows, d] out or NULL; dw, db: [d] out or NULL; w: [d] or NULL; rstd as written by the forward. */
int normswap_rms_bwd(const float *dy, const float *x, const float *rstd, const float *w, float *dx,
                     float *dw, float *db, int64_t rows, int64_t d, int nthreads) {
    return row_norm_bwd(RMS, dy, x, rstd, w, dx, dw, db, rows, d, nthreads);
}

/* dx: [rows, d] out or NULL; dw, db: [d] out or NULL; w: [d] or NULL; stats as written by the forward. */
int normswap_bert_bwd(const float *dy, const float *x, const float *stats, const float *w, float *dx,
                      float *dw, float *db, int64_t rows, int64_t d, int nthreads) {
    return row_norm_bwd(BERT, dy, x, stats, w, dx, dw, db, rows, d, nthreads);
}
