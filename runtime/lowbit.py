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
from pathlib import Path

import torch
from torch import nn

from edge_sr.errors import MissingDependencyError
from edge_sr.paths import REPO_ROOT

ESR_F32, ESR_F16 = 0, 1
LIB_ENV = "EDGE_SR_LOWBIT_LIB"


# the format and the reference maths live with export (calibrate.export.packing)
from calibrate.export.packing import (  # noqa: E402,F401
    LowBitLinearParams,
    codes_per_word,
    grid_step,
    lowbit_linear_reference,
    pack_weights,
    packed_words,
    params_from_quant_linear,
    quantize_codes,
    unpack_weights,
)

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
