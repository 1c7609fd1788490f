"""Quantized layers: a linear whose input and weight go through ``BoundFakeQuantizer``s.

For the fused qkv linear, ``groups=3`` splits the weight into its q, k and v row blocks, each with
its own weight quantizer. The paper also gives each block its own input quantizer (qkv separation,
``shared_input=False``); a deployed engine wants one quantized input for the fused GEMM
(``shared_input=True``).

Beyond the paper: ``rotation`` (an orthogonal (K, K) matrix ``R``, ``calibrate.rotation``) makes
the layer compute ``Q(x R) Q(W R)^T + b``, the same output as ``x W^T + b`` in full precision; the
rotated weight ``W R`` is folded once at construction and ``x R`` is computed online.
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
                 rotation: torch.Tensor | None = None, weight_channels: bool = False) -> None:
        super().__init__()
        if linear.out_features % groups:
            raise ValueError(f"out_features {linear.out_features} not divisible by groups {groups}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.groups = groups
        if rotation is not None:
            k = linear.in_features
            if tuple(rotation.shape) != (k, k):
                raise ValueError(f"rotation must be ({k}, {k}) for in_features {k}, got "
                                 f"{tuple(rotation.shape)}")
            w = linear.weight.detach()
            self.register_buffer("rotation", rotation.to(w.dtype).to(w.device))
            # W R in float64, so the folded weight is the rotation's exact image in float32
            self.weight = nn.Parameter((w.double() @ rotation.double().to(w.device)).to(w.dtype),
                                       requires_grad=False)
        else:
            self.rotation = None
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = x @ self.rotation
        if self.shared_input:
            xq = self.act_quantizers[0](x)
        outs = []
        for i, (w, b) in enumerate(zip(self.weight_blocks(), self.bias_blocks())):
            xi = xq if self.shared_input else self.act_quantizers[i](x)
            outs.append(F.linear(xi, self.weight_quantizers[i](w), b))
        return outs[0] if self.groups == 1 else torch.cat(outs, dim=-1)

    def to_float(self) -> nn.Linear:
        """The FP linear (the rotation undone: ``W = (W R) R^T``)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        if self.rotation is None:
            lin.weight = self.weight
        else:
            w = (self.weight.detach().double() @ self.rotation.double().T).to(self.weight.dtype)
            lin.weight = nn.Parameter(w, requires_grad=False)
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, groups={self.groups}, "
                f"rotated={self.rotation is not None}, "
                f"weight_channels={self.weight_quantizers[0].per_channel}")
