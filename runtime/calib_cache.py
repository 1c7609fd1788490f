"""Build's calibration cache: one file per distinct calibration, keyed by a hash of everything
that determines it (not the tile, backend or output), so rebuilding for another backend or
tile skips the slow stage. Files live under ``$EDGE_SR_CACHE/calibrations`` (default
``$XDG_CACHE_HOME/edge-sr`` or ``~/.cache/edge-sr``) and are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate.api import calibrate, clear_dqc_state, dqc_state_path, resumable_state
from calibrate.calibfile import load_calibrated, read_calibration
from edge_sr.checkpoints import cache_dir
from edge_sr.errors import EdgeSRError
from edge_sr.fileio import sha256_file

if TYPE_CHECKING:
    from runtime.build import BuildConfig

log = logging.getLogger(__name__)

CALIB_CACHE_VERSION = 8  # 2: FP weights as FP16 (edge-sr); 3: ROTATION_MARGIN 0.5; 4: smoothing;
# 5: kept weights as 4-bit grids at <= 4 bits (edge-sr); 6: weight training at <= 3 bits
# (edge-sr); 7: kept weights as 8-bit grids at <= 4 bits (edge-sr); 8: kept weights INT4 or
# INT8 per layer by held-out measurement (edge-sr, --fp-weights auto)


def cache_root(cfg: BuildConfig | None = None) -> Path:
    """Where build keeps calibration files: ``cfg.cache_dir``, else the user cache."""
    if cfg is not None and cfg.cache_dir is not None:
        return Path(cfg.cache_dir)
    return Path(cache_dir()) / "calibrations"


def calibration_key(model_sha256: str, cfg: BuildConfig) -> str:
    """Hash of every input that determines a calibration (not the tile, backend or output)."""
    blob = json.dumps({"v": CALIB_CACHE_VERSION, "model": model_sha256, "scale": cfg.scale,
                       "bits": cfg.bits, "budget": cfg.budget, "method": cfg.method,
                       "seed": cfg.seed, "iterations": cfg.calib_iterations}
                      | ({"wide_inputs": list(cfg.wide_inputs)} if cfg.wide_inputs else {})
                      | {k: v for k, v in (("rotate", cfg.rotate and list(cfg.rotate)),
                                           ("weight_grid", cfg.weight_grid),
                                           ("fp_weights", cfg.fp_weights),
                                           ("fp_sites", list(cfg.resolved_fp_sites()) or None),
                                           ("grid", None if cfg.resolved_grid() == "real"
                                            else cfg.resolved_grid()),
                                           ("shared_qkv", cfg.shared_qkv_input or None),
                                           ("quant_conv", cfg.quant_conv or None),
                                           ("avg_bits", cfg.avg_bits),
                                           ("rounding", cfg.rounding),
                                           ("weight_lr", cfg.weight_lr),
                                           ("qdrop", cfg.qdrop),
                                           ("smooth", cfg.smooth)) if v is not None},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def run_calibration(lm, cfg: BuildConfig, output: Path) -> Path:
    """Call the calibration API (``calibrate.api``) and return the calibration file it wrote.

    An earlier build of the same calibration that was interrupted left its progress beside
    ``output`` (the per-site choices, DOBI's bounds, DQC's last save): it is continued, as
    ``edge-sr calibrate --resume`` would. State that no longer fits (another edge-sr version) is
    dropped with a warning, and the calibration starts over."""
    cc = cfg.calibration_config(model=str(lm.path), output=output)
    state = dqc_state_path(output)
    if resumable_state(state):
        log.info("calibration: continuing the interrupted build's calibration (%s)", state.name)
        try:
            return Path(calibrate(replace(cc, resume=True), lm=lm))
        except EdgeSRError as e:
            log.warning("calibration: the interrupted build's state cannot be continued (%s); "
                        "starting over", e)
            clear_dqc_state(state)
    return Path(calibrate(cc, lm=lm))  # the checkpoint is loaded and hashed once


def cached_calibration(lm, cfg: BuildConfig) -> tuple[Path, dict]:
    key = calibration_key(lm.sha256, cfg)
    path = cache_root(cfg) / f"{lm.arch}-x{cfg.scale}-w{cfg.bits}-{cfg.budget}-{key}.pt"
    cached = path.is_file()
    if cached:
        log.info("calibration: reusing cached %s", path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the calibration file is written atomically (calibrate.calibfile.save_calibration), so
        # the cache never holds a partial one, and the log names the file the build will use
        run_calibration(lm, cfg, path)
    return path, {"key": key, "sha256": sha256_file(path), "cached": cached, "file": path.name}


def check_given_calibration(cfg: BuildConfig):
    """The metadata of ``build --calibration F``, checked against the build's bits and scale
    (``load_student`` checks the checkpoint); EdgeSRError for a missing, foreign or other file."""
    path = Path(cfg.calibration)
    meta = read_calibration(path)[1]
    for what, stored, asked in (("--bits", meta.bits, cfg.bits), ("--scale", meta.scale,
                                                                  cfg.scale)):
        if stored != asked:
            raise EdgeSRError(f"--calibration {path}: calibrated at {what} {stored}, but the "
                              f"build asks for {what} {asked}")
    return meta


def given_calibration(lm, cfg: BuildConfig) -> tuple[Path, dict]:
    """``build --calibration F``: the file ``edge-sr calibrate`` wrote, instead of the cache."""
    path = Path(cfg.calibration)
    meta = check_given_calibration(cfg)
    log.info("calibration: using the given %s (%s, W%dA%d)", path, meta.method, meta.bits,
             meta.bits)
    return path, {"file": str(path.resolve()), "sha256": sha256_file(path), "cached": False,
                  "given": True, "method": meta.method}


def load_student(calib_path: Path, lm):
    cal = load_calibrated(calib_path, model=lm.model)
    return getattr(cal, "model", cal).eval()
