// esr_lowbit CUDA kernels: fake-quant, activation quantization and the packed low-bit linear.
// The maths, the rounding rules and the packing are documented in esr_lowbit.h.
#include "esr_lowbit.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "lowbit_kernels.cuh"

using namespace esr_detail;

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
