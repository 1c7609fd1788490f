"""Run an SR graph on an image of any size: overlapping tiles, feathered blending.

The maths (where tiles start, how they are weighted, how small images are padded) are pure
functions with their own tests; ``run_tiled`` glues them to a ``Backend``. Neighbouring tiles
overlap by at least ``overlap`` LR pixels; inside an overlap each tile's weight ramps linearly
from ~0 at its edge to 1, so the seams vanish and the tile borders (which lack context) count
least. Images smaller than a tile are padded bottom/right with mirrored copies, as the official
SwinIR test script pads to a window multiple, and the output is cropped back.

A dynamic-shape backend (``tile`` None, ``edge-sr build --dynamic``) gets no tiles: the whole
image is padded the same way, only up to the model's multiple (``dynamic_shape``), run in one
call and cropped back, with no overlap and no blending. One call holds the whole image's
activations, so a very large image needs the memory of one big tile; a fixed-shape engine
bounds it instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from edge_sr.logutil import LOG_EVERY_S, QuietBarLog, progress_disabled

log = logging.getLogger(__name__)


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Origins of tiles of size ``tile`` covering ``[0, length)`` with neighbours sharing ≥ ``overlap``.

    The first tile starts at 0, the last ends at ``length``; the others are spread evenly, so the
    real overlap is ``overlap`` or a little more. ``length`` must be ≥ ``tile`` (pad first).
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length < tile:
        raise ValueError(f"length {length} is smaller than the tile {tile}; pad the image first")
    if length == tile:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def ramp_weights(size: int, ramp: int, left: bool, right: bool) -> np.ndarray:
    """1-D blend weights of one tile: linear ramps of ``ramp`` samples on the sides that overlap.

    Values are (i + 0.5) / ramp, never 0, so every output pixel has a positive total weight.
    """
    w = np.ones(size, dtype=np.float32)
    ramp = min(ramp, size)
    if ramp > 0:
        r = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp
        if left:
            w[:ramp] = np.minimum(w[:ramp], r)
        if right:
            w[size - ramp:] = np.minimum(w[size - ramp:], r[::-1])
    return w


def pad_to_min(x: np.ndarray, min_h: int, min_w: int) -> np.ndarray:
    """Pad an (..., H, W) array bottom/right with mirrored copies up to at least (min_h, min_w)."""
    h, w = x.shape[-2:]
    ph, pw = max(0, min_h - h), max(0, min_w - w)
    if not (ph or pw):
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(x, pad, mode="symmetric")


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one (padded) LR image go."""

    height: int  # padded LR height
    width: int
    tile: tuple[int, int]
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def make(cls, height: int, width: int, tile: tuple[int, int], overlap: int) -> TilePlan:
        th, tw = tile
        overlap = min(overlap, th - 1, tw - 1)
        return cls(height, width, (th, tw), overlap, tuple(axis_starts(height, th, overlap)),
                   tuple(axis_starts(width, tw, overlap)))

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def boxes(self) -> Iterator[tuple[int, int]]:
        """(y, x) origin of every tile, row by row."""
        for y in self.ys:
            for x in self.xs:
                yield y, x

    def weight(self, y: int, x: int, scale: int) -> np.ndarray:
        """(th*s, tw*s) blend weight of the tile at (y, x): ramps only towards its neighbours."""
        th, tw = self.tile
        ramp = self.overlap * scale
        wy = ramp_weights(th * scale, ramp, y > 0, y + th < self.height)
        wx = ramp_weights(tw * scale, ramp, x > 0, x + tw < self.width)
        return wy[:, None] * wx[None, :]


def dynamic_shape(height: int, width: int, multiple: int = 1,
                  minimum: int = 1) -> tuple[int, int]:
    """The padded size a dynamic-shape graph runs an ``height`` x ``width`` image at: each side
    raised to ``minimum`` and then to a multiple of ``multiple`` (``SizeRequirements.fit``)."""
    def up(n: int) -> int:
        n = max(n, minimum)
        return n + (-n) % multiple
    return up(height), up(width)


def run_whole(backend, x: np.ndarray) -> np.ndarray:
    """One call of a dynamic-shape ``backend`` on a (3, H, W) image, padded to its multiple and
    cropped back: float32 (1, 3, H*s, W*s)."""
    h, w = x.shape[1:]
    ph, pw = dynamic_shape(h, w, getattr(backend, "pad_multiple", 1),
                           getattr(backend, "min_side", 1))
    sr = backend.run(np.ascontiguousarray(pad_to_min(x, ph, pw)[None]))
    s = backend.scale
    return np.ascontiguousarray(sr[:, :, : h * s, : w * s], dtype=np.float32)


def default_overlap(tile: tuple[int, int]) -> int:
    """A quarter of the smaller tile side: 16 LR pixels for 64x64 tiles."""
    return max(0, min(tile) // 4)


def run_tiled(backend, lr: np.ndarray, overlap: int | None = None,
              progress: bool = False) -> np.ndarray:
    """Super-resolve one float32 (3, H, W) or (1, 3, H, W) image in [0, 1] through ``backend``.

    ``backend`` is any ``runtime.backends.base.Backend`` (``tile``, ``scale``, ``max_batch``);
    one whose ``tile`` is None (dynamic shape) runs the whole image in one call (``run_whole``)
    and ``overlap`` is unused. Returns float32 (1, 3, H*s, W*s), not clamped.
    """
    x = np.asarray(lr, dtype=np.float32)
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"expected one image (1, 3, H, W), got {tuple(x.shape)}")
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) or (1, 3, H, W) image, got {tuple(lr.shape)}")
    if backend.tile is None:
        return run_whole(backend, x)
    h, w = x.shape[1:]
    th, tw = backend.tile
    s = backend.scale
    x = pad_to_min(x, th, tw)
    plan = TilePlan.make(x.shape[1], x.shape[2], (th, tw),
                         default_overlap((th, tw)) if overlap is None else overlap)
    out = np.zeros((3, plan.height * s, plan.width * s), dtype=np.float32)
    acc = np.zeros((1, plan.height * s, plan.width * s), dtype=np.float32)
    boxes = list(plan.boxes())
    bar = tqdm(total=len(boxes), desc="tiles", unit="tile", leave=False,
               disable=not progress or progress_disabled())
    # without a bar (a redirected log), a line every LOG_EVERY_S seconds says the work goes on
    quiet = QuietBarLog(bar, every_s=LOG_EVERY_S)
    for i in range(0, len(boxes), backend.max_batch):
        if progress and quiet.due():
            log.info("tiles: %d of %d done in %.0f s", i, len(boxes), quiet.elapsed())
        chunk = boxes[i:i + backend.max_batch]
        batch = np.stack([x[:, y:y + th, xx:xx + tw] for y, xx in chunk])
        sr = backend.run(np.ascontiguousarray(batch))
        for (y, xx), t in zip(chunk, sr):
            wgt = plan.weight(y, xx, s)
            out[:, y * s:(y + th) * s, xx * s:(xx + tw) * s] += t * wgt
            acc[:, y * s:(y + th) * s, xx * s:(xx + tw) * s] += wgt
        bar.update(len(chunk))
    bar.close()
    out /= acc
    return out[None, :, : h * s, : w * s]
