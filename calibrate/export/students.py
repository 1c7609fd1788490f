"""Quick min/max-calibrated students for export tests and benchmarks.

Not a calibration method: it only gives every quantizer plausible bounds (a fraction of each
tensor's FP min/max range, so clipping is exercised) so that export exactness can be checked
without running DOBI/DQC.
"""

from __future__ import annotations

import torch
from torch import nn

from calibrate.dobi import apply_bounds, collect
from calibrate.prepare import QuantRecipe, prepare


@torch.no_grad()
def minmax_student(model: nn.Module, calib_lr: torch.Tensor, bits: int, shrink: float = 0.9,
                   qkv_separation: bool = True) -> nn.Module:
    """``prepare`` the model and set each quantizer to ``shrink`` x its FP [min, max] range."""
    student = prepare(model, QuantRecipe(bits=bits, qkv_separation=qkv_separation))

    def span(x: torch.Tensor, search: str) -> tuple[float, float]:
        lo, hi = float(x.min()), float(x.max())
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * shrink
        return mid - half, mid + half

    bounds, _ = collect(student, calib_lr, span)
    apply_bounds(student, bounds)
    return student
