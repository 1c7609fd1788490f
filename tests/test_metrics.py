"""Y-PSNR / Y-SSIM under the BasicSR protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_sr.metrics import psnr_y, rgb_to_y, ssim_y
from edge_sr.paths import data_root

DATA = data_root(required=False)


def _img(seed=0, shape=(40, 48, 3)):
    return np.random.default_rng(seed).integers(20, 230, shape, dtype=np.uint8)


def test_y_is_bt601_unrounded():
    assert rgb_to_y(np.full((1, 1, 3), 255, np.uint8))[0, 0] == pytest.approx(235.0)
    assert rgb_to_y(np.zeros((1, 1, 3), np.uint8))[0, 0] == pytest.approx(16.0)
    y = rgb_to_y(np.array([[[10, 200, 30]]], np.uint8))[0, 0]
    assert y == pytest.approx(16 + (65.481 * 10 + 128.553 * 200 + 24.966 * 30) / 255)
    assert y != round(y)


def test_psnr_known_value_and_crop():
    a = _img()
    b = (a.astype(int) + 3).astype(np.uint8)  # Y moves by 3 * 219/255 everywhere
    expect = 20 * math.log10(255 / (3 * 219 / 255))
    assert psnr_y(b, a, crop=2) == pytest.approx(expect, abs=1e-9)
    assert psnr_y(a, a) == math.inf
    c = a.copy()
    c[:2] = 0  # only the border differs: crop=2 hides it
    assert psnr_y(c, a, crop=2) == math.inf and psnr_y(c, a, crop=1) < 30
    with pytest.raises(ValueError):
        psnr_y(a.astype(np.float32), a)


def _ssim_cv2(y1, y2):
    """BasicSR's ``_ssim``, verbatim in substance (cv2.filter2D, 'valid' by slicing)."""
    import cv2  # a dev dependency (pyproject [dev])

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = cv2.getGaussianKernel(11, 1.5)
    win = np.outer(k, k.transpose())
    mu1 = cv2.filter2D(y1, -1, win)[5:-5, 5:-5]
    mu2 = cv2.filter2D(y2, -1, win)[5:-5, 5:-5]
    s1 = cv2.filter2D(y1 ** 2, -1, win)[5:-5, 5:-5] - mu1 ** 2
    s2 = cv2.filter2D(y2 ** 2, -1, win)[5:-5, 5:-5] - mu2 ** 2
    s12 = cv2.filter2D(y1 * y2, -1, win)[5:-5, 5:-5] - mu1 * mu2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
    return float(m.mean())


def test_ssim_matches_basicsr_cv2():
    a = _img(1)
    b = np.clip(a.astype(int) + np.random.default_rng(2).integers(-20, 21, a.shape), 0, 255)
    b = b.astype(np.uint8)
    ref = _ssim_cv2(rgb_to_y(b)[3:-3, 3:-3], rgb_to_y(a)[3:-3, 3:-3])
    assert ssim_y(b, a, crop=3) == pytest.approx(ref, abs=1e-12)
    assert 0.3 < ref < 0.99
    assert ssim_y(a, a, crop=3) == pytest.approx(1.0)


@pytest.mark.skipif(DATA is None, reason="shared data folder not found (EDGE_SR_DATA)")
def test_ssim_bicubic_set5_x2_near_published():
    """Bicubic Set5 x2 SSIM is published as 0.9299 (MATLAB, rounded Y); BasicSR gives ~0.9303."""
    from edge_sr.data import bicubic_upscale, load_benchmark

    pairs = load_benchmark("Set5", 2)
    ssim = np.mean([ssim_y(bicubic_upscale(p.lr, 2), p.hr, 2) for p in pairs])
    assert abs(ssim - 0.9299) < 0.001
