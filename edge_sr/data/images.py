"""Image IO: every image becomes uint8 RGB, HxWx3, whatever its mode on disk.

Greyscale (Set14's ``bridge.png``) is repeated to three channels, alpha is dropped, palette and
16-bit images are converted, so the rest of edge-sr sees one layout only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edge_sr.errors import EdgeSRError
from edge_sr.fileio import atomic_path

IMAGE_SUFFIXES = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"})


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of PIL's clipping conversion.
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8))
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")  # then drop alpha below
    return im.convert("RGB")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3); alpha is dropped, greyscale repeated."""
    path = Path(path)
    if not path.is_file():
        raise EdgeSRError(f"image {path}: expected an image file, found nothing there")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = _to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise EdgeSRError(f"image {path}: expected a readable image, could not decode it ({e})") from None
    arr = np.asarray(rgb, dtype=np.uint8)
    return np.ascontiguousarray(arr)


def save_image(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8 RGB (H, W, 3) array atomically; the format follows the suffix (PNG default)."""
    path = Path(path)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"save_image expects uint8 HxWx3, got {img.dtype} {img.shape}")
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format=fmt)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files of a folder; any other file is an error that names it.

    Hidden files (``.DS_Store``, editor swap files) are ignored; sub-folders too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeSRError(f"image folder {folder}: expected a folder of images, found none")
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if not is_image_name(p):
            raise EdgeSRError(
                f"image folder {folder}: expected only image files "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}), found {p.name}"
            )
        files.append(p)
    if not files:
        raise EdgeSRError(f"image folder {folder}: expected image files, found none")
    return files


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
