"""Reading and writing images and video: every file edge-sr decodes or encodes goes through here.

Images
    Pillow decodes them (PNG, JPEG, BMP, TIFF, WebP), and Pillow's own ``ImageOps.exif_transpose``
    applies the EXIF orientation (all eight values), so every image comes out upright. OpenCV
    decodes only what Pillow cannot at full precision: 16-bit colour PNG/TIFF (Pillow keeps just
    the top 8 bits of each sample) and float RGB TIFF (Pillow cannot open it); the orientation of
    those is still applied by Pillow (``_orient``). A ``Picture`` keeps what the file declares:

    * bit depth: 8, 16 or 32 (float). Values are scaled by the declared depth (a 16-bit dark frame
      stays dark), never by their content. Float images must hold values in [0, 1].
    * alpha: kept as its own plane (RGBA, LA, palette transparency), never composited.
    * ICC profile: kept and written back into 8-bit outputs (PNG, JPEG, TIFF, WebP).
    * EXIF: applied (orientation), not copied to outputs. Animated or multi-page files are refused.

    Greyscale is repeated to three channels. ``load_image`` is the 8-bit RGB view used by
    evaluation and calibration (alpha dropped, 16-bit and float rounded to 8 bits).

    Outputs are written atomically: 8-bit by Pillow, 16-bit (PNG, TIFF) by OpenCV, because Pillow
    has no 16-bit RGB mode.

Video
    OpenCV (FFmpeg backend) reads files, cameras, URLs and GStreamer pipelines as 8-bit BGR frames
    (audio and subtitle tracks are not read; a rotation tag is applied by OpenCV) and writes them.
    Its writer stores only even frame sizes (YUV 4:2:0) and silently drops an odd last row and
    column, so ``VideoSink`` pads odd frames to even by repeating the last column/row and reports
    it, rather than lose pixels without a word.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from edge_sr.errors import EdgeSRError, MissingDependencyError
from edge_sr.fileio import atomic_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"})
# What each output format can hold (Pillow's format names, from the file suffix).
ALPHA_FORMATS = frozenset({"PNG", "TIFF", "WEBP"})
DEEP_FORMATS = frozenset({"PNG", "TIFF"})  # 16 bits per channel
_ICC_FORMATS = frozenset({"PNG", "JPEG", "TIFF", "WEBP"})
_PEAK = {8: 255.0, 16: 65535.0, 32: 1.0}
_DTYPE = {8: np.uint8, 16: np.uint16, 32: np.float32}


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_video_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def image_format(path: str | os.PathLike) -> str:
    """Pillow's format name for a file suffix; PNG for anything unknown."""
    return Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")


def cv2_module(what: str = "video input"):
    """OpenCV, or a one-line error saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError(f"{what} needs OpenCV: pip install 'edge-sr[video]' "
                                     "(opencv-python-headless)") from None
    return cv2


# --- images -------------------------------------------------------------------------------------

@dataclass
class Picture:
    """A decoded image as its file declares it.

    ``rgb``: (H, W, 3) uint8 (8-bit files), uint16 (16-bit) or float32 in [0, 1] (float files).
    ``alpha``: (H, W) of the same dtype, or None. ``bits``: 8, 16 or 32 (float).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bits: int
    icc_profile: bytes | None = None
    mode: str = "RGB"  # the file's mode as Pillow names it (or OpenCV's dtype), for messages

    @property
    def peak(self) -> float:
        return _PEAK[self.bits]

    def rgb01(self) -> np.ndarray:
        """float32 (H, W, 3) in [0, 1]: samples divided by the declared peak."""
        return self.rgb.astype(np.float32) / np.float32(self.peak)

    def alpha01(self) -> np.ndarray | None:
        return None if self.alpha is None else self.alpha.astype(np.float32) / np.float32(self.peak)

    @property
    def grey(self) -> bool:
        """Every pixel's three channels are equal (a greyscale file, or grey stored as RGB)."""
        r = self.rgb
        return bool(np.array_equal(r[..., 0], r[..., 1]) and np.array_equal(r[..., 1], r[..., 2]))

    def to_uint8(self) -> np.ndarray:
        """uint8 RGB: 8-bit samples as they are, deeper ones rounded from [0, peak] to [0, 255]."""
        if self.bits == 8:
            return np.ascontiguousarray(self.rgb)
        return quantize(self.rgb01(), 8)


def quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """float in [0, 1] -> uint8 / uint16, clamped and rounded half up (the eval protocol's rule)."""
    if bits not in (8, 16):
        raise ValueError(f"quantize: bits must be 8 or 16, got {bits}")
    y = np.clip(np.asarray(x, dtype=np.float32), 0, 1) * np.float32(_PEAK[bits]) + np.float32(0.5)
    return np.ascontiguousarray(y.astype(_DTYPE[bits]))


def _declared_bits(im: Image.Image) -> int:
    """Bits per sample the file declares (read before ``load``, which clears ``im.tile``)."""
    if im.mode.startswith("I;16"):
        return 16
    if im.mode in ("F", "I"):
        return 32
    args = im.tile[0].args if im.tile else None
    rawmode = args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str)
                                                  else "")
    bps = getattr(im, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    if ";16" in rawmode or (isinstance(bps, tuple) and bps and max(bps) == 16):
        return 16
    return 8


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an array of any dtype with Pillow's own transposition.

    Pillow's modes cannot hold 16-bit colour, so Pillow transposes an index map instead and the
    array is gathered through it: the result is exactly what ``exif_transpose`` does to pixels.
    """
    if orientation in (None, 1):
        return arr
    h, w = arr.shape[:2]
    idx = Image.fromarray(np.arange(h * w, dtype=np.int32).reshape(h, w))
    idx.getexif()[ExifTags.Base.Orientation] = orientation
    order = np.asarray(ImageOps.exif_transpose(idx))
    return np.ascontiguousarray(arr.reshape(h * w, *arr.shape[2:])[order])


def _split(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W[, C]) RGB/RGBA/grey/grey+alpha (RGB order) -> (H, W, 3), alpha or None."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[2]
    colour = arr[:, :, :3] if c >= 3 else np.repeat(arr[:, :, :1], 3, axis=2)
    alpha = arr[:, :, 3] if c == 4 else arr[:, :, 1] if c == 2 else None
    return np.ascontiguousarray(colour), None if alpha is None else np.ascontiguousarray(alpha)


def _decode_opencv(path: Path) -> np.ndarray | None:
    """Full-depth decode with OpenCV in RGB(A) channel order, or None if it cannot either."""
    try:
        import cv2
    except ImportError:
        return None
    data = np.fromfile(path, dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if arr is None:
        return None
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) -> RGB(A)
    return arr


def _check_float(path: Path, arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise EdgeSRError(f"image {path}: a floating-point image with NaN or infinite values; "
                          "edge-sr reads float images with values in [0, 1]")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        raise EdgeSRError(f"image {path}: a floating-point image with values in [{lo:.4g}, "
                          f"{hi:.4g}]; edge-sr reads float images as [0, 1] (HDR is not "
                          "supported): tone-map or scale it to [0, 1], or save it as 8/16-bit")
    return arr


def _from_array(path: Path, arr: np.ndarray, orientation: int, icc: bytes | None,
                mode: str) -> Picture:
    """A Picture from a full-depth array decoded by OpenCV."""
    arr = _orient(arr, orientation)
    if arr.dtype == np.uint8:
        bits = 8
    elif arr.dtype == np.uint16:
        bits = 16
    elif arr.dtype.kind == "f":
        bits, arr = 32, _check_float(path, arr)
    else:
        raise EdgeSRError(f"image {path}: {arr.dtype} samples are not supported; save it as "
                          "8- or 16-bit, or as float in [0, 1]")
    rgb, alpha = _split(arr)
    return Picture(rgb, alpha, bits, icc, mode)


def _from_pillow(path: Path, im: Image.Image) -> Picture:
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        raise EdgeSRError(f"image {path}: an animated or multi-page image ({frames} frames); "
                          "edge-sr upscales still images: extract the frames (e.g. ffmpeg -i "
                          f"{path.name} frame_%04d.png) or convert it to a video")
    bits = _declared_bits(im)
    mode = im.mode
    icc = im.info.get("icc_profile") or None
    im.load()
    orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    if bits == 16 and not mode.startswith("I;16"):
        # 16-bit colour (RGB, RGBA, LA): Pillow decoded only the top 8 bits of each sample.
        arr = _decode_opencv(path)
        if arr is not None and arr.dtype == np.uint16:
            return _from_array(path, arr, orientation, icc, f"{mode};16")
        log.warning("%s: 16-bit %s read as 8 bits per channel (install opencv-python-headless "
                    "to keep 16 bits)", path, mode)
        bits = 8
    if mode == "I":
        raise EdgeSRError(f"image {path}: 32-bit integer samples are not supported; save it as "
                          "8- or 16-bit, or as float in [0, 1]")
    im = ImageOps.exif_transpose(im)
    if mode.startswith("I;16"):
        return Picture(*_split(np.asarray(im).astype(np.uint16)), 16, icc, mode)
    if mode == "F":
        return Picture(*_split(_check_float(path, np.asarray(im))), 32, icc, mode)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode == "P" and "transparency" in im.info)
    if mode == "RGB":
        arr = np.asarray(im)
    elif has_alpha:
        arr = np.asarray(im.convert("RGBA"))
    else:
        arr = np.asarray(im.convert("RGB"))  # L, 1, P, CMYK, YCbCr, LAB, HSV
    return Picture(*_split(np.asarray(arr, dtype=np.uint8)), 8, icc, mode)


def read_image(path: str | os.PathLike) -> Picture:
    """Decode an image file upright, at its declared depth, with its alpha plane and ICC profile.

    Anything that cannot be read raises ``EdgeSRError`` naming the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgeSRError(f"image {path}: expected an image file, found nothing there")
    try:
        with Image.open(path) as im:
            return _from_pillow(path, im)
    except EdgeSRError:
        raise
    except UnidentifiedImageError as e:
        # A float RGB TIFF, which Pillow cannot open; OpenCV can. (Only TIFF: for other broken
        # files OpenCV would just print its own decoder errors before ours.)
        arr = _decode_opencv(path) if path.suffix.lower() in (".tif", ".tiff") else None
        if arr is None:
            raise EdgeSRError(f"image {path}: expected a readable image, could not decode it "
                              f"({e})") from None
        return _from_array(path, arr, 1, None, str(arr.dtype))
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise EdgeSRError(f"image {path}: expected a readable image, could not decode it "
                          f"({type(e).__name__}: {e})") from None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3), upright; alpha dropped, greyscale repeated.

    16-bit and float images are scaled by their declared depth (65535, 1.0) and rounded.
    """
    return read_image(path).to_uint8()


def save_image(path: str | os.PathLike, img: np.ndarray, alpha: np.ndarray | None = None,
               icc_profile: bytes | None = None) -> None:
    """Write RGB (H, W, 3) uint8 or uint16, with an optional alpha (H, W) of the same dtype.

    Atomic; the format follows the suffix (PNG by default). uint16 needs PNG or TIFF (written by
    OpenCV: Pillow has no 16-bit RGB mode); alpha needs PNG, TIFF or WebP. The ICC profile is
    embedded in 8-bit PNG, JPEG, TIFF and WebP files.
    """
    path = Path(path)
    if img.dtype not in (np.uint8, np.uint16) or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"save_image expects uint8/uint16 HxWx3, got {img.dtype} {img.shape}")
    if alpha is not None and (alpha.shape != img.shape[:2] or alpha.dtype != img.dtype):
        raise ValueError(f"alpha must be {img.dtype} {img.shape[:2]}, got {alpha.dtype} "
                         f"{alpha.shape}")
    fmt = image_format(path)
    if alpha is not None and fmt not in ALPHA_FORMATS:
        raise ValueError(f"{fmt} cannot hold an alpha channel ({path})")
    arr = img if alpha is None else np.dstack([img, alpha])
    if img.dtype == np.uint16:
        if fmt not in DEEP_FORMATS:
            raise ValueError(f"{fmt} cannot hold 16 bits per channel ({path})")
        cv2 = cv2_module("writing a 16-bit image")
        bgr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]
        ok, buf = cv2.imencode(".png" if fmt == "PNG" else ".tif", np.ascontiguousarray(bgr))
        if not ok:
            raise EdgeSRError(f"-o {path}: OpenCV could not encode a 16-bit {fmt}")
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.tobytes())
        return
    params = {"icc_profile": icc_profile} if icc_profile and fmt in _ICC_FORMATS else {}
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format=fmt, **params)


def list_images(folder: str | os.PathLike, skip_others: bool = False) -> list[Path]:
    """Sorted image files of a folder (by suffix, ``IMAGE_SUFFIXES``); any other file is an
    error that names it, or with ``skip_others`` a warning that names what is skipped (a user's
    photo folder with a notes file in it). A folder without images is an error either way.

    Hidden files (``.DS_Store``, editor swap files) are ignored; sub-folders too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeSRError(f"image folder {folder}: expected a folder of images, found none")
    files, others = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if not is_image_name(p):
            if not skip_others:
                raise EdgeSRError(
                    f"image folder {folder}: expected only image files "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))}), found {p.name}"
                )
            others.append(p.name)
            continue
        files.append(p)
    if not files:
        raise EdgeSRError(f"image folder {folder}: expected image files "
                          f"({', '.join(sorted(IMAGE_SUFFIXES))}), found none")
    if others:
        what = "files that are not images" if len(others) > 1 else "file that is not an image"
        log.warning("image folder %s: skipping %d %s by suffix: %s (a video is an input of its "
                    "own)", folder, len(others), what,
                    ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""))
    return files


# --- video --------------------------------------------------------------------------------------

def open_video(path: str | os.PathLike):
    """An OpenCV capture of a video file; an error naming it if OpenCV cannot open it."""
    cv2 = cv2_module()
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise EdgeSRError(f"input {path}: OpenCV cannot open it as a video")
    return cap


def open_stream(source: str):
    """An OpenCV capture for a camera index, a GStreamer pipeline, a URL or a file."""
    cv2 = cv2_module()
    if source.strip().isdigit():
        cap = cv2.VideoCapture(int(source))
    elif "!" in source:
        if "GStreamer:                   YES" not in cv2.getBuildInformation():
            raise MissingDependencyError(
                f"--source {source!r}: looks like a GStreamer pipeline, but this OpenCV was built "
                "without GStreamer; use a camera index, a URL or a file, or an OpenCV build with "
                "GStreamer")
        cap = cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
    else:
        cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise EdgeSRError(f"--source {source}: OpenCV could not open it (no such camera, "
                          "unreachable stream or unreadable file)")
    return cap


def read_frame(cap) -> np.ndarray | None:
    """The next frame as uint8 RGB (H, W, 3), or None at the end."""
    ok, bgr = cap.read()
    if not ok or bgr is None:
        return None
    return np.ascontiguousarray(bgr[:, :, ::-1])


def video_fps(cap) -> float | None:
    """The capture's frame rate (e.g. 23.976 for 24000/1001), or None when it does not say."""
    fps = cap.get(cv2_module().CAP_PROP_FPS) or 0.0
    return fps if 0 < fps < 1000 else None


class VideoSink:
    """An OpenCV video writer for RGB frames of one size (width, height).

    OpenCV's FFmpeg writer stores even sizes only and would drop an odd last column/row without a
    word, so odd frames are padded to even by repeating their last column/row; ``padding`` says
    by how much (columns, rows) and ``stored_size`` gives the size in the file.
    """

    def __init__(self, path: str | os.PathLike, fourcc: str, fps: float,
                 size: tuple[int, int]) -> None:
        cv2 = cv2_module()
        w, h = size
        self.size = (w, h)
        self.padding = (w % 2, h % 2)
        self.stored_size = (w + self.padding[0], h + self.padding[1])
        self._writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps,
                                       self.stored_size)
        if not self._writer.isOpened():
            raise EdgeSRError(f"-o {path}: OpenCV cannot write a {fourcc} video there")

    def write(self, rgb: np.ndarray) -> None:
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            raise EdgeSRError(f"video frame of {rgb.shape[1]}x{rgb.shape[0]} in a stream of "
                              f"{self.size[0]}x{self.size[1]} frames; edge-sr needs one frame "
                              "size per video")
        pw, ph = self.padding
        if pw or ph:
            rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
        self._writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))

    def release(self) -> None:
        self._writer.release()
