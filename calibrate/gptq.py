"""GPTQ weight rounding on the calibrated grids (beyond the paper).

2DQuant rounds every weight to its nearest grid level. GPTQ (Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023) rounds the input
columns of a weight one at a time and spreads each column's rounding error over the columns not
yet rounded, weighted by the inverse Hessian ``H = X^T X`` of the layer's input, so the *output*
error ``||X W^T - X Q^T||`` is what gets minimised. Here it runs after DOBI, on DOBI's grids
(per tensor or per channel): the bounds do not change, only which level each weight takes, so
the result stays on the grid that export encodes. DQC may then move the bounds as usual; the
codes stay (each weight sits on a level, and small bound moves do not cross a rounding midpoint).

The inputs are the FP network's (one forward pass, like DOBI); a rotated linear's Hessian is that
of its rotated input ``x R``. The student's weights change, so calibration files store them
(``calibrate.calibfile``).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from calibrate.dobi import collect
from calibrate.qmodules import QuantLinear
from calibrate.quantizer import BoundFakeQuantizer

log = logging.getLogger(__name__)

DAMP = 0.01  # GPTQ's default dampening: 1% of the mean Hessian diagonal


class HessianTap:
    """``X^T X`` (float64, (K, K)) of every quantized linear's FP input, gathered by a
    ``calibrate.dobi.collect`` pass as its ``tap``: ``hessians`` {module path: (K, K)}.

    The input is what the linear's input quantizer sees, so a rotated linear gives
    ``R^T X^T X R``. One tap on DOBI's own pass saves GPTQ a forward over the calibration
    patches.
    """

    def __init__(self, student: nn.Module) -> None:
        self.first = {f"{n}.act_quantizers.0": n for n, m in student.named_modules()
                      if isinstance(m, QuantLinear)}
        self.hessians: dict[str, torch.Tensor] = {}

    def __call__(self, qname: str, x: torch.Tensor) -> None:
        if qname in self.first:
            rows = x.reshape(-1, x.shape[-1]).double()
            self.hessians[self.first[qname]] = rows.T @ rows


def input_hessians(student: nn.Module, calib_lr: torch.Tensor) -> dict[str, torch.Tensor]:
    """``HessianTap``'s ``X^T X`` of every quantized linear's FP input, by module path, from a
    pass of its own."""
    tap = HessianTap(student)
    collect(student, calib_lr, lambda x, search: None, names=set(tap.first), tap=tap)
    return tap.hessians


@torch.no_grad()
def gptq_round(w: torch.Tensor, hessian: torch.Tensor, q: BoundFakeQuantizer,
               damp: float = DAMP) -> torch.Tensor:
    """GPTQ rounding of a (N, K) weight on ``q``'s grid; returns the dequantized (N, K) weight.

    Columns are taken in order; ``hessian`` is (K, K). Input channels that never fire (zero
    Hessian diagonal) keep nearest rounding and pass no error on. Raises ``ValueError`` for
    mismatched shapes.
    """
    n_out, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"Hessian must be ({k}, {k}) for a weight with {k} inputs, got "
                         f"{tuple(hessian.shape)}")
    lo_t, up_t = (t.detach().double() for t in q.grid_bounds())  # the grid that runs
    lower = lo_t.reshape(-1, 1) if q.per_channel else lo_t.reshape(1, 1)
    upper = up_t.reshape(-1, 1) if q.per_channel else up_t.reshape(1, 1)
    levels = 2**q.bits - 1
    step = (upper - lower) / levels

    def nearest(col: torch.Tensor) -> torch.Tensor:  # col (N, 1)
        return lower + step * torch.round((col.clamp(lower, upper) - lower) / step)

    h = hessian.to(w.device, torch.float64).clone()  # on the weight's device (CPU or GPU)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    work = w.detach().double().clone()
    work[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(work)
    for i in range(k):
        col = work[:, i:i + 1]
        qcol = nearest(col)
        out[:, i:i + 1] = qcol
        err = (col - qcol) / hinv[i, i]
        work[:, i + 1:] -= err @ hinv[i:i + 1, i + 1:]
    # dead inputs: nearest rounding of the original weight (they multiply zeros in calibration)
    if dead.any():
        out[:, dead] = nearest(w.detach().double()[:, dead])
    # the exact float32 grid value fake_quant computes for each chosen level
    return q(out.to(w.dtype))


@torch.no_grad()
def apply_gptq(student: nn.Module, calib_lr: torch.Tensor, damp: float = DAMP,
               hessians: dict[str, torch.Tensor] | None = None) -> dict:
    """GPTQ-round every quantized linear's weight blocks in place on their current grids.

    ``hessians``: ``input_hessians`` already gathered (a ``HessianTap`` on DOBI's pass);
    without them a pass over ``calib_lr`` gathers them. Returns a report: seconds and, per
    linear, the output-error ratio GPTQ/nearest on the calibration inputs (``tr(E H E^T)``,
    lower is better).
    """
    t0 = time.perf_counter()
    if hessians is None:
        hessians = input_hessians(student, calib_lr)
    ratios = {}
    for name, m in student.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        h = hessians[name].to(m.weight.device)  # collected on the host (dobi.collect)
        blocks = []
        num = den = 0.0
        for wq, w in zip(m.weight_quantizers, m.weight_blocks()):
            near = wq(w.detach()).double()
            g = gptq_round(w, h, wq, damp)
            blocks.append(g)
            e_g, e_n = (w.double() - g.double()), (w.double() - near)
            num += float(torch.einsum("nk,kl,nl->", e_g, h, e_g))
            den += float(torch.einsum("nk,kl,nl->", e_n, h, e_n))
        m.weight.data.copy_(torch.cat(blocks, 0))
        ratios[name] = num / max(den, 1e-30)
    secs = time.perf_counter() - t0
    log.info("GPTQ: %d linears in %.1f s; output error vs nearest rounding: median %.2f",
             len(ratios), secs, sorted(ratios.values())[len(ratios) // 2] if ratios else 1.0)
    return {"seconds": secs, "error_ratio": ratios}
