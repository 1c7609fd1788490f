/*
 * esr_lowbit: low-bit kernels for edge-sr (2DQuant grids) — the C API.
 *
 * One library serves two callers: the TensorRT IPluginV3 wrapper (runtime/plugins/) and the
 * ctypes binding (runtime/lowbit.py). Every entry point is `extern "C"`, never throws, and returns
 * an esr_status (0 = ESR_OK). Device pointers are marked `d_`; host pointers `h_`.
 *
 * ---------------------------------------------------------------------------------------------
 * 1. The grid (2DQuant, calibrate/quantizer.py)
 *
 *   b bits, levels L = 2^b, learned lower bound l and upper bound u (per tensor):
 *       s     = (u - l) / (L - 1)                     step, float32 true division
 *       q(x)  = rint((clamp(x, l, u) - l) / s)        integer code in [0, L-1], round-half-even
 *       x^    = l + s * q(x)                          dequantized value
 *   esr_fake_quant_f32 evaluates exactly these float32 operations, one IEEE rounding per
 *   operation (no FMA contraction: __fsub_rn/__fdiv_rn/__fmul_rn/__fadd_rn, rintf), so its output
 *   is bit-identical to torch's CPU fake_quant (torch.round is half-to-even). Note: torch on CUDA
 *   computes `(u - l) / (L - 1)` as a multiplication by the reciprocal (a CPU scalar divisor), which
 *   can differ from the true quotient by 1 ulp; the reference is the true quotient (CPU torch).
 *   l and u are read from device memory, so the calibrated bounds never cost a host sync.
 *   NaN inputs propagate (as torch.maximum/minimum do).
 *
 * 2. The low-bit linear  y = x^ W^T + bias  with integer arithmetic
 *
 *   Activations: codes qa[m,k] on the grid (la, sa), bits ba (per tensor, optionally one grid per
 *   output group, see below). Weights: codes qw[n,k] on the grid (lw[n], sw[n]), bits bw; the
 *   per-row arrays carry a per-tensor grid (all rows equal), per-group grids (qkv: three blocks of
 *   rows) or per-channel grids. Bias b[n] (may be NULL).
 *
 *     y[m,n] = sum_k (la + sa qa[m,k]) (lw[n] + sw[n] qw[n,k]) + b[n]
 *            = K la lw[n]                      (constant per column)
 *            + la sw[n] * Sw[n]                Sw[n] = sum_k qw[n,k]   (int32, per column)
 *            + sa lw[n] * Sa[m]                Sa[m] = sum_k qa[m,k]   (int32, per row)
 *            + sa sw[n] * A[m,n]               A[m,n] = sum_k qa[m,k] qw[n,k]  (int32 GEMM)
 *            + b[n]
 *
 *   The zero points are real-valued (zp = -l/s is not an integer for a learned grid), so this
 *   affine expansion — rather than integer zero-point subtraction — is what keeps the maths
 *   exact. A, Sa and Sw are exact int32 sums (codes are unsigned, < 2^8, so A < 2^16 K: exact for
 *   K <= 32768, which the API enforces). The four correction terms are combined in float32 in the
 *   epilogue, then rounded once to the output type (FP16 by default). The result equals
 *   F.linear(fake_quant(x), fake_quant(W), b) up to float32 rounding of the epilogue and the FP16
 *   output rounding ("FP16 noise"); the codes themselves are bit-exact.
 *   The inner product uses __dp4a (4 x u8*u8 -> u32 per instruction, sm_61+).
 *
 *   Activation groups (qkv separation): with act_groups = G > 1 the N output columns form G equal
 *   blocks of N/G columns; block g reads activation codes quantized with grid g
 *   (d_act_lower[g], d_act_upper[g]). Activation codes are stored [G, M, K] (uint8).
 *
 * 3. Weight packing (esr_pack_weights)
 *
 *   Codes are packed per output row along K into little-endian uint32 words:
 *       cpw   = floor(32 / bits)   codes per word: 2-bit 16, 3-bit 10, 4-bit 8, 5-bit 6,
 *                                  6-bit 5, 7-bit 4, 8-bit 4
 *       words = ceil(K / cpw)      words per row; the packed matrix is [N, words] uint32
 *       code (n, k) lives in word  packed[n * words + k / cpw]  at bits
 *                                  [(k % cpw) * bits, (k % cpw + 1) * bits)
 *   Unused high bits (3-bit: bits 30-31) and the padding codes of the last word are zero. A word
 *   never straddles codes, so the kernel unpacks with one shift and one mask. 3-bit weights cost
 *   3.2 bits each (10 per 32-bit word), 2-bit and 4-bit cost exactly 2 and 4 bits.
 */
#ifndef ESR_LOWBIT_H
#define ESR_LOWBIT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ESR_LOWBIT_VERSION 1

#if defined(_WIN32)
#define ESR_API
#else
#define ESR_API __attribute__((visibility("default")))
#endif

typedef enum esr_status {
    ESR_OK = 0,
    ESR_ERR_INVALID_ARGUMENT = 1, /* null pointer, non-positive size, K too large */
    ESR_ERR_UNSUPPORTED_BITS = 2, /* bits outside 2..8 */
    ESR_ERR_CODE_RANGE = 3,       /* a weight code >= 2^bits given to the packer */
    ESR_ERR_CUDA = 4,             /* a CUDA launch failed (esr_last_cuda_error() says which) */
    ESR_ERR_NO_CUDA = 5,          /* library built without CUDA (host packing only) */
    ESR_ERR_SHAPE = 6             /* N not divisible by act_groups */
} esr_status;

typedef enum esr_dtype { ESR_F32 = 0, ESR_F16 = 1 } esr_dtype;

/* Library version (ESR_LOWBIT_VERSION) and whether the CUDA kernels were compiled in. */
ESR_API int esr_version(void);
ESR_API int esr_has_cuda(void);
ESR_API const char* esr_status_string(int status);
/* The CUDA error string of the last failed launch in this thread ("" if none). */
ESR_API const char* esr_last_cuda_error(void);

/* ---- host packing (no CUDA needed) ---- */
ESR_API int esr_codes_per_word(int bits);                   /* 0 if bits unsupported */
ESR_API int64_t esr_packed_words(int64_t K, int bits);      /* words per row, 0 if bits unsupported */
ESR_API int esr_pack_weights(const uint8_t* h_codes, int64_t N, int64_t K, int bits, uint32_t* h_packed);
ESR_API int esr_unpack_weights(const uint32_t* h_packed, int64_t N, int64_t K, int bits, uint8_t* h_codes);

/* ---- device kernels; `stream` is a cudaStream_t (void* so ctypes needs no CUDA headers) ---- */

/* y[i] = fake-quant of x[i] on the grid (d_lower[0], d_upper[0]), 2^bits levels. x == y allowed. */
ESR_API int esr_fake_quant_f32(const float* d_x, float* d_y, int64_t n, const float* d_lower,
                       const float* d_upper, int bits, void* stream);

/* Activation codes: x [M, K] (x_dtype ESR_F32 or ESR_F16) -> d_codes [G, M, K] uint8, one grid per
 * group g: (d_lower[g], d_upper[g]). */
ESR_API int esr_quantize_act(const void* d_x, int x_dtype, int64_t M, int64_t K, int act_groups,
                     const float* d_lower, const float* d_upper, int bits, uint8_t* d_codes,
                     void* stream);

/* y [M, N] (out_dtype) = low-bit linear of activation codes [G, M, K] and packed weights
 * [N, esr_packed_words(K, w_bits)]; d_w_lower/d_w_scale are per output row, d_bias may be NULL. */
ESR_API int esr_lowbit_linear(const uint8_t* d_act_codes, int64_t M, int64_t K, int64_t N, int act_groups,
                      const float* d_act_lower, const float* d_act_upper, int act_bits,
                      const uint32_t* d_w_packed, int w_bits, const float* d_w_lower,
                      const float* d_w_scale, const float* d_bias, void* d_out, int out_dtype,
                      void* stream);

/* Workspace bytes esr_lowbit_linear_fused needs for its activation codes (G * M * K, aligned). */
ESR_API size_t esr_lowbit_workspace_size(int64_t M, int64_t K, int act_groups);

/* esr_quantize_act + esr_lowbit_linear from a float input x [M, K]; what the plugin enqueues. */
ESR_API int esr_lowbit_linear_fused(const void* d_x, int x_dtype, int64_t M, int64_t K, int64_t N,
                            int act_groups, const float* d_act_lower, const float* d_act_upper,
                            int act_bits, const uint32_t* d_w_packed, int w_bits,
                            const float* d_w_lower, const float* d_w_scale, const float* d_bias,
                            void* d_out, int out_dtype, void* d_workspace, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* ESR_LOWBIT_H */
