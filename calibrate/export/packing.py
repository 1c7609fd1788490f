"""The low-bit weight format and the low-bit linear's reference maths (no CUDA, no ctypes).

What the CUDA kernel (``runtime/kernels/esr_lowbit.h``), the TensorRT ``LowBitLinear`` node
(``calibrate.export_plugin``) and ``runtime.lowbit``'s binding share: integer codes on a
quantizer's grid, weight packing (the codes of one output row, ``32 // bits`` per little-endian
uint32 word, stored as int32), ``LowBitLinearParams`` read from a calibrated ``QuantLinear``, and a
pure-PyTorch reference of the linear (integer codes, int32-style sums, the affine corrections).
It lives with export so that ``calibrate`` needs nothing from ``runtime``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edge_sr.errors import EdgeSRError


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
    """Read a calibrated ``calibrate.qmodules.QuantLinear`` into packed low-bit parameters (the
    grids that run: ``BoundFakeQuantizer.qparams()``, constrained grids included)."""
    w_q, a_q = list(qlin.weight_quantizers), list(qlin.act_quantizers)
    if not all(q.enabled for q in w_q + a_q):
        raise EdgeSRError("a QuantLinear with disabled quantizers cannot become a low-bit linear")
    if getattr(qlin, "rotation", None) is not None:
        raise EdgeSRError("the low-bit linear has no input rotation; calibrate without "
                          "--rotate for the low-bit CUDA path")
    if getattr(qlin, "smoothing", None) is not None:
        raise EdgeSRError("the low-bit linear has no input smoothing; calibrate with "
                          "--smooth none for the low-bit CUDA path")
    w_bits, act_bits = w_q[0].bits, a_q[0].bits
    codes, lowers, scales = [], [], []
    for block, q in zip(qlin.weight_blocks(), w_q):
        lower, upper = q.qparams().tensors()
        codes.append(quantize_codes(block.detach().float().cpu(), lower, upper, w_bits))
        # per tensor: () bounds; per channel: (rows, 1). Either way one value per row here.
        lowers.append(lower.reshape(-1).expand(block.shape[0]))
        scales.append(grid_step(lower, upper, w_bits).reshape(-1).expand(block.shape[0]))
    bias = None if qlin.bias is None else qlin.bias.detach().float().cpu()
    return LowBitLinearParams(
        act_bits=act_bits, w_bits=w_bits, in_features=qlin.in_features,
        out_features=qlin.out_features,
        act_lower=torch.stack([q.qparams().tensors()[0] for q in a_q]),
        act_upper=torch.stack([q.qparams().tensors()[1] for q in a_q]),
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
