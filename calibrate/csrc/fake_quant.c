/* Fused per-tensor fake quantization for a CPU (calibrate.fused_fq loads it with ctypes).
 *
 * The forward is the eager op sequence of calibrate.quantizer._FakeQuantSTE, one float32
 * operation at a time and in the same order (compiled with -ffp-contract=off, so no FMA), which
 * makes it bit-identical to PyTorch's:  c = clamp(x, l, u); t = (c - l) / s; q = rint(t)
 * (half to even); y = q * s + l.
 *
 * The backward makes one pass instead of about twenty: gx = g on [l, u] (else 0) and the three
 * sums the bounds need, sum g*(q - t), sum g*[x <= l], sum g*[x >= u] (float within blocks of
 * 4096 values, double across them; the order is the vectoriser's, so the sums differ from
 * PyTorch's float32 ones in the last bits).
 * Both work on a contiguous range [0, n) of float32 values; the caller splits a tensor into
 * ranges, one per thread.
 */
#include <math.h>
#include <stddef.h>

#define BLOCK 4096

void fq_forward(const float *restrict x, float *restrict y, ptrdiff_t n, float l, float u, float s)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        float c = x[i] < l ? l : x[i];
        c = c > u ? u : c;
        float t = (c - l) / s;
        float q = rintf(t);
        float p = q * s;
        y[i] = p + l;
    }
}

/* One block: float sums. Kept out of line: GCC vectorises an "omp simd" reduction well only in
 * a loop that is not nested (nested, its accumulators live in memory). The masked sums are
 * products with 0/1, not conditional adds, which GCC reduces in order (x + 0.0 is not an
 * identity for -0.0), ten times slower. */
__attribute__((noinline)) static void block_backward(
    const float *restrict g, const float *restrict x, float *restrict gx, ptrdiff_t n, float l,
    float u, float s, float *restrict out)
{
    float bd = 0.0f, bl = 0.0f, bu = 0.0f;
#pragma omp simd reduction(+:bd, bl, bu)
    for (ptrdiff_t i = 0; i < n; i++) {
        float xi = x[i], gi = g[i];
        float c = xi < l ? l : xi;
        c = c > u ? u : c;
        float t = (c - l) / s;
        bd += gi * (rintf(t) - t);
        bl += gi * (float)(xi <= l);
        bu += gi * (float)(xi >= u);
        gx[i] = (xi < l || xi > u) ? 0.0f : gi;
    }
    out[0] = bd;
    out[1] = bl;
    out[2] = bu;
}

void fq_backward(const float *restrict g, const float *restrict x, float *restrict gx,
                 ptrdiff_t n, float l, float u, float s,
                 double *sums /* [3]: g*(q - t), g*[x <= l], g*[x >= u] */)
{
    double sd = 0.0, sl = 0.0, su = 0.0;
    float part[3];
    for (ptrdiff_t b = 0; b < n; b += BLOCK) {  /* float within a block, double across */
        block_backward(g + b, x + b, gx + b, b + BLOCK < n ? BLOCK : n - b, l, u, s, part);
        sd += part[0];
        sl += part[1];
        su += part[2];
    }
    sums[0] = sd;
    sums[1] = sl;
    sums[2] = su;
}
