"""The low-bit linear of the esr_lowbit kernels: a pure-PyTorch reference and a ctypes binding.

The reference computes exactly what the CUDA kernel and the TensorRT ``LowBitLinear`` node compute
(integer codes, int32-style sums, the affine corrections of ``runtime/kernels/esr_lowbit.h``), on
any device, so the maths is tested on CPU; the binding calls ``libesr_lowbit.so`` (``make kernels``)
on CUDA tensors. Weight packing: codes of one output row, ``32 // bits`` per little-endian uint32
word (stored as int32), see the header. Nothing here imports CUDA at module import.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_sr.errors import EdgeSRError, MissingDependencyError
from edge_sr.paths import REPO_ROOT

ESR_F32, ESR_F16 = 0, 1
LIB_ENV = "EDGE_SR_LOWBIT_LIB"


def codes_per_word(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return 32 // bits


def packed_words(k: int, bits: int) -> int:
    cpw = codes_per_word(bits)
    return (k + cpw - 1) // cpw


def grid_step(lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """``(u - l) / (2^b - 1)`` as a float32 true division (CPU torch; the kernel does the same)."""
    return (upper.float().cpu() - lower.float().cpu()) / float(2**bits - 1)


def quantize_codes(x: torch.Tensor, lower: torch.Tensor | float, upper: torch.Tensor | float,
                   bits: int) -> torch.Tensor:
    """Integer codes of ``x`` on the 2DQuant grid, the same float32 operations as ``fake_quant``."""
    lower = torch.as_tensor(lower, dtype=torch.float32, device=x.device)
    upper = torch.as_tensor(upper, dtype=torch.float32, device=x.device)
    step = grid_step(lower, upper, bits).to(x.device)
    v = torch.minimum(torch.maximum(x.float(), lower), upper)
    return torch.round((v - lower) / step).to(torch.uint8)


def pack_weights(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [N, K] into int32 words [N, ceil(K / (32 // bits))] (header section 3)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    n, k = c.shape
    cpw = codes_per_word(bits)
    words = packed_words(k, bits)
    c = torch.nn.functional.pad(c, (0, words * cpw - k)).reshape(n, words, cpw)
    shifts = torch.arange(cpw, dtype=torch.int64) * bits
    packed = (c << shifts).sum(-1)  # < 2^32, exact in int64
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_weights(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of ``pack_weights``: int32 words [N, words] -> uint8 codes [N, k]."""
    cpw = codes_per_word(bits)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(cpw, dtype=torch.int64) * bits
    codes = (p.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)


@dataclass
class LowBitLinearParams:
    """Everything one ``LowBitLinear`` needs; also the attributes of the ONNX/TensorRT node.

    ``act_lower``/``act_upper`` hold one grid per activation group (G = 1, or 3 for a qkv linear
    with separate q/k/v input quantizers); ``w_lower``/``w_scale`` one grid per output row.
    """

    act_bits: int
    w_bits: int
    in_features: int
    out_features: int
    act_lower: torch.Tensor  # float32 [G]
    act_upper: torch.Tensor  # float32 [G]
    w_lower: torch.Tensor  # float32 [N]
    w_scale: torch.Tensor  # float32 [N]
    packed: torch.Tensor  # int32 [N, words]
    bias: torch.Tensor | None  # float32 [N]

    @property
    def act_groups(self) -> int:
        return int(self.act_lower.numel())

    def weight_codes(self) -> torch.Tensor:
        return unpack_weights(self.packed.cpu(), self.in_features, self.w_bits)

    def dequantized_weight(self) -> torch.Tensor:
        """``lw + sw * q`` per row, float32, as fake_quant computes it."""
        q = self.weight_codes().float()
        return self.w_lower.float()[:, None] + self.w_scale.float()[:, None] * q

    def to(self, device: torch.device | str) -> LowBitLinearParams:
        mv = {k: getattr(self, k) for k in ("act_lower", "act_upper", "w_lower", "w_scale", "packed")}
        mv = {k: v.to(device).contiguous() for k, v in mv.items()}
        bias = None if self.bias is None else self.bias.float().to(device).contiguous()
        return LowBitLinearParams(self.act_bits, self.w_bits, self.in_features, self.out_features,
                                  bias=bias, **mv)


def params_from_quant_linear(qlin: nn.Module) -> LowBitLinearParams:
    """Read a calibrated ``calibrate.qmodules.QuantLinear`` into packed low-bit parameters."""
    w_q, a_q = list(qlin.weight_quantizers), list(qlin.act_quantizers)
    if not all(q.enabled for q in w_q + a_q):
        raise EdgeSRError("a QuantLinear with disabled quantizers cannot become a low-bit linear")
    if getattr(qlin, "rotation", None) is not None:
        raise EdgeSRError("the low-bit linear has no input rotation; calibrate without "
                          "--rotate for the low-bit CUDA path")
    w_bits, act_bits = w_q[0].bits, a_q[0].bits
    codes, lowers, scales = [], [], []
    for block, q in zip(qlin.weight_blocks(), w_q):
        lower, upper = q.lower.detach().float().cpu(), q.upper.detach().float().cpu()
        codes.append(quantize_codes(block.detach().float().cpu(), lower, upper, w_bits))
        # per tensor: () bounds; per channel: (rows, 1). Either way one value per row here.
        lowers.append(lower.reshape(-1).expand(block.shape[0]))
        scales.append(grid_step(lower, upper, w_bits).reshape(-1).expand(block.shape[0]))
    bias = None if qlin.bias is None else qlin.bias.detach().float().cpu()
    return LowBitLinearParams(
        act_bits=act_bits, w_bits=w_bits, in_features=qlin.in_features,
        out_features=qlin.out_features,
        act_lower=torch.stack([q.lower.detach().float().cpu() for q in a_q]),
        act_upper=torch.stack([q.upper.detach().float().cpu() for q in a_q]),
        w_lower=torch.cat(lowers).contiguous(), w_scale=torch.cat(scales).contiguous(),
        packed=pack_weights(torch.cat(codes), w_bits), bias=bias)


def lowbit_linear_reference(x: torch.Tensor, p: LowBitLinearParams) -> torch.Tensor:
    """The node's maths in PyTorch: codes, integer sums and affine corrections (header section 2).

    Sums are exact in float64 (integers < 2^53); returns float32 of shape [..., N].
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features).float().cpu()
    g_count = p.act_groups
    ng = p.out_features // g_count
    qw = p.weight_codes().double()  # [N, K]
    sw_sum = qw.sum(1)  # Sw[n]
    k = float(p.in_features)
    outs = []
    for g in range(g_count):
        la, ua = p.act_lower[g].float().cpu(), p.act_upper[g].float().cpu()
        sa = grid_step(la, ua, p.act_bits).double()
        qa = quantize_codes(x2, la, ua, p.act_bits).double()  # [M, K]
        rows = slice(g * ng, (g + 1) * ng)
        lw, sw = p.w_lower[rows].double().cpu(), p.w_scale[rows].double().cpu()
        acc = qa @ qw[rows].T  # A[m, n]
        y = (k * la.double() * lw + la.double() * sw * sw_sum[rows])[None, :] \
            + sa * lw[None, :] * qa.sum(1, keepdim=True) + sa * sw[None, :] * acc
        if p.bias is not None:
            y = y + p.bias[rows].double().cpu()[None, :]
        outs.append(y)
    return torch.cat(outs, 1).float().reshape(*lead, p.out_features)


# ---------------------------------------------------------------------------------------------
# ctypes binding to libesr_lowbit.so


def library_path() -> Path:
    env = os.environ.get(LIB_ENV)
    return Path(env) if env else REPO_ROOT / "build" / "kernels" / "libesr_lowbit.so"


_LIB: ctypes.CDLL | None = None


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Load the kernel library once; ``MissingDependencyError`` says how to build it."""
    global _LIB
    if _LIB is not None and path is None:
        return _LIB
    lib_path = Path(path) if path else library_path()
    if not lib_path.is_file():
        raise MissingDependencyError(
            f"low-bit kernel library {lib_path} not found: run `make kernels` (needs nvcc and CMake) "
            f"or set {LIB_ENV}")
    lib = ctypes.CDLL(str(lib_path))
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    sig = {
        "esr_version": ([], i32), "esr_has_cuda": ([], i32),
        "esr_status_string": ([i32], ctypes.c_char_p),
        "esr_last_cuda_error": ([], ctypes.c_char_p),
        "esr_packed_words": ([i64, i32], i64),
        "esr_pack_weights": ([vp, i64, i64, i32, vp], i32),
        "esr_unpack_weights": ([vp, i64, i64, i32, vp], i32),
        "esr_fake_quant_f32": ([vp, vp, i64, vp, vp, i32, vp], i32),
        "esr_quantize_act": ([vp, i32, i64, i64, i32, vp, vp, i32, vp, vp], i32),
        "esr_lowbit_linear": ([vp, i64, i64, i64, i32, vp, vp, i32, vp, i32, vp, vp, vp, vp, i32,
                               vp], i32),
        "esr_lowbit_workspace_size": ([i64, i64, i32], ctypes.c_size_t),
        "esr_lowbit_linear_fused": ([vp, i32, i64, i64, i64, i32, vp, vp, i32, vp, i32, vp, vp,
                                     vp, vp, i32, vp, vp], i32),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = args, res
    if path is None:
        _LIB = lib
    return lib


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        msg = lib.esr_status_string(status).decode()
        cuda = lib.esr_last_cuda_error().decode() if lib.esr_has_cuda() else ""
        raise RuntimeError(f"{what} failed: {msg} {cuda}".strip())


def pack_weights_native(codes: torch.Tensor, bits: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``pack_weights`` done by the C library (host code: works without a GPU)."""
    lib = lib or load_library()
    c = codes.to(torch.uint8).contiguous().cpu()
    n, k = c.shape
    out = torch.empty(n, int(lib.esr_packed_words(k, bits)), dtype=torch.int32)
    _check(lib, lib.esr_pack_weights(c.data_ptr(), n, k, bits, out.data_ptr()), "esr_pack_weights")
    return out


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def fake_quant_cuda(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """esr_fake_quant_f32 on a CUDA float32 tensor; bounds are device tensors (no host sync)."""
    lib = load_library()
    x = x.contiguous()
    y = torch.empty_like(x)
    lo = lower.reshape(1).float().to(x.device)
    up = upper.reshape(1).float().to(x.device)
    _check(lib, lib.esr_fake_quant_f32(x.data_ptr(), y.data_ptr(), x.numel(), lo.data_ptr(),
                                       up.data_ptr(), bits, _stream()), "esr_fake_quant_f32")
    return y


def lowbit_linear_cuda(x: torch.Tensor, p: LowBitLinearParams,
                       out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """esr_lowbit_linear_fused: x [..., K] (float32/float16, CUDA) -> y [..., N] (out_dtype)."""
    lib = load_library()
    if x.dtype not in (torch.float32, torch.float16):
        x = x.float()
    x2 = x.reshape(-1, p.in_features).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, p.out_features, dtype=out_dtype, device=x.device)
    ws = torch.empty(int(lib.esr_lowbit_workspace_size(m, p.in_features, p.act_groups)),
                     dtype=torch.uint8, device=x.device)
    bias = 0 if p.bias is None else p.bias.data_ptr()
    _check(lib, lib.esr_lowbit_linear_fused(
        x2.data_ptr(), ESR_F16 if x2.dtype == torch.float16 else ESR_F32, m, p.in_features,
        p.out_features, p.act_groups, p.act_lower.data_ptr(), p.act_upper.data_ptr(), p.act_bits,
        p.packed.data_ptr(), p.w_bits, p.w_lower.data_ptr(), p.w_scale.data_ptr(), bias,
        out.data_ptr(), ESR_F16 if out_dtype == torch.float16 else ESR_F32, ws.data_ptr(),
        _stream()), "esr_lowbit_linear_fused")
    return out.reshape(*x.shape[:-1], p.out_features)


class LowBitLinearCUDA(nn.Module):
    """Drop-in for a calibrated QuantLinear that runs the packed low-bit kernel (FP16 output)."""

    def __init__(self, params: LowBitLinearParams, device: torch.device | str = "cuda") -> None:
        super().__init__()
        self.params = params.to(device)

    @classmethod
    def from_quant_linear(cls, qlin: nn.Module, device: torch.device | str = "cuda") -> LowBitLinearCUDA:
        return cls(params_from_quant_linear(qlin), device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowbit_linear_cuda(x, self.params).to(x.dtype)

    def extra_repr(self) -> str:
        p = self.params
        return (f"in={p.in_features}, out={p.out_features}, w{p.w_bits}a{p.act_bits}, "
                f"act_groups={p.act_groups}")


def convert_to_lowbit_cuda(model: nn.Module, device: torch.device | str = "cuda") -> int:
    """Swap every QuantLinear of ``model`` (in place) for a LowBitLinearCUDA; returns the count."""
    from calibrate.qmodules import QuantLinear

    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LowBitLinearCUDA.from_quant_linear(getattr(parent, attr), device))
    return len(names)
