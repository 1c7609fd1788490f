"""PSNR and SSIM as the SR literature computes them (BasicSR, 2DQuant evaluation, spec §5).

Both take uint8 RGB images (the SR output already clamped and rounded), compare the BT.601 Y
channel (MATLAB's ``rgb2ycbcr``, not re-rounded to integers) after cropping ``crop`` pixels from
every border, and work in float64. SSIM is BasicSR's ``_ssim``: 11x11 Gaussian (sigma 1.5),
'valid' filtering, C1 = (0.01*255)^2, C2 = (0.03*255)^2, on Y in [0, 255].
"""

from __future__ import annotations

import math

import numpy as np

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)
SSIM_WINDOW = 11  # side of the Gaussian window: SSIM needs at least this many pixels per side


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> Y in [16, 235] as float64, unrounded (BT.601, MATLAB convention)."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    return img.astype(np.float64) / 255.0 @ _Y_WEIGHTS + 16.0


def _prepare(sr: np.ndarray, hr: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR shapes differ: {sr.shape} vs {hr.shape}")
    if sr.dtype != np.uint8 or hr.dtype != np.uint8:
        raise ValueError("metrics take uint8 images (clamp and round the SR output first)")
    y1, y2 = rgb_to_y(sr), rgb_to_y(hr)
    if crop:
        y1, y2 = y1[crop:-crop, crop:-crop], y2[crop:-crop, crop:-crop]
    return y1, y2


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop: int = 0) -> float:
    """Y-channel PSNR in dB (peak 255 on Y in [0, 255], i.e. peak 1 on [0, 1])."""
    y1, y2 = _prepare(sr, hr, crop)
    mse = float(np.mean((y1 - y2) ** 2))
    if mse == 0:
        return float("inf")
    return 10.0 * math.log10(255.0 * 255.0 / mse)


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """1-D Gaussian, the same as ``cv2.getGaussianKernel(11, 1.5)``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def _filter_valid(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with ``outer(k, k)``, keeping only the 'valid' region."""
    n = k.size
    h, w = img.shape
    rows = np.zeros((h - n + 1, w), dtype=np.float64)
    for i in range(n):
        rows += k[i] * img[i: i + h - n + 1]
    out = np.zeros((h - n + 1, w - n + 1), dtype=np.float64)
    for j in range(n):
        out += k[j] * rows[:, j: j + w - n + 1]
    return out


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop: int = 0) -> float:
    """Y-channel SSIM, BasicSR's implementation (mean of the SSIM map over the valid region)."""
    y1, y2 = _prepare(sr, hr, crop)
    if min(y1.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping, "
                         f"got {y1.shape}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = _gaussian_kernel(SSIM_WINDOW)
    mu1, mu2 = _filter_valid(y1, k), _filter_valid(y2, k)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = _filter_valid(y1 * y1, k) - mu1_sq
    s2 = _filter_valid(y2 * y2, k) - mu2_sq
    s12 = _filter_valid(y1 * y2, k) - mu12
    ssim_map = ((2 * mu12 + c1) * (2 * s12 + c2)) / ((mu1_sq + mu2_sq + c1) * (s1 + s2 + c2))
    return float(ssim_map.mean())
