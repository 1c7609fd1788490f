// Self-test of esr_lowbit on a GPU (ctest / scripts/gpu_check.sh): the fake-quant grid against a
// host float32 reference (bit-exact), the low-bit linear against a host double reference of
// F.linear(fake_quant(x), fake_quant(W), b) (within FP16 output noise), for every bit width.
#include "esr_lowbit.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#define CHECK(x)                                                                                   \
    do                                                                                             \
    {                                                                                              \
        int const s_ = (x);                                                                        \
        if (s_ != ESR_OK)                                                                          \
        {                                                                                          \
            std::printf("FAIL %s: %s %s\n", #x, esr_status_string(s_), esr_last_cuda_error());     \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

static float hostCode(float x, float l, float u, float s)
{
    volatile float v = x < l ? l : (x > u ? u : x);
    volatile float d = v - l;
    volatile float r = d / s;
    return std::nearbyint(r); // default rounding mode: half to even
}

template <typename T>
static T* toDevice(std::vector<T> const& h)
{
    T* d = nullptr;
    cudaMalloc(&d, h.size() * sizeof(T));
    cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
    return d;
}

static int testBits(int bits, std::mt19937& rng)
{
    int const M = 300, K = 60, N = 180, G = 3;
    std::normal_distribution<float> nd(0.F, 1.F);
    float const levels = static_cast<float>((1 << bits) - 1);
    // fake-quant: bit-exact
    std::vector<float> x(M * K);
    for (auto& v : x)
        v = nd(rng) * 1.5F;
    float const l = -1.3F, u = 2.1F;
    volatile float num = u - l;
    float const s = num / levels;
    float *dx = toDevice(x), *dy = nullptr, *dl = toDevice(std::vector<float>{l}),
          *du = toDevice(std::vector<float>{u});
    cudaMalloc(&dy, x.size() * sizeof(float));
    CHECK(esr_fake_quant_f32(dx, dy, x.size(), dl, du, bits, nullptr));
    std::vector<float> y(x.size());
    cudaMemcpy(y.data(), dy, y.size() * sizeof(float), cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < x.size(); ++i)
    {
        volatile float prod = s * hostCode(x[i], l, u, s);
        float const ref = l + prod;
        if (std::memcmp(&ref, &y[i], sizeof(float)) != 0)
        {
            std::printf("FAIL fake_quant bits=%d i=%zu ref=%.9g got=%.9g\n", bits, i, ref, y[i]);
            return 1;
        }
    }
    // low-bit linear with 3 activation groups and per-row weight grids
    std::vector<float> al{-0.9F, -1.2F, -0.4F}, au{1.1F, 1.7F, 2.2F}, wl(N), ws(N), bias(N);
    std::vector<uint8_t> wc(N * K);
    std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
    for (int n = 0; n < N; ++n)
    {
        wl[n] = -0.2F - 0.001F * n;
        ws[n] = (0.4F + 0.002F * n) / levels;
        bias[n] = 0.01F * (n % 7) - 0.03F;
        for (int k = 0; k < K; ++k)
            wc[n * K + k] = static_cast<uint8_t>(code(rng));
    }
    std::vector<uint32_t> packed(N * esr_packed_words(K, bits));
    CHECK(esr_pack_weights(wc.data(), N, K, bits, packed.data()));
    float *dal = toDevice(al), *dau = toDevice(au), *dwl = toDevice(wl), *dws = toDevice(ws),
          *db = toDevice(bias);
    uint32_t* dw = toDevice(packed);
    void* ws_ = nullptr;
    cudaMalloc(&ws_, esr_lowbit_workspace_size(M, K, G));
    __half* dout = nullptr;
    cudaMalloc(&dout, M * N * sizeof(__half));
    CHECK(esr_lowbit_linear_fused(dx, ESR_F32, M, K, N, G, dal, dau, bits, dw, bits, dwl, dws, db,
                                  dout, ESR_F16, ws_, nullptr));
    std::vector<__half> out(M * N);
    cudaMemcpy(out.data(), dout, out.size() * sizeof(__half), cudaMemcpyDeviceToHost);
    double maxRel = 0;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n)
        {
            int const g = n / (N / G);
            volatile float an = au[g] - al[g];
            float const sa = an / levels;
            double acc = bias[n];
            for (int k = 0; k < K; ++k)
            {
                volatile float p = sa * hostCode(x[m * K + k], al[g], au[g], sa);
                float const xq = al[g] + p;
                double const wq = double(wl[n]) + double(ws[n]) * wc[n * K + k];
                acc += double(xq) * wq;
            }
            double const got = __half2float(out[m * N + n]);
            double const err = std::fabs(got - acc) / (std::fabs(acc) + 1e-2);
            maxRel = err > maxRel ? err : maxRel;
        }
    std::printf("bits=%d fake_quant bit-exact; lowbit_linear max rel err %.2e\n", bits, maxRel);
    cudaFree(dx); cudaFree(dy); cudaFree(dl); cudaFree(du); cudaFree(dal); cudaFree(dau);
    cudaFree(dwl); cudaFree(dws); cudaFree(db); cudaFree(dw); cudaFree(ws_); cudaFree(dout);
    if (maxRel > 2e-3)
    {
        std::printf("FAIL lowbit_linear bits=%d\n", bits);
        return 1;
    }
    return 0;
}

int main()
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    {
        std::printf("SKIP: no CUDA GPU\n");
        return 0;
    }
    std::mt19937 rng(0);
    for (int bits = 2; bits <= 8; ++bits)
        if (testBits(bits, rng) != 0)
            return 1;
    std::printf("esr_lowbit_test: all passed\n");
    return 0;
}
