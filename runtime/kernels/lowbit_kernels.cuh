// esr_lowbit device code: the grid, the fake-quant and activation kernels and the tiled low-bit
// GEMM. Included by lowbit.cu; kept in a header so a CPU emulation (tests/test_kernels.py) can
// compile the very same kernel bodies with host shims for the CUDA built-ins.
#pragma once

#include <cstdint>

namespace esr_detail
{

// One quantization step of the 2DQuant grid, with exactly torch's float32 operations and no FMA
// contraction: q = rint((clamp(x, l, u) - l) / s). NaN propagates like torch.maximum/minimum.
__device__ __forceinline__ float gridCode(float x, float l, float u, float s)
{
    float v = (x < l) ? l : x;
    v = (v > u) ? u : v;
    return rintf(__fdiv_rn(__fsub_rn(v, l), s));
}

__device__ __forceinline__ float gridStep(float l, float u, float levelsMinus1)
{
    return __fdiv_rn(__fsub_rn(u, l), levelsMinus1);
}

__device__ __forceinline__ float toFloat(float v) { return v; }
__device__ __forceinline__ float toFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

__global__ void fakeQuantKernel(const float* __restrict__ x, float* __restrict__ y, int64_t n,
                                const float* __restrict__ lower, const float* __restrict__ upper,
                                float levelsMinus1)
{
    float const l = *lower;
    float const u = *upper;
    float const s = gridStep(l, u, levelsMinus1);
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        float const q = gridCode(x[i], l, u, s);
        y[i] = __fadd_rn(l, __fmul_rn(s, q));
    }
}

template <typename T>
__global__ void quantizeActKernel(const T* __restrict__ x, int64_t count, int act_groups,
                                  const float* __restrict__ lower, const float* __restrict__ upper,
                                  float levelsMinus1, uint8_t* __restrict__ codes)
{
    int const g = blockIdx.y;
    if (g >= act_groups)
        return;
    float const l = lower[g];
    float const u = upper[g];
    float const s = gridStep(l, u, levelsMinus1);
    uint8_t* out = codes + g * count;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
        out[i] = static_cast<uint8_t>(gridCode(toFloat(x[i]), l, u, s));
}

// Tiled integer GEMM: a block computes a BM x BN tile of one column group with 256 threads (16 x
// 16), each thread a 4 x 4 sub-tile strided by 16 (conflict-free shared loads). A K-chunk of BK
// codes is staged in shared memory as bytes packed 4 per uint32, so the inner loop is __dp4a.
constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 32;
constexpr int BKW = BK / 4; // uint32 words per row of a chunk
constexpr int TPB = 256;

template <typename OutT>
__global__ void __launch_bounds__(TPB)
lowbitLinearKernel(const uint8_t* __restrict__ act, int64_t M, int64_t K, int64_t N, int act_groups,
                   const float* __restrict__ actLower, const float* __restrict__ actUpper,
                   float actLevelsMinus1, const uint32_t* __restrict__ w, int64_t wordsPerRow,
                   int wBits, const float* __restrict__ wLower, const float* __restrict__ wScale,
                   const float* __restrict__ bias, OutT* __restrict__ out)
{
    __shared__ uint32_t As[BM][BKW + 1];
    __shared__ uint32_t Bs[BN][BKW + 1];

    int const g = blockIdx.z;
    int64_t const Ng = N / act_groups;
    int64_t const m0 = static_cast<int64_t>(blockIdx.y) * BM;
    int64_t const n0 = static_cast<int64_t>(blockIdx.x) * BN;
    int const tx = threadIdx.x % 16;
    int const ty = threadIdx.x / 16;
    const uint8_t* A = act + g * M * K;
    int const cpw = 32 / wBits;
    uint32_t const mask = (1u << wBits) - 1u;

    uint32_t acc[4][4] = {};
    uint32_t rowSum[4] = {};
    uint32_t colSum[4] = {};

    for (int64_t k0 = 0; k0 < K; k0 += BK)
    {
        for (int idx = threadIdx.x; idx < BM * BKW; idx += TPB)
        {
            int const r = idx / BKW;
            int const c = idx % BKW;
            int64_t const m = m0 + r;
            uint32_t word = 0;
            if (m < M)
            {
                for (int j = 0; j < 4; ++j)
                {
                    int64_t const k = k0 + c * 4 + j;
                    if (k < K)
                        word |= static_cast<uint32_t>(A[m * K + k]) << (8 * j);
                }
            }
            As[r][c] = word;
        }
        for (int idx = threadIdx.x; idx < BN * BKW; idx += TPB)
        {
            int const r = idx / BKW;
            int const c = idx % BKW;
            int64_t const n = n0 + r;
            uint32_t word = 0;
            if (n < Ng)
            {
                const uint32_t* row = w + (g * Ng + n) * wordsPerRow;
                for (int j = 0; j < 4; ++j)
                {
                    int64_t const k = k0 + c * 4 + j;
                    if (k < K)
                    {
                        uint32_t const code = (row[k / cpw] >> ((k % cpw) * wBits)) & mask;
                        word |= code << (8 * j);
                    }
                }
            }
            Bs[r][c] = word;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < BKW; ++c)
        {
            uint32_t a[4];
            uint32_t b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                a[i] = As[ty + 16 * i][c];
                b[i] = Bs[tx + 16 * i][c];
                rowSum[i] = __dp4a(a[i], 0x01010101u, rowSum[i]);
                colSum[i] = __dp4a(b[i], 0x01010101u, colSum[i]);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

    float const la = actLower[g];
    float const sa = gridStep(la, actUpper[g], actLevelsMinus1);
    float const kf = static_cast<float>(K);
#pragma unroll
    for (int j = 0; j < 4; ++j)
    {
        int64_t const n = n0 + tx + 16 * j;
        if (n >= Ng)
            continue;
        int64_t const col = g * Ng + n;
        float const lw = wLower[col];
        float const sw = wScale[col];
        float const colTerm = kf * la * lw + la * sw * static_cast<float>(colSum[j])
            + (bias != nullptr ? bias[col] : 0.0F);
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            int64_t const m = m0 + ty + 16 * i;
            if (m >= M)
                continue;
            float const y = colTerm + sa * lw * static_cast<float>(rowSum[i])
                + sa * sw * static_cast<float>(acc[i][j]);
            store(out + m * N + col, y);
        }
    }
}

} // namespace esr_detail
