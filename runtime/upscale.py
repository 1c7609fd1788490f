"""``edge-sr upscale``: run an engine on images, video files and camera/stream sources.

* Images (PNG, JPEG, ... or folders of them) become ``OUT/<stem>.png``; with one image input and
  an ``OUT`` ending in an image suffix, ``OUT`` is the file itself.
* Video files are read frame by frame with OpenCV (audio is ignored, not copied) and written to
  ``OUT/<stem>.mp4`` (codec ``mp4v``) at the source frame rate. A video that ends early (truncated
  or corrupt) is upscaled up to the last frame OpenCV can decode, with a warning giving how many
  frames were expected; one with no decodable frame is an error and writes nothing.
* A stream (``--source 0`` for a camera index, a GStreamer pipeline containing ``!``, a URL or a
  file) is written to ``OUT/stream.mp4`` until it ends, ``--max-frames`` is reached, or Ctrl-C;
  for a stream, Ctrl-C ends the recording and keeps the frames so far.

Every output is written to a temporary file and renamed at the end, so nothing half-written is
left. Outputs that exist already are an error before any work starts, unless ``--force``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_sr.data.images import IMAGE_SUFFIXES, is_image_name, list_images, load_image, save_image
from edge_sr.errors import EdgeSRError, MissingDependencyError
from edge_sr.fileio import atomic_path
from edge_sr.logutil import progress_disabled

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"})


@dataclass
class UpscaleConfig:
    engine: str | Path
    inputs: list[str] = field(default_factory=list)
    output: str | Path = "results/upscaled"
    source: str | None = None  # camera index, GStreamer pipeline, URL or file read as a stream
    force: bool = False
    threads: int | None = None
    scale: int | None = None  # if given, must match the engine's
    max_frames: int | None = None  # stop a stream (or video) after this many frames
    fourcc: str = "mp4v"


@dataclass(frozen=True)
class Job:
    kind: str  # "image", "video" or "stream"
    src: str
    dst: Path


@dataclass
class UpscaleReport:
    outputs: list[Path] = field(default_factory=list)
    frames: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError("video input needs OpenCV: pip install "
                                     "'edge-sr[video]' (opencv-python-headless)") from None
    return cv2


def plan_jobs(cfg: UpscaleConfig) -> list[Job]:
    """Map inputs to outputs, checking every input exists and no output is overwritten."""
    if not cfg.inputs and cfg.source is None:
        raise EdgeSRError("upscale: expected INPUT files/folders or --source, got neither")
    out = Path(cfg.output)
    srcs: list[tuple[str, Path]] = []
    for raw in cfg.inputs:
        p = Path(raw)
        if p.is_dir():
            srcs += [("image", f) for f in list_images(p)]
        elif not p.exists():
            raise EdgeSRError(f"input {p}: no such file or folder")
        elif is_image_name(p):
            srcs.append(("image", p))
        elif p.suffix.lower() in VIDEO_SUFFIXES:
            srcs.append(("video", p))
        else:
            raise EdgeSRError(f"input {p}: expected an image ({', '.join(sorted(IMAGE_SUFFIXES))})"
                              f", a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a folder")
    single_file = (len(srcs) == 1 and cfg.source is None and srcs[0][0] == "image"
                   and out.suffix.lower() in IMAGE_SUFFIXES)
    if out.exists() and not out.is_dir() and not single_file:
        raise EdgeSRError(f"-o {out}: expected a folder for the outputs, found a file")
    jobs = []
    for kind, p in srcs:
        if single_file:
            dst = out
        else:
            dst = out / (p.stem + (".png" if kind == "image" else ".mp4"))
        jobs.append(Job(kind, str(p), dst))
    if cfg.source is not None:
        dst = out if out.suffix.lower() in VIDEO_SUFFIXES else out / "stream.mp4"
        jobs.append(Job("stream", cfg.source, dst))
    seen: dict[Path, str] = {}
    for j in jobs:
        if j.dst in seen:
            raise EdgeSRError(f"-o {out}: inputs {seen[j.dst]} and {j.src} would both be written "
                              f"to {j.dst}; upscale them in separate runs")
        seen[j.dst] = j.src
        if j.dst.exists() and not cfg.force:
            raise EdgeSRError(f"-o: {j.dst} already exists; pass --force to overwrite it")
    return jobs


def _check_readable(jobs: list[Job]) -> None:
    """Fail on an unreadable input before any output is written."""
    from PIL import Image, UnidentifiedImageError

    for j in jobs:
        if j.kind == "image":
            try:
                with Image.open(j.src) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise EdgeSRError(f"input {j.src}: expected a readable image, could not decode "
                                  f"it ({e})") from None
        elif j.kind == "video":
            cap = _cv2().VideoCapture(j.src)
            ok = cap.isOpened()
            cap.release()
            if not ok:
                raise EdgeSRError(f"input {j.src}: OpenCV cannot open it as a video")


def upscale_frame(predictor, rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 RGB (H*s, W*s, 3), clamped and rounded."""
    lr = rgb.transpose(2, 0, 1).astype(np.float32) / 255.0
    sr = predictor.run_numpy(lr)[0]
    return np.ascontiguousarray((np.clip(sr, 0, 1) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0))


def open_stream(source: str):
    """An OpenCV capture for a camera index, a GStreamer pipeline, a URL or a file."""
    cv2 = _cv2()
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


def run_video(predictor, job: Job, cfg: UpscaleConfig, report: UpscaleReport) -> None:
    """Upscale a video file or stream frame by frame into an mp4 written atomically."""
    cv2 = _cv2()
    is_stream = job.kind == "stream"
    cap = open_stream(job.src) if is_stream else cv2.VideoCapture(job.src)
    if not cap.isOpened():
        raise EdgeSRError(f"input {job.src}: OpenCV cannot open it as a video")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    fps = fps if 0 < fps < 1000 else 30.0
    expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if not is_stream else 0
    limit = cfg.max_frames
    s = predictor.scale
    n, writer = 0, None
    bar = tqdm(total=(min(expected, limit) if limit else expected) or None, desc=Path(job.src).name,
               unit="frame", disable=progress_disabled())
    try:
        with atomic_path(job.dst, suffix=".tmp" + job.dst.suffix) as tmp:
            try:
                while limit is None or n < limit:
                    ok, bgr = cap.read()
                    if not ok or bgr is None:
                        break
                    sr = upscale_frame(predictor, bgr[:, :, ::-1])
                    if writer is None:
                        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*cfg.fourcc), fps,
                                                 (sr.shape[1], sr.shape[0]))
                        if not writer.isOpened():
                            raise EdgeSRError(f"-o {job.dst}: OpenCV cannot write a "
                                              f"{cfg.fourcc} video there")
                    writer.write(np.ascontiguousarray(sr[:, :, ::-1]))
                    n += 1
                    bar.update(1)
            except KeyboardInterrupt:
                if not is_stream or writer is None:
                    raise
                log.warning("interrupted: keeping the %d frames recorded from %s", n, job.src)
            if writer is not None:
                writer.release()
                writer = None
            if n == 0:
                raise EdgeSRError(f"input {job.src}: no frame could be decoded (empty or corrupt "
                                  "video); nothing was written")
    finally:
        bar.close()
        cap.release()
        if writer is not None:
            writer.release()
    if expected and n < expected and (limit is None or n < limit):
        msg = (f"{job.src}: the video ended early, after {n} of the {expected} frames its header "
               f"announces (truncated or corrupt); {job.dst} holds the {n} decoded frames")
        log.warning(msg)
        report.warnings.append(msg)
    _share(job.dst)
    log.info("%s -> %s: %d frames x%d", job.src, job.dst, n, s)
    report.frames += n
    report.outputs.append(job.dst)


def upscale(cfg: UpscaleConfig) -> UpscaleReport:
    """Upscale every input of ``cfg`` with the engine; returns what was written."""
    from runtime.predictors import engine_predictor

    jobs = plan_jobs(cfg)
    _check_readable(jobs)
    predictor = engine_predictor(cfg.engine, threads=cfg.threads, scale=cfg.scale)
    report = UpscaleReport()
    t0 = time.perf_counter()
    try:
        images = [j for j in jobs if j.kind == "image"]
        for j in tqdm(images, desc="images", unit="img", disable=progress_disabled() or
                      len(images) < 2):
            sr = upscale_frame(predictor, load_image(j.src))
            save_image(j.dst, sr)
            _share(j.dst)
            report.outputs.append(j.dst)
            report.frames += 1
            log.info("%s -> %s (%dx%d)", j.src, j.dst, sr.shape[1], sr.shape[0])
        for j in jobs:
            if j.kind != "image":
                run_video(predictor, j, cfg, report)
    finally:
        predictor.close()
    report.seconds = time.perf_counter() - t0
    return report


def _share(path: Path) -> None:
    """Give an output the usual umask permissions (``atomic_path``'s mkstemp makes it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
