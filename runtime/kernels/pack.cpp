// Host side of esr_lowbit: weight packing (layout documented in esr_lowbit.h, section 3) and the
// status strings. Plain C++, so a host-only build (no CUDA compiler) still packs and unpacks.
#include "esr_lowbit.h"

#include <cstring>

extern "C" {

int esr_version(void) { return ESR_LOWBIT_VERSION; }

#ifdef ESR_NO_CUDA
int esr_has_cuda(void) { return 0; }
const char* esr_last_cuda_error(void) { return ""; }
#endif

const char* esr_status_string(int status)
{
    switch (status)
    {
    case ESR_OK: return "ok";
    case ESR_ERR_INVALID_ARGUMENT: return "invalid argument (null pointer, bad size or K > 32768)";
    case ESR_ERR_UNSUPPORTED_BITS: return "unsupported bit width (expected 2..8)";
    case ESR_ERR_CODE_RANGE: return "a code does not fit in the bit width";
    case ESR_ERR_CUDA: return "CUDA error";
    case ESR_ERR_NO_CUDA: return "library built without CUDA";
    case ESR_ERR_SHAPE: return "N is not divisible by act_groups";
    default: return "unknown status";
    }
}

int esr_codes_per_word(int bits)
{
    if (bits < 2 || bits > 8)
        return 0;
    return 32 / bits;
}

int64_t esr_packed_words(int64_t K, int bits)
{
    int const cpw = esr_codes_per_word(bits);
    if (cpw == 0 || K < 0)
        return 0;
    return (K + cpw - 1) / cpw;
}

int esr_pack_weights(const uint8_t* h_codes, int64_t N, int64_t K, int bits, uint32_t* h_packed)
{
    int const cpw = esr_codes_per_word(bits);
    if (cpw == 0)
        return ESR_ERR_UNSUPPORTED_BITS;
    if (h_codes == nullptr || h_packed == nullptr || N <= 0 || K <= 0)
        return ESR_ERR_INVALID_ARGUMENT;
    int64_t const words = esr_packed_words(K, bits);
    uint32_t const limit = 1u << bits;
    std::memset(h_packed, 0, sizeof(uint32_t) * static_cast<size_t>(N * words));
    for (int64_t n = 0; n < N; ++n)
    {
        for (int64_t k = 0; k < K; ++k)
        {
            uint32_t const c = h_codes[n * K + k];
            if (c >= limit)
                return ESR_ERR_CODE_RANGE;
            h_packed[n * words + k / cpw] |= c << ((k % cpw) * bits);
        }
    }
    return ESR_OK;
}

int esr_unpack_weights(const uint32_t* h_packed, int64_t N, int64_t K, int bits, uint8_t* h_codes)
{
    int const cpw = esr_codes_per_word(bits);
    if (cpw == 0)
        return ESR_ERR_UNSUPPORTED_BITS;
    if (h_codes == nullptr || h_packed == nullptr || N <= 0 || K <= 0)
        return ESR_ERR_INVALID_ARGUMENT;
    int64_t const words = esr_packed_words(K, bits);
    uint32_t const mask = (1u << bits) - 1u;
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k)
            h_codes[n * K + k]
                = static_cast<uint8_t>((h_packed[n * words + k / cpw] >> ((k % cpw) * bits)) & mask);
    return ESR_OK;
}

} // extern "C"
