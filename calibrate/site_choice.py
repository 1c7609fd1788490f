"""Per-site choices by measurement: which linear inputs to rotate, which to keep at 8 bits, which
kept weights to hold at 4 bits.

The first two read one FP pass over calibration patches (``calibrate.dobi.collect``) and score
each linear input by the relative error its best DOBI grid causes at the linear's output,
``||(Q(x) - x) W^T||^2 / ||x W^T||^2`` (``output_error``):

* ``choose_rotations``: a site is rotated when the rotated input ``x R`` (weight ``W R``) has an
  error below ``margin`` (``ROTATION_MARGIN``) times that of ``x`` (issue 19's hint: a Hadamard
  rotation cuts NGswin's decoder fc1 error ~40x, and makes already-even inputs slightly worse;
  each rotation also costs the engine a MatMul, so only a large gain pays).
* ``choose_wide_inputs``: mixed precision under a budget in average activation bits. Sites are
  promoted to ``WIDE_BITS`` greedily, largest error reduction per extra bit first (the error
  cost is the site's element count, so the budget is in bits per activation element).
  This generalises ``QuantRecipe.wide_inputs`` from roles to sites.
* ``choose_kept_int4``: for ``--fp-weights auto``, the weights 2DQuant keeps out of W_b A_b
  (convolutions, unquantized linears) go to 4-bit weight-only grids one layer at a time, and a
  layer stays INT4 when that alone costs the FP model at most ``KEPT_INT4_MAX_DROP`` dB on
  held-out patches (never a test set); the others stay INT8.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from calibrate.dobi import collect, search_bounds_multi
from calibrate.prepare import (
    WIDE_BITS,
    QuantRecipe,
    kept_layers,
    prepare,
    quantize_kept_weights,
    quantized_layers,
)
from calibrate.qmodules import QuantLinear
from calibrate.quantizer import fake_quant_nograd
from calibrate.rotation import has_hadamard, random_hadamard

log = logging.getLogger(__name__)

# Rotate a linear input only when rotating at least halves its output error. Each rotated input
# costs the engine an FP32 MatMul; measured (benchmarks.rotation_cost, docs/results/grids.md
# "Rotation cost"), 0.5 keeps 98% of the rotations' held-out gain on NGswin x2 W4A4 (DOBI: 32.15
# against 32.25 dB at 0.9, 27.44 without) with 36 rotated inputs instead of 64, and rotates 29
# instead of 87 on the reference SwinIR-light, where they gain nothing.
ROTATION_MARGIN = 0.5

# A kept layer goes to INT4 when that alone costs the FP model at most this much held-out PSNR:
# no more than the measurement's own noise. Measured one layer at a time on held-out BSD200
# patches (2026-12-01, docs/results/grids.md "Size"): most of NGswin's 86 kept layers cost
# -0.002..+0.002 dB; SwinIR-light ref's convs cost 0.003-0.21 dB. A first threshold of 0.01 dB
# put 3 of SwinIR-light's 5 convs at INT4 and lost 0.009 dB held-out after calibration (30.678
# against 30.687 with INT8, below the faithful 2DQuant's 30.686), so it is 0.002.
KEPT_INT4_MAX_DROP = 0.002


def output_error(x: torch.Tensor, weight: torch.Tensor, bits: int,
                 rotation: torch.Tensor | None = None, max_rows: int = 1 << 14) -> float:
    """Relative error the input grid causes at the linear's output (no bias, FP weight):
    ``||(Q(x') - x') W'^T||^2 / ||x W^T||^2`` with ``x' = x R``, ``W' = W R`` when rotated.

    The grid is DOBI's (two-sided) at ``bits``; up to ``max_rows`` seeded random tokens are used.
    An error in the input's own norm would hide an outlier channel whose weights are small
    (a post-norm residual stream): the output norm weighs each channel as the layer does.
    """
    k = weight.shape[1]
    rows = x.detach().reshape(-1, k).double()
    if rows.shape[0] > max_rows:
        g = torch.Generator().manual_seed(0)
        rows = rows[torch.randint(rows.shape[0], (max_rows,), generator=g)]
    w = weight.detach().double().cpu()
    ref = rows @ w.T
    if rotation is not None:
        rows, w = rows @ rotation, w @ rotation
    lo, up = search_bounds_multi(rows, [bits], "two_sided")[bits]
    err = (fake_quant_nograd(rows, lo, up, bits) - rows) @ w.T
    return float((err**2).sum() / (ref**2).sum().clamp_min(1e-30))


def linear_inputs(fp_model: nn.Module, recipe: QuantRecipe, calib_lr: torch.Tensor, rule
                   ) -> dict[str, object]:
    """``rule(x, site)`` on the FP input of every quantized linear (one FP pass).

    The inputs are the FP model's whatever ``recipe`` rotates, smooths or widens, so rules on
    the same ``fp_model`` and quantized linears can share one pass (``linear_inputs_many``)."""
    student = prepare(fp_model, replace(recipe, rotate=(), wide_inputs=(), smooth=None))
    first = {f"{n}.act_quantizers.0": n for n, m in student.named_modules()
             if isinstance(m, QuantLinear)}
    res, _ = collect(student, calib_lr, lambda x, search, qname: rule(x, first[qname]),
                     names=set(first), pass_name=True)
    return {site: res[qname] for qname, site in first.items()}


def linear_inputs_many(fp_model: nn.Module, recipe: QuantRecipe, calib_lr: torch.Tensor,
                       rules: dict[str, Callable[[torch.Tensor, str], object]]
                       ) -> dict[str, dict[str, object]]:
    """Several ``rule(x, site)`` in one FP pass: {rule name: {site: result}}, each the same as
    ``linear_inputs`` with that rule alone (the pass costs a whole forward over ``calib_lr``)."""
    both = linear_inputs(fp_model, recipe, calib_lr,
                         lambda x, site: {k: r(x, site) for k, r in rules.items()})
    return {k: {site: res[k] for site, res in both.items()} for k in rules}


def _smoothed(x: torch.Tensor, w: torch.Tensor, smoothing: dict[str, torch.Tensor] | None,
              site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / s, W s) with the site's smoothing factors, or (x, W) without smoothing."""
    if smoothing is None:
        return x, w
    sm = smoothing[site]
    return x / sm.to(x.dtype), w * sm.to(w.dtype)


def rotation_rule(fp_model: nn.Module, recipe: QuantRecipe, margin: float = ROTATION_MARGIN
                  ) -> Callable[[torch.Tensor, str], dict]:
    """``choose_rotations``' measurement of one site, a ``linear_inputs`` rule: {"plain",
    "rotated" (None where the width has no Hadamard construction), "rotate"}."""
    points = {p.name: p for p in fp_model.quant_points()}

    def rule(x: torch.Tensor, site: str) -> dict:
        lin = fp_model.get_submodule(site)
        k = lin.in_features
        bits = recipe.input_bits(points[site])
        plain = output_error(x, lin.weight, bits)
        if not has_hadamard(k):
            return {"plain": plain, "rotated": None, "rotate": False}
        rot = output_error(x, lin.weight, bits, random_hadamard(k, recipe.rotation_seed))
        return {"plain": plain, "rotated": rot, "rotate": rot < margin * plain}

    return rule


def rotated_sites(report: dict[str, dict]) -> tuple[str, ...]:
    """The sites ``rotation_rule`` chose, in the model's order (logged)."""
    sites = tuple(s for s, r in report.items() if r["rotate"])
    log.info("rotation chosen for %d of %d linear inputs", len(sites), len(report))
    return sites


def choose_rotations(fp_model: nn.Module, recipe: QuantRecipe, calib_lr: torch.Tensor,
                     margin: float = ROTATION_MARGIN) -> tuple[tuple[str, ...], dict[str, dict]]:
    """Linear sites whose rotated input quantizes better; returns (sites, per-site errors).

    A site is chosen when ``output_error`` with the rotation is below ``margin`` times the
    error without it, at the site's input width. Widths without a Hadamard construction are
    never rotated. The errors are of the unsmoothed input even when the recipe smooths it:
    measured on NGswin x2 W4A4 (held-out, DOBI + GPTQ), choosing on the smoothed input rotates
    17 sites instead of 36 but scores 31.28 against 31.45 dB (docs/results/beyond.md).
    """
    report = linear_inputs(fp_model, recipe, calib_lr, rotation_rule(fp_model, recipe, margin))
    return rotated_sites(report), report


def choose_wide_inputs(fp_model: nn.Module, recipe: QuantRecipe, calib_lr: torch.Tensor,
                       avg_bits: float, smoothing: dict[str, torch.Tensor] | None = None
                       ) -> tuple[tuple[str, ...], dict[str, dict]]:
    """Linear input sites promoted to 8 bits so that the mean input width is <= ``avg_bits``.

    The mean is over activation elements of the linear inputs (a site's weight is its element
    count in the pass). Sites go greedily by the reduction of ``output_error`` per extra
    bit-element. Rotations in ``recipe`` (and the ``smoothing`` factors, when given) are
    applied before measuring.
    """
    if not recipe.bits <= avg_bits <= WIDE_BITS:
        raise ValueError(f"--avg-bits: expected a value from {recipe.bits} to {WIDE_BITS}, got "
                         f"{avg_bits}")
    rot_sites = {p.name for p in fp_model.quant_points() if recipe.rotated(p)}

    def rule(x: torch.Tensor, site: str) -> dict:
        lin = fp_model.get_submodule(site)
        k = lin.in_features
        rot = random_hadamard(k, recipe.rotation_seed) if site in rot_sites else None
        x, w = _smoothed(x, lin.weight.detach(), smoothing, site)
        low = output_error(x, w, recipe.bits, rot)
        wide = output_error(x, w, WIDE_BITS, rot)
        return {"elements": x.numel(), "low": low, "wide": wide}

    report = linear_inputs(fp_model, recipe, calib_lr, rule)
    total = sum(r["elements"] for r in report.values())
    extra = WIDE_BITS - recipe.bits
    budget = (avg_bits - recipe.bits) * total  # extra bit-elements we may spend
    # error reduction per extra bit-element, largest first
    order = sorted(report, key=lambda s: -(report[s]["low"] - report[s]["wide"])
                   / (extra * report[s]["elements"]))
    chosen, spent = [], 0.0
    for s in order:
        cost = extra * report[s]["elements"]
        if spent + cost <= budget + 1e-9 and report[s]["low"] > report[s]["wide"]:
            chosen.append(s)
            spent += cost
    log.info("mixed precision: %d of %d linear inputs at %d bits (mean %.2f bits)", len(chosen),
             len(report), WIDE_BITS, recipe.bits + spent / total)
    for s in report:
        report[s]["wide_chosen"] = s in chosen
    return tuple(chosen), report


@torch.no_grad()
def choose_kept_int4(fp_model: nn.Module, recipe: QuantRecipe, val_lr: torch.Tensor,
                     val_hr: torch.Tensor, max_drop: float = KEPT_INT4_MAX_DROP
                     ) -> tuple[tuple[str, ...], dict[str, dict]]:
    """Kept layers (``calibrate.prepare.kept_layers``) that may hold 4-bit weights; returns
    (layer paths, {layer: {"drop_db", "weights", "int4"}}).

    Each layer in turn gets the INT4 weight-only grid of ``quantize_kept_weights`` in the FP
    model (everything else FP); ``drop_db`` is the mean held-out Y-PSNR (``val_lr``, ``val_hr``:
    (N, 3, h, w) and (N, 3, s*h, s*w) in [0, 1]) it loses. A layer is chosen when
    ``drop_db <= max_drop`` (dB). Cost: one forward of the held-out patches per layer.
    """
    from calibrate.dqc import val_psnr

    scale = int(fp_model.scale)
    linears, convs = quantized_layers(fp_model, recipe)
    quantized = linears | convs
    layers = kept_layers(fp_model, quantized)
    base = val_psnr(fp_model, val_lr, val_hr, scale)
    report: dict[str, dict] = {}
    t0 = time.perf_counter()
    for name in layers:
        m = fp_model.get_submodule(name)
        keep = m.weight.detach().clone()
        try:  # the caller's FP model: changed for one forward, then restored bit for bit
            quantize_kept_weights(fp_model, set(layers) - {name} | quantized, 4)
            drop = base - val_psnr(fp_model, val_lr, val_hr, scale)
        finally:
            m.weight.copy_(keep)
            for attr in ("kept_codes", "kept_scale", "kept_bits"):
                if hasattr(m, attr):
                    delattr(m, attr)
        report[name] = {"drop_db": drop, "weights": keep.numel(), "int4": drop <= max_drop}
    chosen = tuple(n for n, r in report.items() if r["int4"])
    log.info("--fp-weights auto: of the %d convolutions/linears kept out of W%dA%d, %d hold INT4 "
             "weights (%.0f%% of their weights; each costs <= %g dB held-out), the rest INT8; "
             "image layers stay FP16 (measured in %.0f s)", len(layers), recipe.bits,
             recipe.bits, len(chosen), 100 * sum(report[n]["weights"] for n in chosen)
             / max(1, sum(r["weights"] for r in report.values())), max_drop,
             time.perf_counter() - t0)
    for n, r in report.items():
        (log.debug if r["int4"] else log.info)("  %s: INT4 costs %.4f dB held-out -> %s", n,
                                               r["drop_db"], "INT4" if r["int4"] else "INT8")
    return chosen, report
