"""The learnable-bound fake quantizer of 2DQuant (spec §2), without host synchronisation.

Grid: ``l + k*s`` for k in 0..2^b-1, ``s = (u-l)/(2^b-1)``; rounding is half-to-even. The
straight-through estimator follows the reference exactly: round passes gradients through, and clip
sends the gradient of elements at or below ``l`` to ``l`` and at or above ``u`` to ``u``. The module
knows nothing about ONNX: export reads ``qparams()``.

Beyond the paper, a quantizer may be **per channel** (``channels=C``): ``l`` and ``u`` then have
shape (C, 1), one grid per output channel (row) of a (C, K) weight, with the same maths and the
same STE per row. Every per-tensor code path is unchanged.

Also beyond the paper, a quantizer's **grid** may be constrained to what an integer engine runs
without correction terms (``GRIDS``, set by ``QuantRecipe.grid``; beyond the paper, issue 18):

* ``"real"``: the paper's grid, ``l`` and ``u`` free (a real-valued zero point ``-l/s``).
* ``"integer"``: 0 lies on the grid: ``z = round(-l/s)`` clipped to [0, n], and the grid is
  ``(k - z)*s`` (ORT's uint8 activations with an integer zero point). ``round`` passes gradients
  straight through, so DQC learns ``l`` and ``u`` as before.
* ``"symmetric"``: ``z = 2^(b-1)``: codes are signed b-bit integers with zero point 0 (the
  weights of ORT's and TensorRT's integer kernels, TensorRT's 8-bit activations).

The constrained grid is a function of the raw ``(l, u)`` (``grid_bounds``), idempotent on a grid
that already satisfies it; ``bounds()`` stays raw (what calibration files store) and ``qparams()``
gives the grid that runs.

Also beyond the paper, **QDrop** (Wei et al., ICLR 2022): while DQC trains, an activation
quantizer with ``drop = p > 0`` passes each element of its input through unquantized with
probability p (a fresh Bernoulli mask per call, from torch's generator). The bounds then learn from
the quantized elements only, against a student whose later layers also see some FP inputs; the
paper argues this flattens the loss surface that calibration on few images overfits. ``drop`` is
0 outside DQC's training steps, so validation, export and inference always quantize every element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from calibrate import fused_fq

Search = Literal["two_sided", "one_sided"]
Grid = Literal["real", "integer", "symmetric"]
GRIDS: tuple[str, ...] = ("real", "integer", "symmetric")


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
    autograd graph, which dominates DQC on a CPU. Only the input is kept for the backward (not
    also q - t): the backward recomputes q - t with the forward's own ops, bit for bit, which
    saves one activation-sized float tensor per quantizer. On a CPU, per-tensor grids run the
    fused kernels of ``calibrate.fused_fq`` (one pass each way, the same outputs bit for bit).
    """

    @staticmethod
    def _residual(x, lower, upper, n):
        step = (upper - lower) / n
        t = torch.clamp(x, lower, upper).sub_(lower).div_(step)
        return t, step

    @staticmethod
    def forward(ctx, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, n: int,
                out_dtype: torch.dtype | None = None):
        ctx.n = n
        if fused_fq.usable(x, lower):
            x = x.contiguous()  # one copy of a strided view beats the eager ops' passes
            ctx.save_for_backward(x, lower, upper)
            return fused_fq.forward(x, float(lower), float(upper), float((upper - lower) / n),
                                    out_dtype)
        ctx.save_for_backward(x, lower, upper)
        t, step = _FakeQuantSTE._residual(x, lower, upper, n)
        return t.round_().mul_(step).add_(lower)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, lower, upper = ctx.saved_tensors
        n = ctx.n
        if fused_fq.usable(x, lower):
            gx, (sd, sb, sa) = fused_fq.backward(g, x, float(lower), float(upper),
                                                 float((upper - lower) / n))
            as_bound = lambda v: torch.tensor(v, dtype=lower.dtype).reshape(lower.shape)  # noqa: E731
            gl = as_bound(sb - sd / n) if ctx.needs_input_grad[1] else None
            gu = as_bound(sa + sd / n) if ctx.needs_input_grad[2] else None
            return gx if ctx.needs_input_grad[0] else None, gl, gu, None, None
        t, _ = _FakeQuantSTE._residual(x, lower, upper, n)
        d = torch.round(t).sub_(t)  # q - t, as in the forward
        below, above = x <= lower, x >= upper
        gx = g * ~((x < lower) | (x > upper)) if ctx.needs_input_grad[0] else None
        shape = lower.shape  # () per tensor, (C, 1) per channel
        gd = (g * d).sum_to_size(shape) / n
        gl = (g * below).sum_to_size(shape) - gd if ctx.needs_input_grad[1] else None
        gu = (g * above).sum_to_size(shape) + gd if ctx.needs_input_grad[2] else None
        return gx, gl, gu, None, None


def fake_quant(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the asymmetric grid [lower, upper] with 2^bits levels.

    The grid codes are always computed in float32: a bfloat16 or float16 ``x`` (autocast) is
    widened by the fused CPU kernel itself (output in ``x``'s dtype) or, elsewhere, cast to
    float32 first (float32 output). ``out_dtype`` (bfloat16, fused CPU path only; see
    ``fused_fq.forward``) returns a float32 ``x``'s result rounded once to it; elsewhere it is
    ignored."""
    n = 2**bits - 1
    fused = fused_fq.usable(x, lower)
    if not fused:
        out_dtype = None
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
    if not torch.is_grad_enabled() or not (x.requires_grad or lower.requires_grad
                                            or upper.requires_grad):
        step = (upper - lower) / n
        if fused:
            return fused_fq.forward(x.contiguous(), float(lower), float(upper), float(step),
                                    out_dtype)
        # clip on the integer grid with scalar bounds: the same values as clamp(x, lower, upper)
        # first (both give 0 or n there), but a tensor-bound clamp is ~6x slower on a CPU
        return (x - lower).div_(step).clamp_(0, n).round_().mul_(step).add_(lower)
    return _FakeQuantSTE.apply(x, lower, upper, n, out_dtype)


def grid_bounds(lower, upper, bits: int, grid: Grid = "real"):
    """The (lower, upper) of the grid that runs: ``(l, u)`` itself for ``"real"``; else the
    grid of step ``s = (u - l)/(2^b - 1)`` with 0 at level ``z`` (see the module docstring).

    Works on tensors (with the straight-through round) and on float64 candidate tensors (DOBI).
    """
    if grid == "real":
        return lower, upper
    n = 2**bits - 1
    step = (upper - lower) / n
    if grid == "symmetric":
        lo = step * -(2 ** (bits - 1))
    elif grid == "integer":
        lo = -torch.clamp(_RoundSTE.apply(-lower / step), 0, n) * step
    else:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    return lo, lo + n * step


def fake_quant_nograd(x: torch.Tensor, lower: torch.Tensor | float, upper: torch.Tensor | float,
                      bits: int) -> torch.Tensor:
    """The same grid with plain clamp and round (DOBI's objective, no autograd)."""
    n = 2**bits - 1
    step = (upper - lower) / n
    return lower + step * torch.round((torch.clamp(x, lower, upper) - lower) / step)


@dataclass(frozen=True)
class QParams:
    """The learned grid of one quantizer, read by export: ``x_hat = lower + scale * q``.

    ``lower``/``upper`` are floats for a per-tensor grid and tuples (one per output channel) for
    a per-channel one.
    """

    lower: float | tuple[float, ...]
    upper: float | tuple[float, ...]
    bits: int
    grid: Grid = "real"  # "integer"/"symmetric": 0 is exactly on the grid, at level z

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper) as float32 tensors: shape () per tensor, (C, 1) per channel."""
        shape = (-1, 1) if self.per_channel else ()
        return (torch.tensor(self.lower, dtype=torch.float32).reshape(shape),
                torch.tensor(self.upper, dtype=torch.float32).reshape(shape))

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def per_channel(self) -> bool:
        return isinstance(self.lower, tuple)

    @property
    def scale(self) -> float | tuple[float, ...]:
        n = self.levels - 1
        if self.per_channel:
            return tuple((u - lo) / n for lo, u in zip(self.lower, self.upper))
        return (self.upper - self.lower) / n

    @property
    def integer_zero_point(self) -> int | tuple[int, ...] | None:
        """The level ``z`` that holds 0 on an integer or symmetric grid (None for ``"real"``)."""
        if self.grid == "real":
            return None
        if self.grid == "symmetric":
            z = 2 ** (self.bits - 1)
            return tuple(z for _ in self.lower) if self.per_channel else z
        zs = self.zero_point
        return tuple(int(round(v)) for v in zs) if self.per_channel else int(round(zs))

    @property
    def zero_point(self) -> float | tuple[float, ...]:
        """Real-valued (not rounded) zero point ``-lower/scale``, as in the reference."""
        if self.per_channel:
            return tuple(-lo / s for lo, s in zip(self.lower, self.scale))
        return -self.lower / self.scale


class BoundFakeQuantizer(nn.Module):
    """Fake quantizer with learnable lower/upper bounds: per tensor, or per channel.

    ``search`` records which DOBI search initialises it; ``enabled=False`` makes it the identity
    (used to collect FP statistics). It never changes state inside ``forward``. ``channels=C``
    gives (C, 1) bounds: one grid per row of a (C, K) weight (beyond the paper).
    """

    def __init__(self, bits: int, search: Search = "two_sided", channels: int | None = None
                 ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if search not in ("two_sided", "one_sided"):
            raise ValueError(f"search must be 'two_sided' or 'one_sided', got {search!r}")
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive integer or None, got {channels!r}")
        self.search: Search = search
        self.channels = channels
        shape = () if channels is None else (channels, 1)
        self.lower = nn.Parameter(torch.full(shape, -1.0))
        self.upper = nn.Parameter(torch.full(shape, 1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True
        self.grid: Grid = "real"  # set by calibrate.prepare from QuantRecipe.grid
        self.drop = 0.0  # QDrop: probability that an element stays FP (set by DQC's steps only)

    def grid_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (lower, upper) tensors of the grid that runs (``grid_bounds`` of the raw ones)."""
        return grid_bounds(self.lower, self.upper, self.bits, self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        lo, up = self.grid_bounds()
        # Under CPU bf16 autocast the output is bfloat16 (rounded once from float32): what the
        # GEMM that consumes every quantizer's output (a linear, q @ k^T or p @ v) would cast it
        # to anyway, without a float32 copy in between
        bf16 = (torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        out = fake_quant(x, lo, up, self.bits, torch.bfloat16 if bf16 else None)
        if self.drop > 0:
            keep = torch.rand(x.shape, device=x.device) < self.drop
            out = torch.where(keep, x.to(out.dtype), out)
        return out

    @property
    def per_channel(self) -> bool:
        return self.channels is not None

    @torch.no_grad()
    def set_bounds(self, lower, upper) -> None:
        """Set the bounds: floats (per tensor) or C values each (per channel).

        Raises ``ValueError`` when the number of values does not match the quantizer.
        """
        for p, v in ((self.lower, lower), (self.upper, upper)):
            t = torch.as_tensor(v, dtype=p.dtype)
            if t.numel() != p.numel():
                raise ValueError(f"expected {p.numel()} bound value(s), got {t.numel()}")
            p.copy_(t.reshape(p.shape))
        self.initialized.fill_(True)

    def bounds(self) -> tuple:
        """(lower, upper) as plain Python values: floats, or lists of C floats per channel."""
        lo, up = self.lower.detach().cpu(), self.upper.detach().cpu()
        if self.per_channel:
            return lo.reshape(-1).tolist(), up.reshape(-1).tolist()
        return float(lo), float(up)

    def qparams(self) -> QParams:
        """The grid that runs, as plain values: what export reads."""
        lo, up = (t.detach().cpu() for t in self.grid_bounds())
        if self.per_channel:
            return QParams(tuple(lo.reshape(-1).tolist()), tuple(up.reshape(-1).tolist()),
                           self.bits, self.grid)
        return QParams(float(lo), float(up), self.bits, self.grid)

    def extra_repr(self) -> str:
        if self.per_channel:
            return f"bits={self.bits}, search={self.search}, channels={self.channels}"
        return (f"bits={self.bits}, search={self.search}, lower={float(self.lower.detach()):.4g}, "
                f"upper={float(self.upper.detach()):.4g}")
