/* Fused per-tensor fake quantization for a CPU (calibrate.fused_fq loads it with ctypes).
 *
 * The forward is the eager op sequence of calibrate.quantizer._FakeQuantSTE, one float32
 * operation at a time and in the same order (compiled with -ffp-contract=off, so no FMA), which
 * makes it bit-identical to PyTorch's:  c = clamp(x, l, u); t = (c - l) / s; q = rint(t)
 * (half to even); y = q * s + l.
 *
 * The backward makes one pass instead of about twenty: gx = g on [l, u] (else 0) and the three
 * sums the bounds need, sum g*(q - t), sum g*[x <= l], sum g*[x >= u]: float within blocks of
 * 4096 values (in the vectoriser's order), then double over the blocks in order, so the sums
 * are the same for any thread count (they differ from PyTorch's float32 ones in the last bits).
 *
 * Tensors are contiguous ranges [0, n). Each kernel takes its thread count: built with -fopenmp
 * it splits the work over that many OpenMP threads. The compiled library needs libgomp.so.1,
 * which a PyTorch process has already loaded, so the threads are PyTorch's own intra-op pool.
 * Built without OpenMP the pragmas are ignored and the kernels run on the calling thread.
 *
 * Element types: float32 -> float32; bfloat16 -> bfloat16 (a DQC under bf16 autocast: each value
 * is widened to float32 exactly, the same float32 maths runs, the output is rounded once to
 * bfloat16, nearest even, as PyTorch's float -> bfloat16 cast); float32 -> bfloat16 (the float32
 * forward rounded once: under autocast the GEMM that consumes y would make that cast itself).
 * The backward's g has y's type and gx has x's; gx is g or 0, so it is exact.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 4096
/* tensors under 65536 elements run on the calling thread ("if(parallel: ...)": a plain "if"
 * would also switch off the simd construct, and the vectorisation with it) */

static inline float bf16_to_float(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) /* c10::BFloat16's round_to_nearest_even */
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f)
        return 0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define LOAD_f32(v) (v)
#define LOAD_bf16(v) bf16_to_float(v)
#define STORE_f32(v) (v)
#define STORE_bf16(v) float_to_bf16(v)
#define TYPE_f32 float
#define TYPE_bf16 uint16_t

/* fq_forward[_X[_Y]](x, y, n, l, u, s, threads) */
#define DEFINE_FORWARD(NAME, X, Y)                                                            \
    void NAME(const TYPE_##X *restrict x, TYPE_##Y *restrict y, ptrdiff_t n, float l, float u, \
              float s, int threads)                                                          \
    {                                                                                         \
        _Pragma("omp parallel for simd schedule(static) num_threads(threads) if(parallel: n >= 65536)") \
        for (ptrdiff_t i = 0; i < n; i++) {                                                   \
            float xi = LOAD_##X(x[i]);                                                        \
            float c = xi < l ? l : xi;                                                        \
            c = c > u ? u : c;                                                                \
            float t = (c - l) / s;                                                            \
            float q = rintf(t);                                                               \
            float p = q * s;                                                                  \
            y[i] = STORE_##Y(p + l);                                                          \
        }                                                                                     \
    }

/* One block: float sums. Kept out of line: GCC vectorises an "omp simd" reduction well only in
 * a loop that is not nested (nested, its accumulators live in memory). The masked sums are
 * products with 0/1, not conditional adds, which GCC reduces in order (x + 0.0 is not an
 * identity for -0.0), ten times slower.
 * fq_backward[_X[_Y]](g, x, gx, n, l, u, s, threads, sums[3]); returns 0, or -1 (out of memory) */
#define DEFINE_BACKWARD(NAME, X, Y)                                                           \
    __attribute__((noinline)) static void NAME##_block(                                       \
        const TYPE_##Y *restrict g, const TYPE_##X *restrict x, TYPE_##X *restrict gx,        \
        ptrdiff_t n, float l, float u, float s, float *restrict out)                          \
    {                                                                                         \
        float bd = 0.0f, bl = 0.0f, bu = 0.0f;                                                \
        _Pragma("omp simd reduction(+:bd, bl, bu)")                                           \
        for (ptrdiff_t i = 0; i < n; i++) {                                                   \
            float xi = LOAD_##X(x[i]), gi = LOAD_##Y(g[i]);                                   \
            float c = xi < l ? l : xi;                                                        \
            c = c > u ? u : c;                                                                \
            float t = (c - l) / s;                                                            \
            bd += gi * (rintf(t) - t);                                                        \
            bl += gi * (float)(xi <= l);                                                      \
            bu += gi * (float)(xi >= u);                                                      \
            gx[i] = STORE_##X((xi < l || xi > u) ? 0.0f : gi);                                \
        }                                                                                     \
        out[0] = bd;                                                                          \
        out[1] = bl;                                                                          \
        out[2] = bu;                                                                          \
    }                                                                                         \
    int NAME(const TYPE_##Y *restrict g, const TYPE_##X *restrict x, TYPE_##X *restrict gx,   \
             ptrdiff_t n, float l, float u, float s, int threads,                             \
             double *sums /* [3]: g*(q - t), g*[x <= l], g*[x >= u] */)                       \
    {                                                                                         \
        ptrdiff_t blocks = (n + BLOCK - 1) / BLOCK;                                           \
        float *part = malloc(3 * (size_t)(blocks > 0 ? blocks : 1) * sizeof(float));          \
        if (part == NULL)                                                                     \
            return -1;                                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(parallel: n >= 65536)") \
        for (ptrdiff_t b = 0; b < blocks; b++) {                                              \
            ptrdiff_t a = b * BLOCK;                                                          \
            NAME##_block(g + a, x + a, gx + a, a + BLOCK < n ? BLOCK : n - a, l, u, s,        \
                         part + 3 * b);                                                       \
        }                                                                                     \
        double sd = 0.0, sl = 0.0, su = 0.0;                                                  \
        for (ptrdiff_t b = 0; b < blocks; b++) { /* in order: any thread count, same sums */  \
            sd += part[3 * b];                                                                \
            sl += part[3 * b + 1];                                                            \
            su += part[3 * b + 2];                                                            \
        }                                                                                     \
        free(part);                                                                           \
        sums[0] = sd;                                                                         \
        sums[1] = sl;                                                                         \
        sums[2] = su;                                                                         \
        return 0;                                                                             \
    }

DEFINE_FORWARD(fq_forward, f32, f32)
DEFINE_FORWARD(fq_forward_bf16, bf16, bf16)
DEFINE_FORWARD(fq_forward_f32_bf16, f32, bf16)
DEFINE_BACKWARD(fq_backward, f32, f32)
DEFINE_BACKWARD(fq_backward_bf16, bf16, bf16)
DEFINE_BACKWARD(fq_backward_f32_bf16, f32, bf16)

/* 1 when built with OpenMP (the kernels split over threads), else 0 */
int fq_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
