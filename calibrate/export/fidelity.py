"""Export fidelity: the QDQ graph in ONNX Runtime against the PyTorch fake-quant model, per image.

Both run on the same fixed-size LR tiles (the graph has a fixed shape): the LR is padded with a
flipped copy to a multiple of the tile, cut into tiles, each tile goes through both models, and the
outputs are stitched and cropped. Then the evaluation protocol (uint8, Y channel, crop = scale)
scores both against the HR. Tiling seams affect both identically, so the difference measures the
export alone; the absolute PSNRs are tile-based and a little below whole-image figures.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from edge_sr.logutil import progress_disabled
from edge_sr.metrics import psnr_y

log = logging.getLogger(__name__)


@dataclass
class ImageFidelity:
    name: str
    psnr_torch: float
    psnr_ort: float
    max_abs_u8: int  # max |ORT - torch| over pixels, in grey levels of the uint8 outputs
    frac_diff_u8: float  # fraction of output values that differ at all after rounding

    @property
    def delta(self) -> float:
        return self.psnr_ort - self.psnr_torch


def run_nonoverlapping(run, lr: torch.Tensor, tile: tuple[int, int], scale: int) -> torch.Tensor:
    """Run ``run(tile_tensor) -> tensor`` over non-overlapping tiles of ``lr`` (1, 3, H, W).

    The LR is padded bottom/right with mirror copies (numpy "symmetric", i.e. the flipped-copy
    padding of the SwinIR test script, repeated when a pad exceeds the image).
    """
    th, tw = tile
    h, w = lr.shape[-2:]
    x = torch.from_numpy(np.pad(lr.numpy(), ((0, 0), (0, 0), (0, (-h) % th), (0, (-w) % tw)),
                                mode="symmetric"))
    out = torch.zeros(1, 3, x.shape[-2] * scale, x.shape[-1] * scale)
    for i in range(0, x.shape[-2], th):
        for j in range(0, x.shape[-1], tw):
            y = run(x[:, :, i:i + th, j:j + tw].contiguous())
            out[:, :, i * scale:(i + th) * scale, j * scale:(j + tw) * scale] = y
    return out[:, :, : h * scale, : w * scale]


def _u8(t: torch.Tensor) -> np.ndarray:
    from edge_sr.data.images import to_uint8

    return to_uint8(t)


def image_fidelity(student, session, pair, tile: tuple[int, int], scale: int) -> ImageFidelity:
    lr = torch.from_numpy(np.ascontiguousarray(pair.lr.transpose(2, 0, 1))).float()[None] / 255
    with torch.no_grad():
        ref = run_nonoverlapping(student, lr, tile, scale)
    ort_out = run_nonoverlapping(
        lambda t: torch.from_numpy(session.run(None, {"lr": t.numpy()})[0]), lr, tile, scale)
    a, b = _u8(ref), _u8(ort_out)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return ImageFidelity(pair.name, psnr_y(a, pair.hr, scale), psnr_y(b, pair.hr, scale),
                         int(diff.max()), float((diff > 0).mean()))


def dataset_fidelity(student, session, pairs, tile: tuple[int, int], scale: int,
                     label: str = "") -> dict:
    """Mean PSNRs over a set, the mean and worst |ΔPSNR|, the worst pixel difference."""
    t0 = time.perf_counter()
    rows = [image_fidelity(student, session, p, tile, scale)
            for p in tqdm(pairs, desc=label or "fidelity", disable=progress_disabled(),
                          leave=False)]
    mean = lambda v: math.fsum(v) / len(v)  # noqa: E731
    return {
        "images": len(rows),
        "psnr_torch": mean([r.psnr_torch for r in rows]),
        "psnr_ort": mean([r.psnr_ort for r in rows]),
        "delta_psnr": mean([r.psnr_ort for r in rows]) - mean([r.psnr_torch for r in rows]),
        "max_abs_delta_psnr_image": max(abs(r.delta) for r in rows),
        "max_abs_u8": max(r.max_abs_u8 for r in rows),
        "frac_diff_u8": mean([r.frac_diff_u8 for r in rows]),
        "seconds": time.perf_counter() - t0,
        "per_image": [r.__dict__ | {"delta": r.delta} for r in rows],
    }
