"""SmoothQuant input smoothing of the quantized linears (beyond the paper).

A linear's output is unchanged when its input channel j is divided by ``s_j`` and its weight
column j multiplied by it: ``x W^T = (x S^-1)(W S)^T``, ``S = diag(s)``. SmoothQuant (Xiao et al.,
"SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models",
ICML 2023, eq. 4) picks

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

so that a channel whose activations are large (NGswin's post-norm residual stream carries its
range in a few channels: issue 19) hands part of its range to the weight, which per-channel
weight grids and GPTQ absorb better than one per-tensor activation grid. ``alpha`` is the
migration strength: 0 leaves the input alone and 1 moves all its range into the weight.

The factors are measured once on the FP model's calibration inputs and stay fixed; they are
folded into the weight (and into a rotation, when the site is also rotated) by
``calibrate.qmodules.QuantLinear``. On ONNX Runtime an unrotated smoothed input costs one
elementwise Mul; a rotated one costs nothing more (``S^-1 R`` is one matrix).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from calibrate.prepare import QuantRecipe
from calibrate.site_choice import linear_inputs

log = logging.getLogger(__name__)

MIN_RANGE = 1e-5  # floor on max|X_j| and max|W_j|: a dead channel gets a finite factor


def smoothing_factors(absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's factors for one linear.

    ``absmax``: (K,) max |x_j| of each input channel over the calibration tokens. ``weight``:
    the (N, K) FP weight. Returns (K,) positive float32 factors ``s``. Raises ``ValueError`` on
    mismatched shapes or alpha outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be from 0 to 1, got {alpha}")
    if absmax.dim() != 1 or weight.dim() != 2 or weight.shape[1] != absmax.shape[0]:
        raise ValueError(f"absmax (K,) and weight (N, K) expected, got {tuple(absmax.shape)} and "
                         f"{tuple(weight.shape)}")
    a = absmax.double().clamp_min(MIN_RANGE)
    w = weight.detach().double().abs().amax(0).clamp_min(MIN_RANGE)
    return (a**alpha / w ** (1.0 - alpha)).float()


def smoothing_rule(fp_model: nn.Module, alpha: float
                   ) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """``measure_smoothing``'s measurement of one site, a ``linear_inputs`` rule: the (K,)
    factors from the site's FP input channel maxima and its weight."""
    def rule(x: torch.Tensor, site: str) -> torch.Tensor:
        lin = fp_model.get_submodule(site)
        absmax = x.detach().abs().reshape(-1, lin.in_features).amax(0)
        return smoothing_factors(absmax, lin.weight, alpha)

    return rule


def measure_smoothing(fp_model: nn.Module, recipe: QuantRecipe, calib_lr: torch.Tensor,
                      alpha: float) -> dict[str, torch.Tensor]:
    """{linear module path: (K,) factors} for every quantized linear, from one FP pass over
    ``calib_lr`` (N, 3, H, W) in [0, 1]."""
    factors = linear_inputs(fp_model, replace(recipe, smooth=None), calib_lr,
                            smoothing_rule(fp_model, alpha))
    log.info("smoothing (alpha %.2f) measured for %d linear inputs", alpha, len(factors))
    return factors
