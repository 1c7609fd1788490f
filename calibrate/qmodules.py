"""Quantized layers: a linear whose input and weight go through ``BoundFakeQuantizer``s.

For the fused qkv linear, ``groups=3`` splits the weight into its q, k and v row blocks, each with
its own weight quantizer. The paper also gives each block its own input quantizer (qkv separation,
``shared_input=False``); a deployed engine wants one quantized input for the fused GEMM
(``shared_input=True``).

Beyond the paper: ``rotation`` (an orthogonal (K, K) matrix ``R``, ``calibrate.rotation``) makes
the layer compute ``Q(x R) Q(W R)^T + b``, the same output as ``x W^T + b`` in full precision; the
rotated weight ``W R`` is folded once at construction and ``x R`` is computed online.
``smoothing`` (a positive (K,) vector ``s``; SmoothQuant, Xiao et al., ICML 2023) divides each
input channel by ``s`` and multiplies the weight's columns by it: ``Q(x S^-1) Q(W S)^T + b`` with
``S = diag(s)``. With both, the input transform is the one matrix ``S^-1 R`` (``input_matrix``)
and the folded weight ``W S R``. Without a rotation, ``x S^-1`` is one elementwise multiply by
the stored ``smooth_inv`` (the export writes the same multiply, or folds it into the rotation).
``weight_channels=True`` gives every weight block one grid per output channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calibrate.quantizer import BoundFakeQuantizer, Search


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, bits: int, groups: int = 1, shared_input: bool = False,
                 act_search: Search = "two_sided", act_bits: int | None = None,
                 rotation: torch.Tensor | None = None, weight_channels: bool = False,
                 smoothing: torch.Tensor | None = None) -> None:
        super().__init__()
        if linear.out_features % groups:
            raise ValueError(f"out_features {linear.out_features} not divisible by groups {groups}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.groups = groups
        k = linear.in_features
        w = linear.weight.detach()
        if rotation is not None:
            if tuple(rotation.shape) != (k, k):
                raise ValueError(f"rotation must be ({k}, {k}) for in_features {k}, got "
                                 f"{tuple(rotation.shape)}")
            self.register_buffer("rotation", rotation.to(w.dtype).to(w.device))
        else:
            self.rotation = None
        if smoothing is not None:
            if tuple(smoothing.shape) != (k,) or not bool((smoothing > 0).all()):
                raise ValueError(f"smoothing must be {k} positive factors for in_features {k}, "
                                 f"got shape {tuple(smoothing.shape)}")
            self.register_buffer("smoothing", smoothing.detach().to(w.dtype).to(w.device))
            self.register_buffer("smooth_inv", 1.0 / self.smoothing)
        else:
            self.smoothing = self.smooth_inv = None
        if rotation is not None or smoothing is not None:
            # W S R in float64, so the folded weight is the transform's exact image in float32
            w64 = w.double()
            if smoothing is not None:
                w64 = w64 / self.smooth_inv.double()
            if rotation is not None:
                w64 = w64 @ self.rotation.double()
            self.weight = nn.Parameter(w64.to(w.dtype), requires_grad=False)
        else:
            self.weight = linear.weight
        self.bias = linear.bias
        n_act = 1 if shared_input else groups
        self.act_quantizers = nn.ModuleList(BoundFakeQuantizer(act_bits or bits, act_search)
                                            for _ in range(n_act))
        rows = linear.out_features // groups if weight_channels else None
        self.weight_quantizers = nn.ModuleList(BoundFakeQuantizer(bits, channels=rows)
                                               for _ in range(groups))

    @property
    def shared_input(self) -> bool:
        return len(self.act_quantizers) == 1

    def weight_blocks(self) -> tuple[torch.Tensor, ...]:
        return self.weight.chunk(self.groups, 0)

    def bias_blocks(self) -> tuple[torch.Tensor | None, ...]:
        if self.bias is None:
            return (None,) * self.groups
        return self.bias.chunk(self.groups, 0)

    def input_matrix(self) -> torch.Tensor | None:
        """The (K, K) online input transform ``S^-1 R`` of a rotated linear (None if not)."""
        if self.rotation is None:
            return None
        if self.smooth_inv is None:
            return self.rotation
        return self.smooth_inv[:, None] * self.rotation

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x S^-1 R``: a MatMul when rotated, else a multiply by ``smooth_inv`` (or nothing)."""
        if self.rotation is not None:
            return x @ self.input_matrix()
        if self.smooth_inv is not None:
            return x * self.smooth_inv
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        if self.shared_input:
            xq = self.act_quantizers[0](x)
        outs = []
        for i, (w, b) in enumerate(zip(self.weight_blocks(), self.bias_blocks())):
            xi = xq if self.shared_input else self.act_quantizers[i](x)
            outs.append(F.linear(xi, self.weight_quantizers[i](w), b))
        return outs[0] if self.groups == 1 else torch.cat(outs, dim=-1)

    def to_float(self) -> nn.Linear:
        """The FP linear (the transforms undone: ``W = (W S R) R^T S^-1``)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        if self.rotation is None and self.smoothing is None:
            lin.weight = self.weight
        else:
            w = self.weight.detach().double()
            if self.rotation is not None:
                w = w @ self.rotation.double().T
            if self.smoothing is not None:
                w = w * self.smooth_inv.double()
            lin.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=False)
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, groups={self.groups}, "
                f"rotated={self.rotation is not None}, smoothed={self.smoothing is not None}, "
                f"weight_channels={self.weight_quantizers[0].per_channel}")


class QuantConv2d(nn.Module):
    """A body convolution on ONNX Runtime's integer grid (beyond the paper: 2DQuant keeps every
    convolution in floating point, spec §1; the reference code's unused ``quant_conv`` flag).

    ``y = Q_out(conv(Q_in(x), W_c, b_c))`` for an ``nn.Conv2d`` (N, C, H, W) -> (N, C', H, W):

    * ``Q_in`` (``act_quantizer``): a ``bits``-wide activation grid (``calibrate.prepare`` uses
      8), searched by DOBI and learned by DQC like every other input quantizer;
    * ``W_c``: the weight on a symmetric per-output-channel 8-bit grid, fixed before calibration
      (``conv.kept_codes`` x ``conv.kept_scale``, ``calibrate.prepare.quantize_kept_weights``);
    * ``b_c``: the bias rounded to the accumulator's grid ``s_in * s_w`` (per output channel), as
      an integer convolution adds it;
    * ``Q_out`` (``out_quantizer``): an ``out_bits``-wide (8) grid on the output, also searched
      and learned. The paper never quantizes an output; ONNX Runtime needs one to run the
      convolution as ``QLinearConv`` (the QDQ export's ``DQ -> Conv -> Q`` fuses into it).

    On integer grids (``QuantRecipe.grid="ort"``) the forward value is that of ORT's
    ``QLinearConv`` itself (``integer_output``: integer accumulation, requantization in float32),
    so the engine does not drift from the fake-quant model by the float convolution's rounding;
    gradients take the float path ``conv(Q_in(x), W_c, b_c)`` (straight through). Raises
    ``ValueError`` for a weight without 8-bit codes.
    """

    def __init__(self, conv: nn.Conv2d, bits: int, out_bits: int = 8,
                 act_search: Search = "two_sided") -> None:
        super().__init__()
        if getattr(conv, "kept_codes", None) is None or getattr(conv, "kept_bits", 0) != 8:
            raise ValueError("QuantConv2d needs the convolution's weight on an 8-bit per-channel "
                             "grid (calibrate.prepare.quantize_kept_weights)")
        self.conv = conv
        self.act_quantizer = BoundFakeQuantizer(bits, act_search)
        self.out_quantizer = BoundFakeQuantizer(out_bits, "two_sided")
        self.bias_frozen = False

    @torch.no_grad()
    def freeze_bias(self) -> None:
        """Store ``accumulator_bias()`` as the convolution's bias, for export: the traced graph
        then holds the rounded bias as a constant, and the forward is the plain
        ``Q_out(conv(Q_in(x)))`` with the quantizers swapped for placeholders."""
        if self.conv.bias is not None:
            self.conv.bias = nn.Parameter(self.accumulator_bias().detach().clone(),
                                          requires_grad=False)
        self.bias_frozen = True

    def accumulator_bias(self) -> torch.Tensor | None:
        """The bias on the grid ``s_in * s_w`` of the int32 accumulator (unrounded while the
        input quantizer is off, as in DOBI's FP pass); gradients pass straight through."""
        b, q = self.conv.bias, self.act_quantizer
        if b is None or self.bias_frozen or not q.enabled:
            return b
        lo, up = q.grid_bounds()
        step = ((up - lo) / (2**q.bits - 1)).detach() * self.conv.kept_scale.to(b.device)
        return b + (torch.round(b / step) * step - b).detach()

    @staticmethod
    def _grid(q: BoundFakeQuantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lower, step, zero level) of an integer grid, float32, detached."""
        lo, up = (t.detach().float() for t in q.grid_bounds())
        step = (up - lo) / (2**q.bits - 1)
        return lo, step, torch.round(-lo / step)

    @torch.no_grad()
    def integer_output(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as ``QLinearConv`` computes it, on a value of the output grid.

        The input codes ``k - z`` (``x`` clipped to the grid and divided by its step, rounded
        half to even: the export's ``Clip -> QuantizeLinear``) and the weight codes are
        convolved exactly (integers in float32; exact while partial sums stay under
        2^24), the integer bias is added, and the int32 sum is requantized as ONNX Runtime
        does: times ``M = (s_in * s_w) / s_out`` in float32, rounded half to even, plus the
        output zero level, clamped to the grid. Returns ``lower + q * step`` for those output
        codes ``q``, which the output quantizer maps to itself."""
        c, qa, qo = self.conv, self.act_quantizer, self.out_quantizer
        lo, s_in, z_in = self._grid(qa)
        lo_o, s_out, z_out = self._grid(qo)
        with torch.autocast(x.device.type, enabled=False):
            n = 2**qa.bits - 1
            k = torch.round(torch.clamp(x.float(), s_in * -z_in, s_in * (n - z_in)) / s_in)
            acc = F.conv2d(k, c.kept_codes.float(), None, c.stride, c.padding, c.dilation,
                           c.groups)
            sw = c.kept_scale.float().to(x.device)
            if c.bias is not None:
                acc += torch.round(c.bias.float() / (s_in * sw))[:, None, None]
            m = (s_in * sw) / s_out
            q = (torch.round(acc * m[:, None, None]) + z_out).clamp(0, 2**qo.bits - 1)
            return lo_o + q * s_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, qa, qo = self.conv, self.act_quantizer, self.out_quantizer
        y = F.conv2d(qa(x), c.weight, self.accumulator_bias(), c.stride, c.padding, c.dilation,
                     c.groups)
        if not self.bias_frozen and qa.enabled and qo.enabled and qo.grid == qa.grid == "integer":
            # the engine's integer arithmetic for the value, the float path for the gradients
            y = y + (self.integer_output(x).to(y.dtype) - y).detach()
        return qo(y)

    def extra_repr(self) -> str:
        c = self.conv
        return (f"{c.in_channels} -> {c.out_channels}, kernel={tuple(c.kernel_size)}, "
                f"out_bits={self.out_quantizer.bits}")
