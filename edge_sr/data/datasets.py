"""Benchmark sets as (name, LR, HR) triples, laid out as ``<set>/HR`` and ``<set>/LR_bicubic/X{s}``.

The HR is cropped at the top-left to a multiple of the scale. The LR is the shipped
``LR_bicubic/X{s}/<name>x{s}.png`` when that folder exists (Set5, Set14), else it is made from the
cropped HR by the MATLAB-compatible bicubic (B100, Urban100 ship HR only), which reproduces the
shipped LR images bit for bit. ``BSD200-val`` names the held-out validation images of the training
pool, for choices that must not be made on the test sets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edge_sr.data.images import list_images, load_image, mod_crop
from edge_sr.data.matlab_resize import bicubic_downscale
from edge_sr.errors import EdgeSRError

log = logging.getLogger(__name__)

BENCHMARKS = ("Set5", "Set14", "B100", "Urban100")
ALIASES = {"bsd100": "B100", "bsds100": "B100"}
POOL_VAL = "BSD200-val"


class SRPair(NamedTuple):
    """One test image: its name (file stem), the LR input and the HR target, uint8 HxWx3."""

    name: str
    lr: np.ndarray
    hr: np.ndarray


def center_crop(pair: SRPair, size: int, scale: int) -> SRPair:
    """The central ``size`` x ``size`` LR window of a pair (smaller where the image is) and the
    HR window it maps to (``scale`` times larger)."""
    h, w = pair.lr.shape[:2]
    ch, cw = min(size, h), min(size, w)
    y, x = (h - ch) // 2, (w - cw) // 2
    return SRPair(pair.name, pair.lr[y:y + ch, x:x + cw],
                  pair.hr[y * scale:(y + ch) * scale, x * scale:(x + cw) * scale])


def resolve_dataset(name: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A set's folder: a path holding ``HR/``, or a name under ``<data>/benchmark`` (any case)."""
    p = Path(name)
    if p.is_dir() and (p / "HR").is_dir():
        return p
    if root is None:
        from edge_sr.paths import data_root

        data = data_root(required=False)
        if data is None:
            raise EdgeSRError(f"--datasets {name}: expected a folder holding HR/ or a benchmark "
                              "name, found no such folder and no data folder (set EDGE_SR_DATA)")
        root = data / "benchmark"
    root = Path(root)
    wanted = ALIASES.get(str(name).lower(), str(name))
    if (root / wanted / "HR").is_dir():
        return root / wanted
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.name.lower() == wanted.lower() and (child / "HR").is_dir():
                return child
    known = sorted(c.name for c in root.iterdir() if (c / "HR").is_dir()) if root.is_dir() else []
    raise EdgeSRError(
        f"--datasets {name}: expected a benchmark folder with an HR/ sub-folder under {root} "
        f"(found: {', '.join(known) or 'none'}), {POOL_VAL} (held-out BSD200 images), or a path "
        "to one, found no such folder"
    )


def lr_path(set_dir: Path, name: str, scale: int) -> Path:
    return set_dir / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png"


def load_benchmark(name: str | os.PathLike, scale: int,
                   root: str | os.PathLike | None = None) -> list[SRPair]:
    """Load a benchmark set (or ``BSD200-val``) at ``scale`` as a list of ``SRPair``, sorted by name.

    Raises ``EdgeSRError`` for a missing folder, a non-image file, an unreadable image, a missing
    shipped LR file or an LR whose size is not the cropped HR's divided by ``scale``.
    """
    if str(name) == POOL_VAL:
        from edge_sr.data.pool import pool_pairs, pool_split

        return pool_pairs(pool_split().val, scale)
    set_dir = resolve_dataset(name, root)
    hr_files = list_images(set_dir / "HR")
    lr_dir = set_dir / "LR_bicubic" / f"X{scale}"
    shipped = lr_dir.is_dir()
    if not shipped:
        log.info("%s: no %s; making LR x%d with the MATLAB bicubic", set_dir.name,
                 lr_dir.relative_to(set_dir), scale)
    pairs = []
    for f in hr_files:
        hr = mod_crop(load_image(f), scale)
        if shipped:
            lp = lr_path(set_dir, f.stem, scale)
            if not lp.is_file():
                raise EdgeSRError(f"{set_dir.name}: expected the LR image {lp} for HR {f.name}, "
                                  "found none")
            lr = load_image(lp)
            if (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2]:
                raise EdgeSRError(
                    f"{lp}: expected {hr.shape[1] // scale}x{hr.shape[0] // scale} pixels "
                    f"(HR {f.name} cropped to x{scale}, divided by {scale}), found "
                    f"{lr.shape[1]}x{lr.shape[0]}"
                )
        else:
            lr = bicubic_downscale(hr, scale)
        pairs.append(SRPair(f.stem, lr, hr))
    return pairs


def dataset_label(name: str | os.PathLike) -> str:
    """The key a set gets in results: its folder name for paths, the canonical name otherwise."""
    p = Path(name)
    if str(name) == POOL_VAL:
        return POOL_VAL
    if p.is_dir() and (p / "HR").is_dir():
        return p.name
    return ALIASES.get(str(name).lower(), next(
        (b for b in BENCHMARKS if b.lower() == str(name).lower()), str(name)))
