"""The training/calibration image pool (``data/train/BSD200``): a fixed split and a patch sampler.

The split is deterministic: file names sorted, permuted by a seeded generator, the first
``n_val`` held out for validation (choices are made there, never on the test sets), the rest used
for DOBI/DQC calibration patches. ``PatchSampler`` draws aligned LR/HR patches from whole-image
pairs whose LR is the MATLAB bicubic of the mod-cropped HR, i.e. exactly how the benchmark LR is
made; each image's LR is computed once per process and cached.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sr.data.datasets import SRPair
from edge_sr.data.images import list_images, load_image, mod_crop
from edge_sr.data.matlab_resize import bicubic_downscale
from edge_sr.errors import EdgeSRError

DEFAULT_VAL = 20
DEFAULT_SEED = 0


@dataclass(frozen=True)
class PoolSplit:
    """Calibration and held-out validation image paths (disjoint, both sorted by name)."""

    calib: tuple[Path, ...]
    val: tuple[Path, ...]


def pool_split(root: str | os.PathLike | None = None, n_val: int = DEFAULT_VAL,
               seed: int = DEFAULT_SEED) -> PoolSplit:
    """Split the pool: sorted names, a ``seed``-ed permutation, the first ``n_val`` held out."""
    if root is None:
        from edge_sr.paths import train_dir

        root = train_dir()
    files = list_images(root)
    if not 0 <= n_val < len(files):
        raise EdgeSRError(f"pool {root}: expected more than {n_val} images to hold out {n_val}, "
                          f"found {len(files)}")
    perm = np.random.default_rng(seed).permutation(len(files))
    val = sorted(files[i] for i in perm[:n_val])
    calib = sorted(files[i] for i in perm[n_val:])
    return PoolSplit(tuple(calib), tuple(val))


_CACHE: dict[tuple[str, float, int], SRPair] = {}
_CACHE_LOCK = threading.Lock()


def load_pair(path: str | os.PathLike, scale: int) -> SRPair:
    """(name, LR, HR) of one pool image at ``scale``; the LR is cached per (file, mtime, scale)."""
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime if path.exists() else 0.0, scale)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    hr = mod_crop(load_image(path), scale)
    pair = SRPair(path.stem, bicubic_downscale(hr, scale), hr)
    for a in (pair.lr, pair.hr):
        a.setflags(write=False)
    with _CACHE_LOCK:
        _CACHE[key] = pair
    return pair


def pool_pairs(paths, scale: int) -> list[SRPair]:
    """Whole-image (name, LR, HR) pairs, e.g. of ``pool_split().val`` for validation."""
    return [load_pair(p, scale) for p in paths]


class PatchSampler:
    """Random aligned LR/HR patches from pool images, as float32 NCHW tensors in [0, 1].

    ``sample(n)`` returns ``(lr, hr)`` of shapes ``(n, 3, p, p)`` and ``(n, 3, p*s, p*s)`` with
    ``p = lr_patch``. Each patch picks an image and an LR-grid position uniformly, then (if enabled)
    a random horizontal/vertical flip and a random transpose (with flips: all 8 dihedral
    transforms), applied identically to LR and HR. The same ``seed`` gives the same patches.
    """

    def __init__(self, lr_patch: int, scale: int, flips: bool = True, rot: bool = True,
                 seed: int = 0, images=None) -> None:
        if lr_patch < 1:
            raise EdgeSRError(f"lr_patch: expected a positive patch size, got {lr_patch}")
        self.lr_patch, self.scale, self.flips, self.rot = lr_patch, scale, flips, rot
        self.paths = tuple(images) if images is not None else pool_split().calib
        if not self.paths:
            raise EdgeSRError("PatchSampler: expected at least one image, got none")
        self.rng = np.random.default_rng(seed)
        self._pairs: list[SRPair] | None = None

    @property
    def pairs(self) -> list[SRPair]:
        if self._pairs is None:
            self._pairs = pool_pairs(self.paths, self.scale)
            small = [p.name for p in self._pairs if min(p.lr.shape[:2]) < self.lr_patch]
            if small:
                raise EdgeSRError(f"PatchSampler: images {', '.join(small)} have an LR smaller "
                                  f"than the patch size {self.lr_patch}")
        return self._pairs

    def sample_arrays(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, p, p, 3) LR and (n, p*s, p*s, 3) HR uint8 arrays."""
        p, s, pairs = self.lr_patch, self.scale, self.pairs
        lrs = np.empty((n, p, p, 3), np.uint8)
        hrs = np.empty((n, p * s, p * s, 3), np.uint8)
        for i in range(n):
            pair = pairs[int(self.rng.integers(len(pairs)))]
            h, w = pair.lr.shape[:2]
            y, x = int(self.rng.integers(h - p + 1)), int(self.rng.integers(w - p + 1))
            lr = pair.lr[y: y + p, x: x + p]
            hr = pair.hr[y * s: (y + p) * s, x * s: (x + p) * s]
            if self.flips:
                if self.rng.random() < 0.5:
                    lr, hr = lr[:, ::-1], hr[:, ::-1]
                if self.rng.random() < 0.5:
                    lr, hr = lr[::-1], hr[::-1]
            if self.rot and self.rng.random() < 0.5:
                lr, hr = lr.transpose(1, 0, 2), hr.transpose(1, 0, 2)
            lrs[i], hrs[i] = lr, hr
        return lrs, hrs

    def sample(self, n: int):
        """(n, 3, p, p) LR and (n, 3, p*s, p*s) HR float32 tensors in [0, 1]."""
        import torch

        lrs, hrs = self.sample_arrays(n)

        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float() / 255.0

        return t(lrs), t(hrs)

    __call__ = sample
