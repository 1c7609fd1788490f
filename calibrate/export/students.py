"""Quick min/max-calibrated students for export tests and benchmarks.

Not a calibration method: it only gives every quantizer plausible bounds (a fraction of each
tensor's FP min/max range, so clipping is exercised) so that export exactness can be checked
without running DOBI/DQC.
"""

from __future__ import annotations

import torch
from torch import nn

from calibrate.prepare import QuantRecipe, prepare, quantizers, set_quant_enabled
from calibrate.qmodules import QuantLinear


@torch.no_grad()
def minmax_student(model: nn.Module, calib_lr: torch.Tensor, bits: int, shrink: float = 0.9,
                   qkv_separation: bool = True) -> nn.Module:
    """``prepare`` the model and set each quantizer to ``shrink`` x its FP [min, max] range."""
    student = prepare(model, QuantRecipe(bits=bits, qkv_separation=qkv_separation))
    stats: dict[str, tuple[float, float]] = {}

    def span(x: torch.Tensor) -> tuple[float, float]:
        lo, hi = float(x.min()), float(x.max())
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * shrink
        return mid - half, mid + half

    for name, m in student.named_modules():
        if isinstance(m, QuantLinear):
            for i, w in enumerate(m.weight_blocks()):
                stats[f"{name}.weight_quantizers.{i}"] = span(w)
    def hook(name: str):
        def record(mod, inp, out) -> None:  # a hook that returned a value would replace `out`
            stats.setdefault(name, span(inp[0]))
        return record

    hooks = [q.register_forward_hook(hook(n)) for n, q in quantizers(student)]
    set_quant_enabled(student, False)
    try:
        student(calib_lr)
    finally:
        for h in hooks:
            h.remove()
        set_quant_enabled(student, True)
    for n, q in quantizers(student):
        q.set_bounds(*stats[n])
    return student
