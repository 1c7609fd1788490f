// CPU emulation of the esr_lowbit kernels, for testing their indexing and maths without a GPU.
// It compiles the very kernel bodies of lowbit_kernels.cuh as host C++ with shims for the CUDA
// built-ins, and runs each block with one std::thread per CUDA thread (std::barrier stands in for
// __syncthreads, function-local statics for __shared__ memory; blocks run one after another).
// Test-only: tests/test_kernels.py builds it with `g++ -std=c++20 -pthread -ffp-contract=off`.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct dim3
{
    unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
static std::barrier<>* gBarrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __syncthreads() gBarrier->arrive_and_wait()

struct __half
{
    _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c)
{
    for (int i = 0; i < 4; ++i)
        c += ((a >> (8 * i)) & 0xFFu) * ((b >> (8 * i)) & 0xFFu);
    return c;
}

#include "lowbit_kernels.cuh"

using namespace esr_detail;

static void launch(dim3 grid, unsigned threads, std::function<void()> const& body)
{
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x)
            {
                std::barrier<> bar(threads);
                gBarrier = &bar;
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; ++t)
                    pool.emplace_back([&, t] {
                        threadIdx = dim3{t, 0, 0};
                        blockIdx = dim3{x, y, z};
                        body();
                    });
                for (auto& th : pool)
                    th.join();
            }
}

extern "C" {

// Same arguments as the C API (host pointers); x_dtype/out_dtype 0 = f32, 1 = f16.
int emu_fake_quant_f32(const float* x, float* y, int64_t n, const float* lower, const float* upper, int bits)
{
    launch(dim3{2, 1, 1}, 64, [&] { fakeQuantKernel(x, y, n, lower, upper, float((1 << bits) - 1)); });
    return 0;
}

int emu_lowbit_linear_fused(const void* x, int x_dtype, int64_t M, int64_t K, int64_t N, int G,
                            const float* al, const float* au, int a_bits, const uint32_t* w, int w_bits,
                            const float* wl, const float* ws, const float* bias, void* out, int out_dtype)
{
    std::vector<uint8_t> codes(static_cast<size_t>(G * M * K));
    float const la = float((1 << a_bits) - 1);
    if (x_dtype == 0)
        launch(dim3{2, unsigned(G), 1}, 64, [&] {
            quantizeActKernel<float>(static_cast<const float*>(x), M * K, G, al, au, la, codes.data());
        });
    else
        launch(dim3{2, unsigned(G), 1}, 64, [&] {
            quantizeActKernel<__half>(static_cast<const __half*>(x), M * K, G, al, au, la, codes.data());
        });
    int64_t const Ng = N / G;
    int64_t const cpw = 32 / w_bits;
    int64_t const words = (K + cpw - 1) / cpw;
    dim3 const grid{unsigned((Ng + BN - 1) / BN), unsigned((M + BM - 1) / BM), unsigned(G)};
    if (out_dtype == 0)
        launch(grid, TPB, [&] {
            lowbitLinearKernel<float>(codes.data(), M, K, N, G, al, au, la, w, words, w_bits, wl, ws, bias,
                                      static_cast<float*>(out));
        });
    else
        launch(grid, TPB, [&] {
            lowbitLinearKernel<__half>(codes.data(), M, K, N, G, al, au, la, w, words, w_bits, wl, ws, bias,
                                       static_cast<__half*>(out));
        });
    return 0;
}
}
