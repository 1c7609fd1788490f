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
