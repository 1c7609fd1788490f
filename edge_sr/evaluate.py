"""Score a predictor on benchmark sets with the literature's protocol (spec §5, data/README.md).

Per image: the whole LR goes through the predictor (batch 1, no tiling), the output is clamped to
[0, 1] and rounded to uint8, and Y-PSNR / Y-SSIM are taken against the mod-cropped HR with
``crop = scale`` border pixels removed. Set scores are means over images.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from tqdm import tqdm

from edge_sr.data.datasets import SRPair, dataset_label, load_benchmark
from edge_sr.data.images import save_image, to_tensor, to_uint8
from edge_sr.errors import EdgeSRError
from edge_sr.logutil import progress_disabled
from edge_sr.metrics import SSIM_WINDOW, psnr_y, ssim_y


@runtime_checkable
class Predictor(Protocol):
    """What evaluation runs: ``predictor(x)`` maps (1, 3, h, w) float32 in [0, 1] to
    (1, 3, h*scale, w*scale). A torch model, a fake-quant student and an engine are all scored by
    the same code (``runtime.predictors`` builds them)."""

    scale: int
    name: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What to score: set names (or folders), scale (default: the predictor's), options.

    ``save_images``: folder for the SR outputs (``<dir>/<set>/<name>.png``).
    ``crop``: border pixels removed before the metrics (default: the scale).
    ``limit``: score only the first N images of each set (smoke runs; not for reporting).
    """

    datasets: list[str]
    scale: int | None = None
    save_images: str | Path | None = None
    crop: int | None = None
    limit: int | None = None
    ssim: bool = True
    progress: bool = True


@dataclass
class ImageResult:
    name: str
    psnr: float
    ssim: float | None
    seconds: float  # predictor time only
    lr_pixels: int
    ssim_skipped: str | None = None  # why SSIM was not computed for this image (too small)


@dataclass
class DatasetResult:
    name: str
    images: list[ImageResult] = field(default_factory=list)

    @property
    def psnr(self) -> float:
        return math.fsum(r.psnr for r in self.images) / len(self.images)

    @property
    def ssim(self) -> float | None:
        """Mean SSIM over the images that have one (too-small images are skipped); None when
        SSIM was not computed for some image for another reason (``ssim=False``) or for none."""
        vals = [r.ssim for r in self.images if r.ssim_skipped is None]
        if not vals or any(v is None for v in vals):
            return None
        return math.fsum(vals) / len(vals)

    @property
    def ssim_skipped(self) -> list[str]:
        """Names of the images whose SSIM was skipped (too small for the window)."""
        return [r.name for r in self.images if r.ssim_skipped is not None]

    @property
    def seconds(self) -> float:
        return math.fsum(r.seconds for r in self.images)

    @property
    def lr_megapixels(self) -> float:
        return sum(r.lr_pixels for r in self.images) / 1e6


@dataclass
class EvalResult:
    model: str
    scale: int
    datasets: dict[str, DatasetResult]

    def to_json(self) -> dict:
        """``{"model", "scale", "datasets": {set: {"psnr", "ssim", "images"}}}``."""
        sets = {}
        for k, d in self.datasets.items():
            sets[k] = {"psnr": round(d.psnr, 6),
                       "ssim": None if d.ssim is None else round(d.ssim, 6),
                       "images": len(d.images)}
            if d.ssim_skipped:
                sets[k]["ssim_skipped"] = d.ssim_skipped
        return {"model": self.model, "scale": self.scale, "datasets": sets}

    def per_image(self) -> list[dict]:
        """One row per image, for debugging and plots."""
        return [{"dataset": k, "image": r.name, "psnr": r.psnr, "ssim": r.ssim,
                 "seconds": r.seconds}
                for k, d in self.datasets.items() for r in d.images]

    def table(self) -> str:
        """A plain-text table: set, images, PSNR, SSIM."""
        w = max([12] + [len(k) for k in self.datasets])
        rows = [f"{'set':<{w}} {'images':>6} {'PSNR (dB)':>10} {'SSIM':>7}"]
        for k, d in self.datasets.items():
            ssim = "-" if d.ssim is None else f"{d.ssim:.4f}"
            rows.append(f"{k:<{w}} {len(d.images):>6} {d.psnr:>10.4f} {ssim:>7}")
        for k, d in self.datasets.items():
            if d.ssim_skipped:
                n = len(d.ssim_skipped)
                rows.append(f"{k}: SSIM over {len(d.images) - n} of {len(d.images)} images; "
                            f"skipped (smaller than {SSIM_WINDOW}x{SSIM_WINDOW} after the crop): "
                            + ", ".join(d.ssim_skipped))
        return f"{self.model} x{self.scale}\n" + "\n".join(rows)


def score_pair(predictor: Predictor, pair: SRPair, scale: int, label: str = "images",
               crop: int | None = None, ssim: bool = True,
               save_dir: str | Path | None = None) -> ImageResult:
    """Score one (name, LR, HR) pair: the unit that resumable benches run and store one by one."""
    crop = scale if crop is None else crop
    h, w = pair.hr.shape[:2]
    left = (h - 2 * crop, w - 2 * crop)
    if min(left) < 1 or min(pair.lr.shape[:2]) < 1:  # before the model sees a 0-pixel LR image
        raise EdgeSRError(f"{label}/{pair.name}: the HR image is {w}x{h}, nothing is left to score "
                          f"after removing the {crop}-pixel border (crop = scale); use images of "
                          f"at least {2 * crop + 1}x{2 * crop + 1} pixels")
    x = to_tensor(pair.lr)
    t0 = time.perf_counter()
    y = predictor(x)
    dt = time.perf_counter() - t0
    expect = (1, 3, x.shape[2] * scale, x.shape[3] * scale)
    if tuple(y.shape) != expect:
        raise EdgeSRError(f"{getattr(predictor, 'name', 'predictor')}: expected an output of "
                          f"shape {expect} for {label}/{pair.name}, got {tuple(y.shape)}")
    sr = to_uint8(y)
    del y
    if save_dir is not None:
        save_image(Path(save_dir) / f"{pair.name}.png", sr)
    p = psnr_y(sr, pair.hr, crop)
    s, skipped = None, None
    if ssim and min(left) < SSIM_WINDOW:
        skipped = (f"{left[1]}x{left[0]} after the crop, smaller than SSIM's "
                   f"{SSIM_WINDOW}x{SSIM_WINDOW} window")
        log.warning("%s/%s: SSIM skipped (%s); PSNR scored", label, pair.name, skipped)
    elif ssim:
        s = ssim_y(sr, pair.hr, crop)
    log.debug("%s/%s: %.4f dB, %.2f s", label, pair.name, p, dt)
    return ImageResult(pair.name, p, s, dt, pair.lr.shape[0] * pair.lr.shape[1], skipped)


def evaluate_pairs(predictor: Predictor, pairs: list[SRPair], scale: int, label: str = "images",
                   crop: int | None = None, ssim: bool = True,
                   save_dir: str | Path | None = None, progress: bool = True) -> DatasetResult:
    """Score ``predictor`` on (name, LR, HR) pairs; the lower-level API under ``evaluate``."""
    out = DatasetResult(label)
    bar = tqdm(pairs, desc=f"{label} x{scale}", unit="img", leave=False,
               disable=not progress or progress_disabled())
    for pair in bar:
        out.images.append(score_pair(predictor, pair, scale, label, crop, ssim, save_dir))
        bar.set_postfix(psnr=f"{out.psnr:.3f}")
    bar.close()
    if not out.images:
        raise EdgeSRError(f"{label}: expected at least one image to score, found none")
    return out


def evaluate(predictor: Predictor, config: EvalConfig) -> EvalResult:
    """Score ``predictor`` on every set of ``config`` and return the per-set and per-image results."""
    scale = int(predictor.scale)
    if config.scale is not None and int(config.scale) != scale:
        raise EdgeSRError(f"--scale {config.scale}: the model {predictor.name} is x{scale}")
    if not config.datasets:
        raise EdgeSRError("--datasets: expected at least one set name, got none")
    # Resolve every set first so a typo in the last name fails before hours of work.
    labels = [dataset_label(d) for d in config.datasets]
    from edge_sr.data.datasets import POOL_VAL, resolve_dataset

    for d in config.datasets:
        if str(d) != POOL_VAL:
            resolve_dataset(d)
    results: dict[str, DatasetResult] = {}
    for d, label in zip(config.datasets, labels, strict=True):
        pairs = load_benchmark(d, scale)
        if config.limit is not None:
            pairs = pairs[: config.limit]
        save_dir = Path(config.save_images) / label if config.save_images else None
        res = evaluate_pairs(predictor, pairs, scale, label=label, crop=config.crop,
                             ssim=config.ssim, save_dir=save_dir, progress=config.progress)
        log.info("%s x%d: %.4f dB over %d images", label, scale, res.psnr, len(res.images))
        results[label] = res
    return EvalResult(model=predictor.name, scale=scale, datasets=results)
