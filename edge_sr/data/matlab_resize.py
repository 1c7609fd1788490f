"""MATLAB-compatible bicubic ``imresize``, the resize that made the benchmarks' LR images.

A float64 transcription of MATLAB's ``imresize.m`` (``contributions``/``cubic``) and of what its
MEX kernel does with uint8 data:

- the antialiased kernel ``h(x) = scale * cubic(scale * x)`` of width ``4 / scale`` when
  shrinking, weights normalised per output pixel, symmetric edge padding;
- the dimension with the smaller scale first, rows first on ties;
- for uint8 input, each 1-D pass returns uint8 (MATLAB's ``imresizemex`` keeps the class), so
  the intermediate is rounded half away from zero and saturated, as is the output.

The uint8 intermediate is why a float32 port (one rounding at the end) matches only ~86% of the
shipped LR pixels; see ``tests/test_data.py`` for the measured agreement.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + \
        (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((1 < ax) & (ax <= 2))


@lru_cache(maxsize=64)
def contributions(in_len: int, out_len: int, scale: float,
                  antialias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Weights (out_len, P) and 0-based source indices (out_len, P), as MATLAB computes them."""
    kernel_width = 4.0
    if scale < 1 and antialias:
        def h(x):
            return scale * _cubic(scale * x)
        kernel_width = kernel_width / scale
    else:
        h = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    p = int(math.ceil(kernel_width)) + 2
    ind = left[:, None] + np.arange(p, dtype=np.float64)[None, :]
    weights = h(u[:, None] - ind)
    weights = weights / weights.sum(axis=1, keepdims=True)
    aux = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    indices = aux[np.mod(ind.astype(np.int64) - 1, aux.size)]
    keep = np.any(weights != 0, axis=0)
    weights, indices = weights[:, keep], indices[:, keep]
    weights.setflags(write=False)
    indices.setflags(write=False)
    return weights, indices


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8: round half away from zero, saturate."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _resize_dim(img: np.ndarray, dim: int, out_len: int, scale: float,
                antialias: bool) -> np.ndarray:
    weights, indices = contributions(img.shape[dim], out_len, scale, antialias)
    src = np.moveaxis(img, dim, 0).astype(np.float64, copy=False)
    out = np.zeros((out_len,) + src.shape[1:], dtype=np.float64)
    tmp = np.empty_like(out)  # reused: no per-tap allocation (same arithmetic, same order)
    extra = (slice(None),) + (None,) * (src.ndim - 1)
    for k in range(weights.shape[1]):
        np.take(src, indices[:, k], axis=0, out=tmp)
        tmp *= weights[:, k][extra]
        out += tmp
    return np.moveaxis(out, 0, dim)


def imresize(img: np.ndarray, scale: float | None = None, output_shape: tuple[int, int] | None = None,
             antialias: bool = True, uint8_intermediate: bool | None = None) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` on an HxW or HxWxC array.

    uint8 in gives uint8 out (rounded per pass like MATLAB unless ``uint8_intermediate=False``);
    float in gives float64 out, unclipped, as MATLAB does for double images.
    """
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale and output_shape")
    h, w = img.shape[:2]
    if scale is not None:
        scales = (float(scale), float(scale))
        out = (int(math.ceil(h * scale)), int(math.ceil(w * scale)))
    else:
        out = (int(output_shape[0]), int(output_shape[1]))
        scales = (out[0] / h, out[1] / w)
    is_uint8 = img.dtype == np.uint8
    per_pass = is_uint8 if uint8_intermediate is None else (uint8_intermediate and is_uint8)
    order = sorted(range(2), key=lambda d: (scales[d], d))
    x = img
    for i, dim in enumerate(order):
        x = _resize_dim(x, dim, out[dim], scales[dim], antialias)
        if is_uint8 and (per_pass or i == len(order) - 1):
            x = _round_uint8(x)
    return x


def bicubic_downscale(hr: np.ndarray, factor: int) -> np.ndarray:
    """The benchmarks' LR: ``imresize(modcrop(hr, factor), 1/factor, 'bicubic')`` on uint8 RGB."""
    h, w = hr.shape[:2]
    hr = hr[: h - h % factor, : w - w % factor]
    return imresize(hr, 1.0 / factor)


def bicubic_upscale(lr: np.ndarray, factor: int) -> np.ndarray:
    """``imresize(lr, factor, 'bicubic')`` on uint8 RGB: the bicubic baseline of the SR tables."""
    return imresize(lr, float(factor))
