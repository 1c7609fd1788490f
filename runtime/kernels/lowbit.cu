// esr_lowbit CUDA kernels: fake-quant, activation quantization and the packed low-bit linear.
// The maths, the rounding rules and the packing are documented in esr_lowbit.h.
#include "esr_lowbit.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>

namespace
{

thread_local char gLastCudaError[256] = "";

int checkLaunch()
{
    cudaError_t const e = cudaGetLastError();
    if (e == cudaSuccess)
        return ESR_OK;
    std::snprintf(gLastCudaError, sizeof(gLastCudaError), "%s: %s", cudaGetErrorName(e),
                  cudaGetErrorString(e));
    return ESR_ERR_CUDA;
}

bool validBits(int bits) { return bits >= 2 && bits <= 8; }

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

int gridFor(int64_t n, int threads)
{
    int64_t blocks = (n + threads - 1) / threads;
    if (blocks > 65535 * 8)
        blocks = 65535 * 8;
    return static_cast<int>(blocks < 1 ? 1 : blocks);
}

} // namespace

extern "C" {

int esr_has_cuda(void) { return 1; }

const char* esr_last_cuda_error(void) { return gLastCudaError; }

int esr_fake_quant_f32(const float* d_x, float* d_y, int64_t n, const float* d_lower,
                       const float* d_upper, int bits, void* stream)
{
    if (!validBits(bits))
        return ESR_ERR_UNSUPPORTED_BITS;
    if (d_x == nullptr || d_y == nullptr || d_lower == nullptr || d_upper == nullptr || n < 0)
        return ESR_ERR_INVALID_ARGUMENT;
    if (n == 0)
        return ESR_OK;
    int const threads = 256;
    fakeQuantKernel<<<gridFor(n, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
        d_x, d_y, n, d_lower, d_upper, static_cast<float>((1 << bits) - 1));
    return checkLaunch();
}

int esr_quantize_act(const void* d_x, int x_dtype, int64_t M, int64_t K, int act_groups,
                     const float* d_lower, const float* d_upper, int bits, uint8_t* d_codes,
                     void* stream)
{
    if (!validBits(bits))
        return ESR_ERR_UNSUPPORTED_BITS;
    if (d_x == nullptr || d_lower == nullptr || d_upper == nullptr || d_codes == nullptr || M <= 0
        || K <= 0 || act_groups < 1 || act_groups > 65535)
        return ESR_ERR_INVALID_ARGUMENT;
    int64_t const count = M * K;
    int const threads = 256;
    dim3 const grid(gridFor(count, threads), act_groups);
    float const levels = static_cast<float>((1 << bits) - 1);
    cudaStream_t const s = static_cast<cudaStream_t>(stream);
    if (x_dtype == ESR_F32)
        quantizeActKernel<float><<<grid, threads, 0, s>>>(static_cast<const float*>(d_x), count,
                                                           act_groups, d_lower, d_upper, levels,
                                                           d_codes);
    else if (x_dtype == ESR_F16)
        quantizeActKernel<__half><<<grid, threads, 0, s>>>(static_cast<const __half*>(d_x), count,
                                                            act_groups, d_lower, d_upper, levels,
                                                            d_codes);
    else
        return ESR_ERR_INVALID_ARGUMENT;
    return checkLaunch();
}

int esr_lowbit_linear(const uint8_t* d_act_codes, int64_t M, int64_t K, int64_t N, int act_groups,
                      const float* d_act_lower, const float* d_act_upper, int act_bits,
                      const uint32_t* d_w_packed, int w_bits, const float* d_w_lower,
                      const float* d_w_scale, const float* d_bias, void* d_out, int out_dtype,
                      void* stream)
{
    if (!validBits(act_bits) || !validBits(w_bits))
        return ESR_ERR_UNSUPPORTED_BITS;
    if (d_act_codes == nullptr || d_act_lower == nullptr || d_act_upper == nullptr
        || d_w_packed == nullptr || d_w_lower == nullptr || d_w_scale == nullptr
        || d_out == nullptr || M <= 0 || K <= 0 || K > 32768 || N <= 0 || act_groups < 1
        || act_groups > 65535)
        return ESR_ERR_INVALID_ARGUMENT;
    if (N % act_groups != 0)
        return ESR_ERR_SHAPE;
    int64_t const Ng = N / act_groups;
    int64_t const mBlocks = (M + BM - 1) / BM;
    if (mBlocks > 65535)
        return ESR_ERR_INVALID_ARGUMENT; // > 4.19 M rows: split the batch
    dim3 const grid(static_cast<unsigned>((Ng + BN - 1) / BN), static_cast<unsigned>(mBlocks),
                    act_groups);
    int64_t const words = esr_packed_words(K, w_bits);
    float const levels = static_cast<float>((1 << act_bits) - 1);
    cudaStream_t const s = static_cast<cudaStream_t>(stream);
    if (out_dtype == ESR_F16)
        lowbitLinearKernel<__half><<<grid, TPB, 0, s>>>(
            d_act_codes, M, K, N, act_groups, d_act_lower, d_act_upper, levels, d_w_packed, words,
            w_bits, d_w_lower, d_w_scale, d_bias, static_cast<__half*>(d_out));
    else if (out_dtype == ESR_F32)
        lowbitLinearKernel<float><<<grid, TPB, 0, s>>>(
            d_act_codes, M, K, N, act_groups, d_act_lower, d_act_upper, levels, d_w_packed, words,
            w_bits, d_w_lower, d_w_scale, d_bias, static_cast<float*>(d_out));
    else
        return ESR_ERR_INVALID_ARGUMENT;
    return checkLaunch();
}

size_t esr_lowbit_workspace_size(int64_t M, int64_t K, int act_groups)
{
    if (M <= 0 || K <= 0 || act_groups < 1)
        return 0;
    size_t const bytes = static_cast<size_t>(M) * static_cast<size_t>(K) * act_groups;
    return (bytes + 255) / 256 * 256;
}

int esr_lowbit_linear_fused(const void* d_x, int x_dtype, int64_t M, int64_t K, int64_t N,
                            int act_groups, const float* d_act_lower, const float* d_act_upper,
                            int act_bits, const uint32_t* d_w_packed, int w_bits,
                            const float* d_w_lower, const float* d_w_scale, const float* d_bias,
                            void* d_out, int out_dtype, void* d_workspace, void* stream)
{
    if (d_workspace == nullptr)
        return ESR_ERR_INVALID_ARGUMENT;
    uint8_t* codes = static_cast<uint8_t*>(d_workspace);
    int status = esr_quantize_act(d_x, x_dtype, M, K, act_groups, d_act_lower, d_act_upper,
                                  act_bits, codes, stream);
    if (status != ESR_OK)
        return status;
    return esr_lowbit_linear(codes, M, K, N, act_groups, d_act_lower, d_act_upper, act_bits,
                             d_w_packed, w_bits, d_w_lower, d_w_scale, d_bias, d_out, out_dtype,
                             stream);
}

} // extern "C"
