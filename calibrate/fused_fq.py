"""Fused per-tensor fake quantization on a CPU: one pass forward, one pass backward.

The eager ``_FakeQuantSTE`` makes about six passes over an activation forward and twenty
backward (clamp, masks, ``q - t``, three products, three sums); on the attention probabilities of
a transformer block (B·windows × heads × 64 × 64 floats) those passes cost more than the GEMMs
around them, and they are most of what a DQC step adds to the model's own forward + backward
(``benchmarks.dqc_step``). ``csrc/fake_quant.c`` does the same maths in one loop each way:

* forward: ``y = rint((clamp(x, l, u) - l) / s) * s + l``, the eager float32 ops in the eager
  order, compiled without FMA contraction, so the output is **bit-identical** to PyTorch's;
* backward: ``gx = g`` on [l, u] (else 0), and ``sum g·(q − t)``, ``sum g·[x ≤ l]``,
  ``sum g·[x ≥ u]`` accumulated in float64 (the eager sums are float32: the bound gradients
  agree to float32 rounding, not bit for bit).

The C source is compiled once per machine with the system C compiler (``$CC``, else ``cc``),
``-O3 -march=native -fopenmp``, into ``$EDGE_SR_CACHE/kernels`` and loaded with ``ctypes``. Its
OpenMP runtime is the ``libgomp.so.1`` PyTorch has already loaded, so a kernel splits a tensor
over ``torch.get_num_threads()`` of PyTorch's own intra-op threads (no second pool competing for
the cores). Where ``-fopenmp`` does not build, it is compiled without and runs on one thread.
Without a compiler, or with ``EDGE_SR_FUSED_FQ=0``, ``library()`` is None and callers keep the
eager ops (same results). Only float32 and bfloat16 CPU tensors with per-tensor bounds take this
path.

A bfloat16 tensor (a DQC under bf16 autocast, ``DQCConfig.precision``) is widened to float32
exactly, quantized with the same float32 maths, and rounded once to bfloat16 (nearest even): the
float32 result cast to bfloat16, bit for bit. The eager ops would round after every op instead,
a coarser answer, and make a float32 copy of the tensor for each mixed-dtype op.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from edge_sr.checkpoints import cache_dir
from edge_sr.hardware import cpu_flags, cpu_model

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "fake_quant.c"
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
# OpenMP threads where the compiler has it, else one thread (the simd pragmas only)
THREAD_FLAGS = (("-fopenmp",), ("-fopenmp-simd",))
ENV_SWITCH = "EDGE_SR_FUSED_FQ"  # "0" keeps the eager ops

_lock = threading.Lock()
_state: dict = {}


def _build(cc: str, rebuild: bool = False, threads: tuple[str, ...] = THREAD_FLAGS[0]) -> Path:
    """The cached shared library for this source, flags, compiler and CPU (compiled into a
    temporary file and renamed, so a cache never holds half a library)."""
    src = SOURCE.read_bytes()
    flags = (*CFLAGS, *threads)
    key = hashlib.sha256(src + " ".join(flags).encode() + cc.encode()
                         + " ".join(sorted(cpu_flags())).encode() + cpu_model().encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"fake_quant-{key}.so"
    if out.exists() and not rebuild:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    f, d, p, i = ctypes.c_float, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int
    for fwd, bwd in _KERNELS.values():
        getattr(lib, fwd).argtypes, getattr(lib, fwd).restype = [d, d, p, f, f, f, i], None
        getattr(lib, bwd).argtypes, getattr(lib, bwd).restype = [d, d, d, p, f, f, f, i, d], i
    lib.fq_openmp.argtypes, lib.fq_openmp.restype = [], i
    return lib


def _compile_and_load(cc: str) -> ctypes.CDLL:
    """With OpenMP if it builds, else without; a damaged cached library is compiled again."""
    for n, threads in enumerate(THREAD_FLAGS):
        try:
            try:
                return _load(_build(cc, threads=threads))
            except (OSError, AttributeError):
                return _load(_build(cc, rebuild=True, threads=threads))
        except (OSError, AttributeError, subprocess.SubprocessError):
            if n == len(THREAD_FLAGS) - 1:
                raise
            log.debug("fused fake-quant: %s does not build here; trying %s", threads,
                      THREAD_FLAGS[n + 1])
    raise AssertionError("unreachable")


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (eager fallback) when disabled or when
    there is no working C compiler (logged once)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib = None
        if os.environ.get(ENV_SWITCH, "1") == "0":
            log.debug("fused fake-quant off (%s=0): eager ops", ENV_SWITCH)
        else:
            cc = shutil.which(os.environ.get("CC", "cc"))
            try:
                if cc is None:
                    raise OSError("no C compiler (set $CC)")
                lib = _compile_and_load(cc)
            except (OSError, AttributeError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", "") or e
                log.info("fused fake-quant kernels unavailable (%s): DQC uses the slower eager "
                         "ops, with the same results", str(detail).strip().splitlines()[-1]
                         if str(detail).strip() else type(e).__name__)
                lib = None
        _state["lib"] = lib
        return lib


def usable(x: torch.Tensor, lower: torch.Tensor) -> bool:
    """True when ``x`` (float32 or bfloat16 on the CPU; ``forward`` and ``backward`` want it
    contiguous) and per-tensor bounds can take the fused path."""
    return (x.device.type == "cpu" and x.dtype in _IN_DTYPES and lower.numel() == 1
            and library() is not None)


_BF16, _F32 = torch.bfloat16, torch.float32
_IN_DTYPES = (_F32, _BF16)
# (x dtype, y dtype) -> the forward and backward kernels' names
_KERNELS = {(_F32, _F32): ("fq_forward", "fq_backward"),
            (_BF16, _BF16): ("fq_forward_bf16", "fq_backward_bf16"),
            (_F32, _BF16): ("fq_forward_f32_bf16", "fq_backward_f32_bf16")}


def _kernel(x_dtype: torch.dtype, y_dtype: torch.dtype, which: int):
    key = (x_dtype, y_dtype)
    if key not in _KERNELS:
        raise ValueError(f"fused_fq: no kernel from {x_dtype} to {y_dtype}")
    return getattr(library(), _KERNELS[key][which])


def forward(x: torch.Tensor, lower: float, upper: float, step: float,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``rint((clamp(x, lower, upper) - lower) / step) * step + lower``, computed in float32 and
    returned in ``out_dtype`` (default ``x``'s): float32 is bit-identical to the eager ops,
    bfloat16 is the float32 result rounded once (nearest even). ``x``: contiguous float32 or
    bfloat16 CPU tensor (``usable``); a bfloat16 ``x`` gives a bfloat16 output."""
    if not x.is_contiguous():
        raise ValueError("fused_fq.forward needs a contiguous tensor")
    out_dtype = out_dtype or x.dtype
    kernel = _kernel(x.dtype, out_dtype, 0)
    y = torch.empty_like(x, dtype=out_dtype)
    kernel(x.data_ptr(), y.data_ptr(), x.numel(), lower, upper, step, torch.get_num_threads())
    return y


def backward(g: torch.Tensor, x: torch.Tensor, lower: float, upper: float, step: float
             ) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """(gx, (sum g·(q − t), sum g·[x ≤ lower], sum g·[x ≥ upper])) of the fake quantizer's
    straight-through backward; ``gx`` is ``g`` on [lower, upper] and 0 outside, in ``x``'s
    dtype. ``g`` is the output's gradient: float32, or bfloat16 where the output was."""
    if not x.is_contiguous():
        raise ValueError("fused_fq.backward needs a contiguous tensor")
    if x.dtype == _BF16 or g.dtype != _BF16:  # the kernels: (f32, f32), (bf16, bf16), (f32, bf16)
        g = g.to(x.dtype)
    kernel = _kernel(x.dtype, g.dtype, 1)
    g = g.contiguous()
    gx = torch.empty_like(x)
    sums = (ctypes.c_double * 3)()
    if kernel(g.data_ptr(), x.data_ptr(), gx.data_ptr(), x.numel(), lower, upper, step,
              torch.get_num_threads(), sums):
        raise MemoryError("fused_fq.backward: out of memory for the per-block sums")
    return gx, (sums[0], sums[1], sums[2])
