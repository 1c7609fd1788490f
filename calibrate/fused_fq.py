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
``-O3 -march=native``, into ``$EDGE_SR_CACHE/kernels`` and loaded with ``ctypes``, which releases
the GIL, so a tensor is split into ``torch.get_num_threads()`` ranges run on threads. Without a
compiler, or with ``EDGE_SR_FUSED_FQ=0``, ``library()`` is None and callers keep the eager ops
(same results). Only float32 CPU tensors with per-tensor bounds take this path.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from edge_sr.checkpoints import cache_dir
from edge_sr.hardware import cpu_flags, cpu_model

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "fake_quant.c"
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd",
          "-shared", "-fPIC")
ENV_SWITCH = "EDGE_SR_FUSED_FQ"  # "0" keeps the eager ops
MIN_SPLIT = 1 << 16  # elements: smaller tensors run on the calling thread only
_ALIGN = 64  # each thread's range starts on a 64-element boundary

_lock = threading.Lock()
_state: dict = {}


def _build(cc: str, rebuild: bool = False) -> Path:
    """The cached shared library for this source, flags, compiler and CPU (compiled into a
    temporary file and renamed, so a cache never holds half a library)."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(CFLAGS).encode() + cc.encode()
                         + " ".join(sorted(cpu_flags())).encode() + cpu_model().encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"fake_quant-{key}.so"
    if out.exists() and not rebuild:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    f, d, p = ctypes.c_float, ctypes.c_void_p, ctypes.c_ssize_t
    lib.fq_forward.argtypes = [d, d, p, f, f, f]
    lib.fq_forward.restype = None
    lib.fq_backward.argtypes = [d, d, d, p, f, f, f, d]
    lib.fq_backward.restype = None
    return lib


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
                try:
                    lib = _load(_build(cc))
                except (OSError, AttributeError):  # a damaged cached library: compile it again
                    lib = _load(_build(cc, rebuild=True))
            except (OSError, AttributeError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", "") or e
                log.info("fused fake-quant kernels unavailable (%s): DQC uses the slower eager "
                         "ops, with the same results", str(detail).strip().splitlines()[-1]
                         if str(detail).strip() else type(e).__name__)
                lib = None
        _state["lib"] = lib
        return lib


def usable(x: torch.Tensor, lower: torch.Tensor) -> bool:
    """True when ``x`` (float32 on the CPU; ``forward`` and ``backward`` want it contiguous)
    and per-tensor bounds can take the fused path."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and lower.numel() == 1
            and library() is not None)


def _ranges(n: int) -> list[tuple[int, int]]:
    k = max(1, min(torch.get_num_threads(), n // MIN_SPLIT))
    size = -(-n // k)
    size = -(-size // _ALIGN) * _ALIGN
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _pool(k: int) -> ThreadPoolExecutor:
    pool = _state.get("pool")
    if pool is None or pool._max_workers < k:
        pool = _state["pool"] = ThreadPoolExecutor(k, thread_name_prefix="edge-sr-fq")
    return pool


def _run(fn, ranges: list[tuple[int, int]]) -> list:
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    futs = [_pool(len(ranges) - 1).submit(fn, a, b) for a, b in ranges[1:]]
    first = fn(*ranges[0])
    return [first] + [f.result() for f in futs]


def forward(x: torch.Tensor, lower: float, upper: float, step: float) -> torch.Tensor:
    """``rint((clamp(x, lower, upper) - lower) / step) * step + lower``, float32, bit-identical
    to the eager ops. ``x``: contiguous float32 CPU tensor (``usable``)."""
    if not x.is_contiguous():
        raise ValueError("fused_fq.forward needs a contiguous tensor")
    lib = library()
    y = torch.empty_like(x)
    xp, yp = x.data_ptr(), y.data_ptr()

    def part(a: int, b: int) -> None:
        lib.fq_forward(xp + 4 * a, yp + 4 * a, b - a, lower, upper, step)

    _run(part, _ranges(x.numel()))
    return y


def backward(g: torch.Tensor, x: torch.Tensor, lower: float, upper: float, step: float
             ) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """(gx, (sum g·(q − t), sum g·[x ≤ lower], sum g·[x ≥ upper])) of the fake quantizer's
    straight-through backward; ``gx`` is ``g`` on [lower, upper] and 0 outside."""
    if not x.is_contiguous():
        raise ValueError("fused_fq.backward needs a contiguous tensor")
    lib = library()
    g = g.contiguous()
    gx = torch.empty_like(x)
    gp, xp, op = g.data_ptr(), x.data_ptr(), gx.data_ptr()

    def part(a: int, b: int) -> tuple[float, float, float]:
        sums = (ctypes.c_double * 3)()
        lib.fq_backward(gp + 4 * a, xp + 4 * a, op + 4 * a, b - a, lower, upper, step, sums)
        return sums[0], sums[1], sums[2]

    parts = _run(part, _ranges(x.numel()))
    return gx, tuple(sum(p[i] for p in parts) for i in range(3))
