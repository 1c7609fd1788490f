"""Exact integer encodings of 2DQuant's learned grids (the maths of the QDQ export).

A quantizer's grid is ``l + k*s`` (k = 0..n, n = 2^b - 1, ``s = (u - l)/n``); its zero point
``-l/s`` is real, so ONNX's ``(q - zp)*s`` cannot hold it directly. We shift by a constant ``m``:

    m = l + z*s        (z an integer)
    x - m  has grid (k - z)*s   -> integer multiples of s: QuantizeLinear/DequantizeLinear hold it
    round((x - m)/s) = round((x - l)/s) - z    (z integer)

* The integer ``z`` is the grid level nearest to 0 (clipped so the codes fit), so ``|m| <= s/2``
  whenever ``l <= 0 <= u``. A small shift matters: the consumer adds it back through corrections
  such as ``m * sum(w)``, and a large ``m`` (e.g. ``m = l``) makes those terms cancel against the
  MatMul and amplifies float32 noise. Measured on the x2 reference at W2A2 (32x32 crop): ``m = l``
  left 84% of output pixels more than 1e-4 off the fake-quant model, the nearest level 6.6e-7 max.
* target ``ort``: uint8 container with zero point ``z``; the stored code is k itself.
* target ``trt``: int8 container with zero point 0 (TensorRT is symmetric-only); the stored code
  is ``k - z`` in [-z, n - z] inside int8 (for b = 8 this forces ``z = 128``, the notes' §0.1
  shift ``m = l + 2^(b-1)*s``).
* Rounding: ``round((x - m)/s) = round((x - l)/s) - z`` holds in real arithmetic (exact ties move
  with the parity of z under half-to-even). In float32 ``x - m`` and ``x - l`` round differently,
  so inputs within float noise of a rounding midpoint can land one level apart: about 1e-6 of
  the elements at 8 bits on random data, none at 2-3 bits (see tests).

The ONNX pattern is ``Sub(m) -> Clip -> QuantizeLinear -> DequantizeLinear`` (the float Clip keeps
ORT's integer fusions); the DQ output is ``x_hat - m``. The shift ``m`` is given back exactly by the
consumer: folded into the next linear's bias, or by rank-1 terms around an attention MatMul (see
``emit.py``). Weights use the trt form (zp 0, codes ``k - 2^(b-1)``, int8 or int4) and their shift
``m_w`` becomes a per-token rank-1 term ``m_w * sum_k a_k``; a per-channel weight grid has one
scale and one shift per output channel (a per-axis DQ, and a per-column rank-1 term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from calibrate.quantizer import BoundFakeQuantizer, QParams
from calibrate.vocab import Target


@dataclass(frozen=True)
class TargetRules:
    """What one engine's integer kernels take (deploy notes B1), read by the encodings here and
    by ``emit``; the only place the two targets differ."""

    act_container: Literal["uint8", "int8"]  # activation codes: k (zero point z), or k - z
    weight_container: Literal["uint8", "int8"]  # 8-bit weight codes (uint8: + 2^(b-1), zp too)
    fused_linear: bool  # write a deployable linear as the engine's fused integer op (ORT's
    # MatMulIntegerToFloat); else DQ -> MatMul -> Add, which TensorRT fuses itself
    sign_rotation: bool = False  # store a rotation S^-1 R as INT4 signs x a per-row scale
    # (Cast -> Mul, folded at load, exact); TensorRT keeps the float32 matrix


TARGETS: dict[str, TargetRules] = {
    # ORT 1.32 CPU: u8 x s8 can saturate without VNNI, so 8-bit-container weights are u8 with zero
    # point 2^(b-1); the fused linear takes int8 weights wherever that is exact anyway
    # (``fused_weight_container``)
    "ort": TargetRules(act_container="uint8", weight_container="uint8", fused_linear=True,
                       sign_rotation=True),
    # TensorRT: symmetric int8 only (zero point 0)
    "trt": TargetRules(act_container="int8", weight_container="int8", fused_linear=False),
}


# MLAS's u8 x s8 kernel without VNNI (AVX2, AVX-512 BW: ``vpmaddubsw``) adds two adjacent
# products into a saturating int16 before widening; with VNNI or AMX it accumulates in int32.
INT16_MAX = 32767


def u8s8_is_exact(act_bits: int, weight_bits: int) -> bool:
    """Whether ONNX Runtime's u8 x s8 integer GEMM is exact on every CPU for uint8 activation codes
    in ``[0, 2^a - 1]`` times signed weight codes in ``[-2^(w-1), 2^(w-1) - 1]``: the sum of two
    products must fit int16 (``2 (2^a - 1) 2^(w-1) <= 32767``), the bound of the x86 kernels
    without VNNI (ORT's quantization docs: the saturation of ``vpmaddubsw``). True for every
    engine with weights of <= 7 bits, and for W8 with activations of <= 7; False for W8A8 (65,280)."""
    return 2 * (2**act_bits - 1) * 2 ** (weight_bits - 1) <= INT16_MAX


def fused_weight_container(target: Target, act_bits: int, weight_bits: int) -> str:
    """The 8-bit container of a fused linear's weight codes: ``int8`` (zero point 0, the signed
    codes as they are) where the target's u8 x s8 kernel is exact on every CPU for these widths,
    else the target's ``weight_container`` (ORT: ``uint8`` with zero point 2^(b-1), the u8 x u8
    kernel). Both hold the same values. ORT's u8 x s8 kernel is the faster one (VNNI's
    ``vpdpbusd``; 1.2-2.9x on the GEMMs of the 320x180 frame, docs/results/grids.md)."""
    rules = TARGETS[target]
    if rules.weight_container == "uint8" and u8s8_is_exact(act_bits, weight_bits):
        return "int8"
    return rules.weight_container


def _step(q: BoundFakeQuantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QParams]:
    """(lower, upper, step) of the grid that runs as float32 tensors, computed exactly as
    ``fake_quant`` does, from ``q.qparams()`` (the only thing export reads of a quantizer)."""
    qp = q.qparams()
    lower, upper = qp.tensors()
    return lower, upper, (upper - lower) / (2**qp.bits - 1), qp


@dataclass(frozen=True)
class ActEncoding:
    """How one activation quantizer becomes ``Sub -> Clip -> Q -> DQ`` (all float32 constants)."""

    bits: int
    lower: float
    upper: float
    scale: float
    shift: float  # m = l + z*s: the DQ output is x_hat - m
    container: Literal["uint8", "int8"]
    zero_point: int
    clip_lo: float  # Clip bounds on x - m, i.e. (-z)*s and (n - z)*s
    clip_hi: float
    qmin: int  # the stored codes lie in [qmin, qmax] (true b-bit range inside the container)
    qmax: int

    def meta(self) -> dict:
        return {"bits": self.bits, "lower": self.lower, "upper": self.upper, "scale": self.scale,
                "shift": self.shift, "container": self.container, "zero_point": self.zero_point,
                "qmin": self.qmin, "qmax": self.qmax}


def act_encoding(q: BoundFakeQuantizer, target: Target) -> ActEncoding:
    """The Q/DQ form of an activation quantizer. On an integer or symmetric grid (0 at level
    ``z``) that the target holds, the shift is exactly 0: plain Q/DQ, no correction terms."""
    lower, upper, step, qp = _step(q)
    if not float(step) > 0:
        raise ValueError(f"upper bound {float(upper)} must exceed lower bound {float(lower)}")
    n = 2**q.bits - 1
    z_near = int(np.rint(-float(lower) / float(step)))  # the grid level nearest to 0
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if TARGETS[target].act_container == "uint8":
        z = min(max(z_near, 0), n)
        container, zp, qmin, qmax = "uint8", z, 0, n
    else:
        z = min(max(z_near, max(0, n - 127)), min(n, 128))  # codes k - z must fit int8
        container, zp, qmin, qmax = "int8", 0, -z, n - z
    shift = lower + step * z
    if qp.grid != "real" and z == qp.integer_zero_point:
        shift = torch.zeros_like(shift)  # 0 is on the grid at level z (rounding noise aside)
    return ActEncoding(
        bits=q.bits, lower=float(lower), upper=float(upper), scale=float(step), shift=float(shift),
        container=container, zero_point=zp, clip_lo=float(step * (-z)),
        clip_hi=float(step * (n - z)), qmin=qmin, qmax=qmax,
    )


@dataclass(frozen=True)
class WeightEncoding:
    """Signed codes ``k - 2^(b-1)`` with scale ``s`` and shift ``m_w = l + 2^(b-1)*s``.

    ``codes * scale + shift`` reproduces the fake-quant weight; ``dequant`` is that weight exactly
    as ``fake_quant`` computes it (used to fold biases in float64).
    """

    bits: int
    codes: np.ndarray  # int8 array, same shape as the weight
    scale: float | np.ndarray  # float32 (rows,) for a per-channel grid
    shift: float | np.ndarray
    dequant: np.ndarray  # float32, the fake-quant weight

    def row_scales(self) -> np.ndarray:
        """The scale of every output channel (row), float32 (rows,)."""
        return np.broadcast_to(np.asarray(self.scale, np.float32).reshape(-1),
                               (self.codes.shape[0],)).copy()

    def row_shifts(self) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.shift, np.float32).reshape(-1),
                               (self.codes.shape[0],)).copy()

    @property
    def per_channel(self) -> bool:
        return np.ndim(self.scale) > 0

    def meta(self) -> dict:
        as_py = (lambda v: np.asarray(v).tolist()) if self.per_channel else float
        return {"bits": self.bits, "scale": as_py(self.scale), "shift": as_py(self.shift),
                "qmin": -(2 ** (self.bits - 1)), "qmax": 2 ** (self.bits - 1) - 1}


def weight_encoding(q: BoundFakeQuantizer, w: torch.Tensor) -> WeightEncoding:
    """Signed codes of a weight block; on a symmetric grid the shift is exactly 0."""
    lower, upper, step, qp = _step(q)
    w = w.detach().float()
    k = torch.round((torch.minimum(torch.maximum(w, lower), upper) - lower) / step)
    deq = lower + step * k
    c = 2 ** (q.bits - 1)
    codes = (k - c).to(torch.int64).numpy()
    if codes.min() < -c or codes.max() > c - 1:  # pragma: no cover - guarded by the clip above
        raise AssertionError("weight codes left their b-bit range")
    shift = lower + step * c
    if qp.grid == "symmetric":
        shift = torch.zeros_like(shift)  # the grid is (k - c) * s
    if q.per_channel:  # (C, 1) bounds: one scale and shift per row
        scale_v, shift_v = step.reshape(-1).numpy(), shift.reshape(-1).numpy()
    else:
        scale_v, shift_v = float(step), float(shift)
    return WeightEncoding(bits=q.bits, codes=codes.astype(np.int8), scale=scale_v,
                          shift=shift_v, dequant=deq.numpy().astype(np.float32))
