"""Build's last check: the engine scored on held-out BSD200 crops (never the test sets), against
HR and against the fake-quant model it was exported from, through the same tiles (a dynamic
engine: each crop whole, padded alike)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from edge_sr.data import pool_split
from edge_sr.data.datasets import center_crop
from edge_sr.data.images import to_tensor, to_uint8
from edge_sr.data.pool import pool_pairs
from edge_sr.logutil import progress_disabled
from edge_sr.metrics import psnr_y
from runtime.engine import Engine, Manifest
from runtime.predictors import BackendPredictor, TorchBackend

if TYPE_CHECKING:
    from runtime.build import BuildConfig

FIDELITY_CAP_DB = 100.0  # identical outputs have infinite PSNR; JSON has no infinity


def validate_engine(student, lm, cfg: BuildConfig, backend_name: str, work: Path,
                   manifest: Manifest) -> dict:
    """Score the engine on held-out BSD200 crops (never the test sets).

    ``psnr_y_db``: the engine against HR. ``fidelity_psnr_y_db``: the engine's output against
    the fake-quant model's, both through the same tiles, so it measures export + runtime error
    only. The fake-quant (tiled) and FP (whole-crop) PSNRs against HR put the drop in context.
    """
    pairs = pool_pairs(pool_split().val[: cfg.val_images], cfg.scale)
    engine_pred = BackendPredictor(Engine(work, manifest).backend(threads=cfg.threads),
                                   manifest.name, overlap=manifest.overlap)
    req = manifest.size_requirements or {}
    fq_backend = TorchBackend(student, cfg.scale, None if manifest.dynamic else cfg.tile,
                              cfg.batch, pad_multiple=req.get("multiple", 1),
                              min_side=req.get("minimum", 1))
    fq_pred = BackendPredictor(fq_backend, "fake-quant", overlap=manifest.overlap)
    rows = []
    s = cfg.scale
    for pair in tqdm(pairs, desc="validate", unit="img", leave=False,
                     disable=progress_disabled()):
        _, lr, hr = center_crop(pair, cfg.val_crop, s)
        x = to_tensor(lr)
        with torch.no_grad():
            sr_engine, sr_fq = to_uint8(engine_pred(x)), to_uint8(fq_pred(x))
            sr_fp = to_uint8(lm.model(x))
        diff = np.abs(sr_engine.astype(np.int16) - sr_fq.astype(np.int16))
        rows.append({"image": pair.name, "lr_size": list(lr.shape[:2]),
                     "psnr_engine": psnr_y(sr_engine, hr, s),
                     "psnr_fake_quant": psnr_y(sr_fq, hr, s), "psnr_fp": psnr_y(sr_fp, hr, s),
                     "fidelity_psnr": min(psnr_y(sr_engine, sr_fq, 0), FIDELITY_CAP_DB),
                     "max_abs_diff_vs_fake_quant": int(diff.max()),
                     "share_pixels_differing": float((diff > 0).mean())})
    engine_pred.close()

    def mean(k: str) -> float:
        return float(np.mean([r[k] for r in rows]))

    return {"images": "BSD200 held-out validation split (edge_sr.data.pool_split().val), "
                      f"first {len(rows)}, center {cfg.val_crop}x{cfg.val_crop} LR crops",
            "backend": backend_name,
            "psnr_y_db": mean("psnr_engine"), "psnr_y_fake_quant_db": mean("psnr_fake_quant"),
            "psnr_y_fp_db": mean("psnr_fp"), "fidelity_psnr_y_db": mean("fidelity_psnr"),
            "per_image": rows}
