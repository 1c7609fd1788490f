"""Images as arrays: every image becomes uint8 RGB, HxWx3, whatever its mode on disk.

Reading and writing live in ``edge_sr.data.media`` (the one module that decodes and encodes
files); this module re-exports its image functions and adds the tensor conversions. Greyscale
(Set14's ``bridge.png``) is repeated to three channels, alpha is dropped, palette, CMYK, 16-bit and
float images are converted (16-bit and float scaled by their declared depth), EXIF orientation is
applied, so the rest of edge-sr sees one layout only.
"""

from __future__ import annotations

import numpy as np

from edge_sr.data.media import (
    IMAGE_SUFFIXES,
    Picture,
    is_image_name,
    list_images,
    load_image,
    read_image,
    save_image,
)

__all__ = [
    "IMAGE_SUFFIXES", "Picture", "is_image_name", "list_images", "load_image", "mod_crop",
    "read_image", "save_image", "to_tensor", "to_uint8",
]


def to_tensor(img: np.ndarray):
    """uint8 HxWx3 -> float32 (1, 3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)[None]


def to_uint8(t) -> np.ndarray:
    """(1, 3, H, W) float in [0, 1] -> uint8 HxWx3, clamped and rounded (the eval protocol)."""
    arr = t.detach().float().clamp(0, 1).mul_(255.0).round_().to("cpu").numpy()
    return np.ascontiguousarray(arr[0].transpose(1, 2, 0).astype(np.uint8))


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop an HxW(xC) image at the top-left to a multiple of ``scale``."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]
