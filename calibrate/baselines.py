"""MinMax and Percentile calibration of the same quantizers, for comparison with DOBI.

Both set (lower, upper) from FP activation statistics in the same single pass DOBI uses
(``calibrate.dobi.collect``); neither depends on the bit width, so one pass serves every width.
Percentiles of tensors above ``PERCENTILE_SAMPLE`` elements are taken on a deterministic strided
subsample of that many elements (min and max always use the whole tensor).
"""

from __future__ import annotations

import torch
from torch import nn

from calibrate.dobi import CollectReport, collect
from calibrate.quantizer import Search

PERCENTILE_SAMPLE = 1 << 20
# Candidate upper percentiles (lower = 100 - p); the one used is picked on held-out pool images.
PERCENTILES = (99.9, 99.99, 99.999)


def _subsample(x: torch.Tensor, limit: int = PERCENTILE_SAMPLE) -> torch.Tensor:
    flat = x.detach().reshape(-1)
    if flat.numel() <= limit:
        return flat
    stride = -(-flat.numel() // limit)
    return flat[::stride]


def minmax_bounds(x: torch.Tensor) -> tuple[float, float]:
    return float(x.min()), float(x.max())


def percentile_bounds(x: torch.Tensor, percentiles=PERCENTILES) -> dict[float, tuple[float, float]]:
    """{p: (q_{100-p}, q_p)} for every p, clamped into [min, max]."""
    lo, hi = minmax_bounds(x)
    sample = _subsample(x).float()
    qs = torch.tensor([q for p in percentiles for q in ((100 - p) / 100, p / 100)])
    vals = torch.quantile(sample, qs).tolist()
    out = {}
    for i, p in enumerate(percentiles):
        a, b = max(lo, vals[2 * i]), min(hi, vals[2 * i + 1])
        if not b > a:
            a, b = lo, hi
        out[p] = (a, b)
    return out


def baseline_rule(x: torch.Tensor, search: Search) -> dict[str, tuple[float, float]]:
    out = {"minmax": minmax_bounds(x)}
    for p, b in percentile_bounds(x).items():
        out[f"p{p}"] = b
    return out


def baseline_bounds(student: nn.Module, calib_lr: torch.Tensor
                    ) -> tuple[dict[str, dict[str, tuple[float, float]]], CollectReport]:
    """{"minmax" | "p99.9" | ...: {quantizer: (l, u)}} from one FP pass."""
    res, rep = collect(student, calib_lr, baseline_rule)
    keys = next(iter(res.values())).keys()
    return {k: {name: r[k] for name, r in res.items()} for k in keys}, rep
