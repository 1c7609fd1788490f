"""The calibration API under ``edge-sr calibrate`` and ``edge-sr build``.

``calibrate_model(loaded_model, pool_data(...), CalibrationConfig) -> CalibratedModel`` works in
memory; ``calibrate(CalibrationConfig) -> Path`` loads the checkpoint, calls it and writes the
calibration file. Flow: split the training pool (calibration / held-out validation) -> per-site
choices by measurement (rotation, mixed precision; beyond the paper) -> ``prepare`` the student
-> bounds by DOBI, MinMax or Percentile from one FP pass over 32 calibration patches -> (GPTQ,
block reconstruction: options) -> DQC (2DQuant, edge-sr) -> the calibrated model. Everything is
seeded, so the same config gives the same file (callers may cache on the config).

Methods: ``2dquant`` is the faithful paper (DOBI + DQC) and stays so; ``edge-sr`` is 2DQuant
plus the options beyond the paper that measured better on held-out data (``EDGE_SR_OPTIONS``;
docs/results/beyond.md); ``dobi``, ``minmax`` and ``percentile`` are calibration-only baselines.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from calibrate.baselines import PERCENTILES, baseline_bounds
from calibrate.calibfile import (
    CalibratedModel,
    CalibrationMeta,
    save_calibration,
    state_checksum,
)
from calibrate.dobi import apply_bounds, dobi_bounds
from calibrate.dqc import (
    DQCConfig,
    check_resumable,
    differences,
    read_resume_state,
    run_dqc,
    val_psnr,
)
from calibrate.gptq import HessianTap, apply_gptq
from calibrate.prepare import WIDE_BITS, QuantRecipe, prepare
from calibrate.quantizer import check_bits
from calibrate.recon import ReconConfig, run_block_recon
from calibrate.site_choice import (
    choose_kept_int4,
    choose_wide_inputs,
    linear_inputs_many,
    rotated_sites,
    rotation_rule,
)
from calibrate.smoothing import smoothing_rule
from calibrate.vocab import (
    BUDGETS,
    DEPLOY_GRIDS,
    DQC_PRECISIONS,
    METHODS,
    ROUNDINGS,
    WEIGHT_GRIDS,
    Budget,
    DQCPrecision,
    FPWeights,
    Grid,
    Method,
    Rounding,
    WeightGrid,
    expected,
)
from edge_sr.checkpoints import load_model
from edge_sr.data.images import is_image_name
from edge_sr.data.pool import PatchSampler, pool_split
from edge_sr.errors import EdgeSRError
from edge_sr.fileio import atomic_path, check_writable, versions
from edge_sr.paths import train_dir

log = logging.getLogger(__name__)

# SmoothQuant's migration strength for ``--method edge-sr``, chosen on held-out BSD200 patches
# (scripts/smooth_study.py; NGswin x2 W4A4 at DOBI + GPTQ, 24 held-out 64x64 patches: none /
# 0.35 / 0.5 / 0.65 / 0.8 / 1.0 gave 30.66 / 31.25 / 31.43 / 31.45 / 31.45 / 31.33 dB, and 0.65
# is best on DQC's 8 validation patches: docs/results/beyond.md)
SMOOTH_ALPHA = 0.65

DOBI_METHODS = ("2dquant", "edge-sr", "dobi")  # bounds initialised by DOBI
DQC_METHODS = ("2dquant", "edge-sr")  # then trained by DQC
# What ``--method edge-sr`` adds to 2DQuant unless an option is given explicitly: SmoothQuant
# smoothing of the linear inputs (SMOOTH_ALPHA), Hadamard rotation of them where it measures
# better, per-channel weight grids, GPTQ rounding of the weights, and a bound learning rate
# relative to each grid's range. Each was measured against the faithful 2DQuant on held-out data
# (docs/results/beyond.md). The weights kept out of WbAb are weight-only grids at <= 4 bits and
# FP16 at 8 bits: INT8 cost 0.001-0.010 dB held-out on both models; INT4 for all of them (the
# file at 1/4 of the FP32 one) was at parity on NGswin but cost 0.08 dB held-out on the
# SwinIR-light reference, where it would lose to the faithful 2DQuant (docs/results/grids.md,
# "Size"). So "auto" measures each kept layer on held-out patches and holds it at INT4 only
# where that costs no more than the measurement's noise (``KEPT_INT4_MAX_DROP``), else INT8:
# 77 of NGswin's 86 kept layers, none of SwinIR-light's 5 convs (NGswin x2 W4 held-out 33.76
# against 33.67 all INT8). DQC also trains the quantized linears' weights at <= 3
# bits (NGswin x2 W2, held-out best 28.71 -> 31.08 / 31.68 dB at weight_lr 0.01 / 0.03); at W4
# it was measured (+0.04 dB at 0.03, worse at 0.1) and stays off. DQC stays float32: bfloat16
# autocast (--dqc-precision bf16) makes a DQC step 1.4-2.1x faster at batch 16 of 32x32 (1.18x on
# the cpu budget) at -0.031 dB held-out on NGswin x2 W4 with this method's defaults (mean of 9
# calibrations, seeds 0-2 with three versions of the bf16 code, -0.071 to +0.005), and on the
# SwinIR-light reference x3 it fell 0.0001 dB below the faithful method on Set14
# (docs/results/beyond.md); a default that depends
# on the CPU's bfloat16 support would make one command calibrate differently by machine.
# A callable default is a function of the CalibrationConfig.
EDGE_SR_WEIGHT_LR = 0.03
EDGE_SR_OPTIONS = dict(rotate=("auto",), weight_grid="channel", rounding="gptq",
                       bound_lr="relative",
                       fp_weights=lambda c: "auto" if c.bits <= 4 else "fp16",
                       weight_lr=lambda c: EDGE_SR_WEIGHT_LR if c.bits <= 3 else 0.0,
                       smooth=SMOOTH_ALPHA, dqc_precision="fp32", qdrop=0.0)

# DQC budgets, one per calibrate.vocab.BUDGETS name. "fast" was sized on the shared 2-core CPU
# (see docs/results/accuracy.md); "cpu" is the budget that gained most within 15 minutes of
# calibration on 2 cores, measured on NGswin x2 W4 held-out patches (benchmarks.dqc_budget, docs/results/beyond.md); "paper" is the paper's.
DQC_BUDGETS = {
    # patience 5 (validations): held-out curves on NGswin x2, 2026-12-03 (docs/results/beyond.md,
    # "DQC patience"): W4's best kept rising to iteration 110 (never 3 stale validations in a
    # row), W8's flattened at 30 (stops at 80, -0.001 dB held-out, ~2.7 min sooner)
    "cpu": dict(dqc=DQCConfig(iterations=130, batch=4, lr_patch=64, val_every=10,
                              ckpt_every=10, patience=5), val_patches=8, val_patch=64),
    "paper": dict(dqc=DQCConfig(iterations=4000, batch=16, lr_patch=64, val_every=100,
                                ckpt_every=100), val_patches=16, val_patch=64),
    "fast": dict(dqc=DQCConfig(iterations=60, batch=4, lr_patch=16, val_every=20,
                               ckpt_every=10), val_patches=4, val_patch=32),
}
CALIB_PATCHES, CALIB_PATCH = 32, 64  # DOBI data, as the reference (spec §4.4)
DQC_IMAGES = 64  # DQC draws its patches from this many calibration images
VAL_IMAGES = 10  # held-out images the validation patches come from
MIN_POOL_IMAGES = 2  # at least one calibration and one held-out image


@dataclass(frozen=True)
class CalibrationConfig:
    """One calibration run. ``model`` is a registry name or a checkpoint path."""

    model: str
    bits: int
    output: str | Path
    scale: int | None = None
    method: Method = "2dquant"
    budget: Budget = "fast"  # DQC iterations x batch x patch (BUDGETS)
    seed: int = 0
    qkv_separation: bool = True
    search_assignment: Literal["paper", "released"] = "paper"
    wide_inputs: tuple[str, ...] = ()  # linear roles with 8-bit inputs (beyond the paper)
    feature_loss: Literal["fixed", "released"] = "fixed"
    resume: bool = False
    pool: str | Path | None = None  # image folder; default data/train/BSD200
    percentile: float | None = None  # None: pick among PERCENTILES on held-out images
    iterations: int | None = None  # override the budget's DQC iterations (smoke runs)
    # DQC stops after this many validations without a new best (0: never; None: the budget's)
    patience: int | None = None
    calib_patches: int = CALIB_PATCHES  # DOBI / baseline statistics: this many LR patches
    calib_patch: int = CALIB_PATCH  # of this size
    device: str = "cpu"  # where the model runs ("cuda" on a workstation GPU); bounds are the same
    # beyond the paper; None = the method's default (the paper for 2dquant, EDGE_SR_OPTIONS)
    rotate: tuple[str, ...] | None = None  # roles, module paths, or "auto" (chosen per site)
    weight_grid: WeightGrid | None = None
    fp_weights: FPWeights | None = None  # unquantized weights held as FP16
    fp_sites: tuple[str, ...] = ()  # site kinds kept in floating point (prepare.SITE_KINDS)
    grid: Grid = "real"  # the engine whose native grid is learned
    avg_bits: float | None = None  # mixed precision: mean linear-input bits, sites chosen
    rounding: Rounding | None = None  # weight rounding after DOBI
    dqc_batch: int | None = None  # override the budget's DQC batch (budget studies)
    dqc_patch: int | None = None  # override the budget's DQC LR patch
    val_every: int | None = None  # override the budget's validation interval
    bound_lr: Literal["absolute", "relative"] | None = None  # DQC bound lr (None: method's)
    weight_lr: float | None = None  # DQC also trains the linears' weights (None: method's)
    qdrop: float | None = None  # QDrop: P(activation element stays FP) in DQC (None: method's)
    smooth: float | Literal["none"] | None = None  # SmoothQuant alpha ("none": off; None: method's)
    recompute: bool = False  # DQC activation checkpointing per block (memory for time)
    quant_conv: bool = False  # body convolutions on ORT's QLinearConv grid (QuantRecipe)
    dqc_precision: DQCPrecision | None = None  # DQC GEMMs in fp32 or bf16 (None: method's)
    block_recon: int = 0  # BRECQ-style block reconstruction: Adam steps per block (0: off)
    time_limit: float | None = None  # minutes of calibration; DQC stops at the first step past it
    force: bool = False  # replace an existing output (a --resume run may always replace it)

    def validate(self) -> None:
        try:
            check_bits(self.bits)
        except ValueError:
            raise EdgeSRError(f"--bits: expected an integer from 2 to 8, got {self.bits!r}"
                              ) from None
        if self.method not in METHODS:
            raise EdgeSRError(expected("--method", METHODS, self.method))
        check_device(self.device)
        if self.weight_lr is not None and not self.weight_lr >= 0:
            raise EdgeSRError(f"--weight-lr: expected a learning rate >= 0 (0: only the "
                              f"bounds train), got {self.weight_lr}")
        if self.qdrop is not None and not 0.0 <= self.qdrop < 1.0:
            raise EdgeSRError(f"--qdrop: expected a probability in [0, 1) (0: every element "
                              f"quantized), got {self.qdrop}")
        if self.block_recon < 0:
            raise EdgeSRError(f"--block-recon: expected steps per block >= 0 (0: off), got "
                              f"{self.block_recon}")
        if self.block_recon and self.method not in DOBI_METHODS:
            raise EdgeSRError(f"--block-recon: needs DOBI bounds to start from (--method "
                              f"{', '.join(DOBI_METHODS)}), got --method {self.method}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise EdgeSRError(f"--time-limit: expected minutes > 0, got {self.time_limit}")
        if self.budget not in BUDGETS:
            raise EdgeSRError(expected("--budget", BUDGETS, self.budget))
        if self.option("dqc_precision") not in DQC_PRECISIONS:
            raise EdgeSRError(expected("--dqc-precision", DQC_PRECISIONS, self.dqc_precision))
        if self.option("rounding") not in ROUNDINGS:
            raise EdgeSRError(expected("--rounding", ROUNDINGS, self.rounding))
        if self.avg_bits is not None and not self.bits <= self.avg_bits <= WIDE_BITS:
            raise EdgeSRError(f"--avg-bits: expected a mean width from {self.bits} (--bits) to "
                              f"{WIDE_BITS}, got {self.avg_bits}")
        try:
            self.quant_recipe()
        except ValueError as e:
            raise EdgeSRError(str(e)) from None

    def option(self, name: str):
        """A beyond-the-paper option: as given, else the method's default."""
        v = getattr(self, name)
        if v is not None:
            return v
        if self.method == "edge-sr":
            v = EDGE_SR_OPTIONS[name]
            return v(self) if callable(v) else v
        return {"rotate": (), "weight_grid": "tensor", "rounding": "nearest",
                "bound_lr": "absolute", "fp_weights": "fp32", "weight_lr": 0.0, "qdrop": 0.0,
                "smooth": "none", "dqc_precision": "fp32"}[name]

    def quant_recipe(self) -> QuantRecipe:
        """The recipe before per-site choices ("auto" rotation and ``avg_bits`` are resolved
        by ``calibrate_model`` on data)."""
        if self.option("weight_grid") not in WEIGHT_GRIDS:
            raise ValueError(expected("--weight-grid", WEIGHT_GRIDS, self.weight_grid))
        if self.grid not in DEPLOY_GRIDS:
            raise ValueError(expected("--grid", DEPLOY_GRIDS, self.grid))
        return QuantRecipe(self.bits, self.qkv_separation, self.search_assignment,
                           tuple(self.wide_inputs),
                           rotate=tuple(r for r in self.option("rotate") if r != "auto"),
                           weight_grid=self.option("weight_grid"), grid=self.grid,
                           fp_weights=self.option("fp_weights"), fp_sites=tuple(self.fp_sites),
                           smooth=None if self.option("smooth") == "none"
                           else float(self.option("smooth")), quant_conv=self.quant_conv)

    def dqc_config(self, model: nn.Module | None = None) -> DQCConfig:
        """The DQC budget; patches are at least ``model``'s minimum input (smaller ones would
        only be padded up: NGswin pads every input to 64x64 LR)."""
        base = DQC_BUDGETS[self.budget]["dqc"]
        kw = asdict(base) | {"seed": self.seed, "feature_loss": self.feature_loss}
        for key, v in (("iterations", self.iterations), ("patience", self.patience),
                       ("batch", self.dqc_batch),
                       ("lr_patch", self.dqc_patch), ("val_every", self.val_every),
                       ("bound_lr", self.option("bound_lr")),
                       ("weight_lr", self.option("weight_lr")),
                       ("qdrop", self.option("qdrop")),
                       ("recompute", self.recompute or None),
                       ("precision", self.option("dqc_precision"))):
            if v is not None:
                kw[key] = v
        req = getattr(model, "size_requirements", None)
        if req is not None:
            kw["lr_patch"] = max(kw["lr_patch"], req.minimum)
        return DQCConfig(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        d["pool"] = None if self.pool is None else str(self.pool)
        d["wide_inputs"] = list(self.wide_inputs)
        d["fp_sites"] = list(self.fp_sites)
        d["rotate"] = None if self.rotate is None else list(self.rotate)
        return d


@dataclass
class PoolData:
    calib_lr: torch.Tensor  # DOBI / baseline statistics
    val: tuple[torch.Tensor, torch.Tensor]  # held-out (LR, HR) patches
    sampler: object  # PatchSampler over the calibration images (DQC)


def check_device(device: str) -> None:
    """``--device``: 'cpu', or a CUDA device that PyTorch can see."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EdgeSRError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise EdgeSRError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EdgeSRError(f"--device {device}: PyTorch sees no CUDA device (this torch is "
                          f"{torch.__version__}; a CUDA build and a GPU are needed)")


def pool_data(scale: int, budget: str = "fast", seed: int = 0,
              pool: str | Path | None = None, lr_patch: int | None = None,
              calib_patches: int = CALIB_PATCHES, calib_patch: int = CALIB_PATCH) -> PoolData:
    """Calibration patches, held-out validation patches and the DQC sampler, all seeded."""
    root = Path(pool) if pool is not None else train_dir()
    n = sum(1 for f in root.iterdir() if is_image_name(f)) if root.is_dir() else 0
    if n < MIN_POOL_IMAGES:
        raise EdgeSRError(f"image pool {root}: expected at least {MIN_POOL_IMAGES} images (one "
                          f"to calibrate on, one held out), found {n}")
    split = pool_split(root, n_val=min(20, max(1, n // 10)), seed=0)
    r = DQC_BUDGETS[budget]
    # A seeded subset of the calibration images: each image's LR (MATLAB bicubic) costs ~1 s, and
    # 32 calibration patches come from (up to) 32 images, as in the reference (spec §4.4).
    order = np.random.default_rng(seed).permutation(len(split.calib))
    calib_imgs = [split.calib[i] for i in order[:calib_patches]]
    dqc_imgs = [split.calib[i] for i in order[:DQC_IMAGES]]
    val_imgs = list(split.val[:VAL_IMAGES])
    calib = PatchSampler(calib_patch, scale, seed=seed, images=calib_imgs).sample(calib_patches)
    val = PatchSampler(r["val_patch"], scale, flips=False, rot=False, seed=seed + 1,
                       images=val_imgs).sample(r["val_patches"])
    sampler = PatchSampler(lr_patch or r["dqc"].lr_patch, scale, seed=seed, images=dqc_imgs)
    return PoolData(calib[0], val, sampler)


def dqc_sampler(sampler, seed: int):
    """``sample(iteration, n)``: patches that depend only on (seed, iteration), for resume."""
    def sample(it: int, n: int) -> torch.Tensor:
        sampler.rng = np.random.default_rng([seed, it])
        return sampler.sample(n)[0]
    return sample


def pick_percentile(student: nn.Module, per_p: dict[str, dict], data: PoolData,
                    scale: int) -> tuple[str, dict[str, float]]:
    """The percentile whose bounds give the best held-out PSNR (never a test set)."""
    scores = {}
    for key in (f"p{p}" for p in PERCENTILES):
        apply_bounds(student, per_p[key])
        scores[key] = val_psnr(student, *data.val, scale)
    return max(scores, key=scores.get), scores


def resolve_recipe(cfg: CalibrationConfig, fp_model: nn.Module, data: PoolData,
                   stats: dict) -> tuple[QuantRecipe, dict[str, torch.Tensor] | None]:
    """The recipe with every measured per-site choice made (smoothing factors, rotation "auto",
    ``fp_weights`` "auto", ``avg_bits``); returns (recipe, smoothing factors or None)."""
    recipe = cfg.quant_recipe()
    rotate = cfg.option("rotate")
    # smoothing and the rotation choice read the same FP linear inputs: one pass for both
    rules = {}
    if recipe.smooth is not None:
        rules["smooth"] = smoothing_rule(fp_model, recipe.smooth)
    if "auto" in rotate:
        rules["rotate"] = rotation_rule(fp_model, replace(recipe, rotate=()))
    measured = linear_inputs_many(fp_model, recipe, data.calib_lr, rules) if rules else {}
    smoothing = measured.get("smooth")
    if smoothing is not None:
        log.info("smoothing (alpha %.2f) measured for %d linear inputs", recipe.smooth,
                 len(smoothing))
    if "auto" in rotate:
        fixed = tuple(r for r in rotate if r != "auto")
        report = measured["rotate"]
        sites = rotated_sites(report)
        recipe = replace(recipe, rotate=fixed + tuple(s for s in sites if s not in fixed))
        stats["rotation_choice"] = report
    if recipe.fp_weights == "auto":
        # which kept layers hold 4-bit weights: measured on held-out patches, never a test set
        layers, report = choose_kept_int4(fp_model, recipe, *data.val)
        recipe = replace(recipe, kept_int4=layers)
        stats["kept_int4_choice"] = report
    if cfg.avg_bits is not None:
        # the per-site bits are chosen on held-out patches, never on the test sets
        sites, report = choose_wide_inputs(fp_model, recipe, data.val[0], cfg.avg_bits,
                                           smoothing=smoothing)
        recipe = replace(recipe, wide_inputs=tuple(recipe.wide_inputs) + sites)
        stats["wide_choice"] = report
    return recipe, smoothing


CHOICE_STATS = ("rotation_choice", "kept_int4_choice", "wide_choice")


def recipe_state_path(state_path: str | Path) -> Path:
    """Where a resumable calibration keeps its resolved recipe, beside the DQC state."""
    return Path(str(state_path) + ".recipe.pt")


def init_state_path(state_path: str | Path) -> Path:
    """Where a resumable calibration keeps its student as DQC starts (after DOBI, GPTQ and block
    reconstruction), beside the DQC state."""
    return Path(str(state_path) + ".init.pt")


INIT_STATS = ("dobi_seconds", "stats_seconds", "percentile", "percentile_val_psnr", "gptq",
              "block_recon", "val_psnr_init")


def _initialise(cfg: CalibrationConfig, student: nn.Module, lm, data: PoolData,
                stats: dict) -> None:
    """DQC's starting point, searched: the method's bounds, then GPTQ and block reconstruction
    where the recipe asks; the stages' figures go to ``stats``."""
    scale = lm.scale
    gptq = cfg.option("rounding") == "gptq"
    hessians = HessianTap(student) if gptq and cfg.method in DOBI_METHODS else None
    if cfg.method in DOBI_METHODS:
        # GPTQ's Hessians come from the same FP pass as DOBI's statistics
        bounds, rep = dobi_bounds(student, data.calib_lr, [cfg.bits], tap=hessians)
        apply_bounds(student, bounds[cfg.bits])
        stats["dobi_seconds"] = rep.seconds
    else:
        per, rep = baseline_bounds(student, data.calib_lr)
        if cfg.method == "minmax":
            apply_bounds(student, per["minmax"])
        elif cfg.percentile is not None:
            key = f"p{cfg.percentile}"
            if key not in per:
                raise EdgeSRError(f"--percentile: expected one of {PERCENTILES}, got "
                                  f"{cfg.percentile}")
            apply_bounds(student, per[key])
        else:
            key, scores = pick_percentile(student, per, data, scale)
            apply_bounds(student, per[key])
            stats |= {"percentile": key, "percentile_val_psnr": scores}
        stats["stats_seconds"] = rep.seconds
    if gptq:
        stats["gptq"] = apply_gptq(student, data.calib_lr,
                                   hessians=hessians.hessians if hessians is not None else None)
    if cfg.block_recon:
        r = run_block_recon(student, lm.model, data.calib_lr, data.val,
                            ReconConfig(iterations=cfg.block_recon, seed=cfg.seed))
        stats["block_recon"] = asdict(r)
    stats["val_psnr_init"] = val_psnr(student, *data.val, scale)


def _initialised(cfg: CalibrationConfig, student: nn.Module, lm, data: PoolData, stats: dict,
                 state_path: str | Path | None) -> None:
    """Set ``student``'s starting point: bounds (DOBI or a baseline), GPTQ rounding and block
    reconstruction where the recipe asks. A resumable DQC run keeps that starting point beside
    its state, and ``--resume`` loads it instead of searching again (the same student: the
    resolved recipe is reused too)."""
    path = None if state_path is None or cfg.method not in DQC_METHODS else \
        init_state_path(state_path)
    # everything but what only steers the DQC loop decides the starting point
    key = {k: v for k, v in cfg.to_dict().items()
           if k not in ("resume", "time_limit", "iterations", "patience", "output", "device")}
    if cfg.resume and path is not None and path.exists():
        st = read_resume_state(path)
        diff = differences(st.get("config", {}), key)
        if diff:  # never replaced by another run's: the interrupted run can still resume
            raise EdgeSRError(f"--resume: the interrupted run ({path}) started from other "
                              f"settings: {diff}")
        student.load_state_dict(st["student"])
        stats.update(st["stats"])
        log.info("resuming from the interrupted run's DOBI / GPTQ starting point (%s)", path)
        return
    _initialise(cfg, student, lm, data, stats)
    if path is not None:
        st = {"config": key, "student": student.state_dict(),
              "stats": {k: stats[k] for k in INIT_STATS if k in stats}}
        with atomic_path(path) as tmp:
            torch.save(st, tmp)


def _resolved_recipe(cfg: CalibrationConfig, fp_model: nn.Module, data: PoolData, stats: dict,
                     state_path: str | Path | None
                     ) -> tuple[QuantRecipe, dict[str, torch.Tensor] | None]:
    """``resolve_recipe``, kept beside the DQC state: ``--resume`` reuses the interrupted run's
    measured choices (rotated sites, INT4 kept layers, per-site bits, smoothing factors) instead
    of measuring them again, so a resumed run trains exactly the student it saved (a choice at
    its threshold could flip under another thread count)."""
    if state_path is None or cfg.method not in DQC_METHODS:
        return resolve_recipe(cfg, fp_model, data, stats)
    path = recipe_state_path(state_path)
    requested = cfg.quant_recipe().to_dict()
    if cfg.resume and path.exists():
        st = read_resume_state(path)
        diff = differences({k: st["requested"].get(k) for k in requested}, requested)
        if diff:
            raise EdgeSRError(f"--resume: the interrupted run ({path}) used another recipe: "
                              + diff)
        stats.update(st["choices"])
        log.info("resuming with the interrupted run's measured per-site choices (%s)", path)
        return QuantRecipe(**st["recipe"]), st["smoothing"]
    if cfg.resume:
        log.warning("--resume: no interrupted run's state at %s: calibrating from the start",
                    path)
    recipe, smoothing = resolve_recipe(cfg, fp_model, data, stats)
    st = {"requested": requested, "recipe": recipe.to_dict(), "smoothing": smoothing,
          "choices": {k: stats[k] for k in CHOICE_STATS if k in stats}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(st, tmp)
    return recipe, smoothing


def calibrate_model(lm, data: PoolData, cfg: CalibrationConfig,
                    state_path: str | Path | None = None) -> CalibratedModel:
    """Calibrate a loaded FP model in memory: the Python API under ``calibrate``.

    ``lm``: an ``edge_sr.checkpoints.LoadedModel`` (the model, its name and sha256; loaded and
    hashed once by the caller). ``data``: ``pool_data(...)`` for the model's scale. Returns the
    fake-quant student with its ``CalibrationMeta`` (what ``save_calibration`` writes).
    ``state_path``: where DQC keeps its resumable state (``cfg.resume`` continues from it).
    """
    cfg.validate()
    if cfg.quant_conv and not lm.model.body_convs():  # before minutes of per-site choices
        raise EdgeSRError(f"--quant-conv: {lm.name} has no dense body convolutions to quantize "
                          "(only SwinIR-light's are listed: SRModel.body_convs)")
    torch.manual_seed(cfg.seed)
    scale = lm.scale
    stats: dict = {"val_patches": list(data.val[0].shape)}
    t0 = time.perf_counter()
    if (cfg.resume and cfg.method in DQC_METHODS and state_path is not None
            and Path(state_path).exists()):  # refused before any work, nothing overwritten
        check_resumable(state_path, cfg.dqc_config(lm.model))
    recipe, smoothing = _resolved_recipe(cfg, lm.model, data, stats, state_path)
    student = prepare(lm.model, recipe, smoothing)
    _initialised(cfg, student, lm, data, stats, state_path)
    rounding = cfg.option("rounding")
    if cfg.method in DQC_METHODS:
        dqc_cfg = cfg.dqc_config(lm.model)
        deadline = None if cfg.time_limit is None else t0 + 60 * cfg.time_limit
        r = run_dqc(student, lm.model, dqc_sampler(data.sampler, cfg.seed), data.val, dqc_cfg,
                    state_path=state_path, resume=cfg.resume, deadline=deadline)
        stats |= {"dqc_stopped_at": r.stopped_at, "dqc_converged_at": r.converged_at,
                  "dqc_seconds": r.seconds,
                  "dqc_iterations": r.iterations, "dqc_resumed_at": r.resumed_at,
                  "dqc_best_iteration": r.best_iteration, "val_psnr": r.best_val_psnr,
                  "dqc_history": r.history, "dqc_config": asdict(dqc_cfg)}
    else:
        stats["val_psnr"] = stats["val_psnr_init"]
    stats["seconds"] = time.perf_counter() - t0
    meta = CalibrationMeta(
        bits=cfg.bits, scale=scale, method=cfg.method, recipe=recipe.to_dict(),
        checkpoint_name=lm.name, checkpoint_sha256=lm.sha256,
        state_sha256=state_checksum(lm.model), arch=lm.arch, config=cfg.to_dict(), stats=stats,
        versions=versions(), rounding=rounding,
        weights_trained=cfg.method in DQC_METHODS and cfg.option("weight_lr") > 0)
    return CalibratedModel(student.eval(), meta)


def dqc_state_path(output: str | Path) -> Path:
    """Where a calibration writing ``output`` keeps its resumable DQC state:
    ``<output>.dqc-state.pt`` (with ``.recipe.pt`` and ``.init.pt`` beside it)."""
    return Path(str(output) + ".dqc-state.pt")


def resumable_state(state: Path) -> list[Path]:
    """The files an interrupted calibration writing ``<output>`` left for ``--resume``: its DQC
    state ``state`` (``dqc_state_path``), and the recipe and starting point kept beside it."""
    return [p for p in (state, recipe_state_path(state), init_state_path(state)) if p.exists()]


def clear_dqc_state(state: Path) -> None:
    """Remove a finished calibration's resumable state: the DQC state at ``state`` and the
    recipe and starting point kept beside it."""
    for p in (state, recipe_state_path(state), init_state_path(state)):
        p.unlink(missing_ok=True)


def calibrate(cfg: CalibrationConfig, lm=None) -> Path:
    """Calibrate ``cfg.model`` at ``cfg.bits`` with ``cfg.method`` and write ``cfg.output``.

    ``lm``: the already loaded ``LoadedModel`` (``edge-sr build`` passes it, so the checkpoint
    is read and hashed once); by default ``cfg.model`` is loaded here.
    """
    cfg.validate()
    check_writable(cfg.output, "-o")
    if Path(cfg.output).exists() and not cfg.force:
        if not cfg.resume:
            raise EdgeSRError(f"-o {cfg.output}: already exists; pass --force to overwrite it")
        if not resumable_state(dqc_state_path(cfg.output)):
            raise EdgeSRError(f"-o {cfg.output}: already complete, with nothing left to resume; "
                              "pass --force to calibrate it again")
    if lm is None:
        lm = load_model(cfg.model, scale=cfg.scale, device=cfg.device)
    data = pool_data(lm.scale, cfg.budget, cfg.seed, cfg.pool,
                     lr_patch=cfg.dqc_config(lm.model).lr_patch,
                     calib_patches=cfg.calib_patches, calib_patch=cfg.calib_patch)
    state = dqc_state_path(cfg.output)
    cal = calibrate_model(lm, data, cfg, state_path=state)
    out = save_calibration(cfg.output, cal.model, cal.meta)
    stopped = cal.meta.stats.get("dqc_stopped_at")
    if stopped is not None:  # --time-limit: the DQC state stays, so --resume can continue it
        log.warning("%s holds a partial DQC (stopped at iteration %d by --time-limit); the same "
                    "command with --resume continues it (with a later or no --time-limit: it "
                    "counts from the start of the command)", out, stopped)
    else:
        clear_dqc_state(state)
    n_val = (cal.meta.stats.get("val_patches") or ["?"])[0]
    log.info("wrote %s (%s, W%dA%d, x%d; %.3f dB on DQC's %s held-out validation patches, not "
             "build's validation crops)", out, cfg.method, cfg.bits, cfg.bits, lm.scale,
             cal.meta.stats["val_psnr"], n_val)
    return out
