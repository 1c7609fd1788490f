"""The learnable-bound fake quantizer of 2DQuant (spec §2), without host synchronisation.

Grid: ``l + k*s`` for k in 0..2^b-1, ``s = (u-l)/(2^b-1)``; rounding is half-to-even. The
straight-through estimator follows the reference exactly: round passes gradients through, and clip
sends the gradient of elements at or below ``l`` to ``l`` and at or above ``u`` to ``u``. The module
knows nothing about ONNX: export reads ``qparams()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Search = Literal["two_sided", "one_sided"]


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return bits


class _ClipSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, lower, upper)
        return torch.minimum(torch.maximum(x, lower), upper)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, lower, upper = ctx.saved_tensors
        inside = (x >= lower) & (x <= upper)
        gx = g * inside
        gl = (g * (x <= lower)).sum().reshape(lower.shape) if ctx.needs_input_grad[1] else None
        gu = (g * (x >= upper)).sum().reshape(upper.shape) if ctx.needs_input_grad[2] else None
        return gx, gl, gu


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g


def fake_quant_reference(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                         bits: int) -> torch.Tensor:
    """The reference's composition (clip STE, then round STE), kept to test the fused version."""
    n = 2**bits - 1
    step = (upper - lower) / n
    q = _RoundSTE.apply((_ClipSTE.apply(x, lower, upper) - lower) / step)
    return lower + step * q


class _FakeQuantSTE(torch.autograd.Function):
    """Clip + round + rescale in one node, with the backward of ``fake_quant_reference``.

    With t = (clip(x) - l)/s, q = round(t), N = 2^b - 1: dx = g on [l, u]; dl = sum g*(-(q-t)/N
    + [x <= l]); du = sum g*((q-t)/N + [x >= u]). About half the memory passes of the composed
    autograd graph, which dominates DQC on a CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, n: int):
        step = (upper - lower) / n
        t = torch.clamp(x, lower, upper).sub_(lower).div_(step)
        q = torch.round(t)
        ctx.n = n
        ctx.save_for_backward(x, lower, upper, q.sub(t))
        return q.mul_(step).add_(lower)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, lower, upper, d = ctx.saved_tensors
        n = ctx.n
        below, above = x <= lower, x >= upper
        gx = g * ~((x < lower) | (x > upper)) if ctx.needs_input_grad[0] else None
        gd = (g * d).sum() / n
        gl = (g * below).sum() - gd if ctx.needs_input_grad[1] else None
        gu = (g * above).sum() + gd if ctx.needs_input_grad[2] else None
        return (gx, None if gl is None else gl.reshape(lower.shape),
                None if gu is None else gu.reshape(upper.shape), None)


def fake_quant(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the asymmetric grid [lower, upper] with 2^bits levels."""
    n = 2**bits - 1
    if not torch.is_grad_enabled() or not (x.requires_grad or lower.requires_grad
                                            or upper.requires_grad):
        step = (upper - lower) / n
        # clip on the integer grid with scalar bounds: the same values as clamp(x, lower, upper)
        # first (both give 0 or n there), but a tensor-bound clamp is ~6x slower on a CPU
        return (x - lower).div_(step).clamp_(0, n).round_().mul_(step).add_(lower)
    return _FakeQuantSTE.apply(x, lower, upper, n)


def fake_quant_nograd(x: torch.Tensor, lower: torch.Tensor | float, upper: torch.Tensor | float,
                      bits: int) -> torch.Tensor:
    """The same grid with plain clamp and round (DOBI's objective, no autograd)."""
    n = 2**bits - 1
    step = (upper - lower) / n
    return lower + step * torch.round((torch.clamp(x, lower, upper) - lower) / step)


@dataclass(frozen=True)
class QParams:
    """The learned grid of one quantizer, read by export: ``x_hat = lower + scale * q``."""

    lower: float
    upper: float
    bits: int

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def scale(self) -> float:
        return (self.upper - self.lower) / (self.levels - 1)

    @property
    def zero_point(self) -> float:
        """Real-valued (not rounded) zero point ``-lower/scale``, as in the reference."""
        return -self.lower / self.scale


class BoundFakeQuantizer(nn.Module):
    """Per-tensor fake quantizer with learnable lower/upper bounds.

    ``search`` records which DOBI search initialises it; ``enabled=False`` makes it the identity
    (used to collect FP statistics). It never changes state inside ``forward``.
    """

    def __init__(self, bits: int, search: Search = "two_sided") -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if search not in ("two_sided", "one_sided"):
            raise ValueError(f"search must be 'two_sided' or 'one_sided', got {search!r}")
        self.search: Search = search
        self.lower = nn.Parameter(torch.tensor(-1.0))
        self.upper = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quant(x, self.lower, self.upper, self.bits)

    @torch.no_grad()
    def set_bounds(self, lower: float | torch.Tensor, upper: float | torch.Tensor) -> None:
        self.lower.copy_(torch.as_tensor(lower, dtype=self.lower.dtype))
        self.upper.copy_(torch.as_tensor(upper, dtype=self.upper.dtype))
        self.initialized.fill_(True)

    def qparams(self) -> QParams:
        return QParams(float(self.lower.detach()), float(self.upper.detach()), self.bits)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, search={self.search}, lower={float(self.lower.detach()):.4g}, "
                f"upper={float(self.upper.detach()):.4g}")
