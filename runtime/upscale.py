"""``edge-sr upscale``: run an engine on images, video files and camera/stream sources.

* Images (PNG, JPEG, BMP, TIFF, WebP, or folders of them) become ``OUT/<stem>.png``; with one
  image input and an ``OUT`` ending in an image suffix, ``OUT`` is the file itself. They are read
  upright (EXIF orientation applied) at their declared depth: 16-bit and float inputs give 16-bit
  outputs (``--depth 8`` for 8-bit), 8-bit inputs 8-bit ones. An alpha channel is kept: it is
  upscaled separately by the same engine (as a grey image, the usual practice) and written back
  (``--alpha drop`` drops it, with a warning). An ICC profile is carried into 8-bit outputs. All
  reading and writing is ``edge_sr.data.media``'s.
* Video files are read frame by frame with OpenCV (audio is ignored, not copied) and written to
  ``OUT/<stem>.mp4`` (codec ``mp4v``; with one video input and an ``OUT`` ending in a video
  suffix, ``OUT`` itself) at the source frame rate. An ``OUT`` with a file suffix that cannot
  hold what the run writes (several outputs, or an image name for a video) is an error. OpenCV's writer stores only even
  frame sizes, so an odd upscaled size is padded to even (last column/row repeated) with a
  warning. A video that ends early (truncated or corrupt) is upscaled up to the last frame OpenCV
  can decode, with a warning giving how many frames were expected; one with no decodable frame is
  an error and writes nothing.
* A stream (``--source 0`` for a camera index, a GStreamer pipeline containing ``!``, a URL or a
  file) is written to ``OUT/stream.mp4`` until it ends, ``--max-frames`` is reached, or Ctrl-C;
  for a stream, Ctrl-C ends the recording and keeps the frames so far.

Every output is written to a temporary file and renamed at the end, so nothing half-written is
left. Every input is decoded, and every output checked against its format, before any work
starts: an unreadable input or an impossible output is one error line and nothing is written.
Outputs that exist already are an error too, unless ``--force``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_sr.data.media import (
    ALPHA_FORMATS,
    DEEP_FORMATS,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    Picture,
    VideoSink,
    cv2_module,
    image_format,
    is_image_name,
    list_images,
    open_stream,
    open_video,
    quantize,
    read_frame,
    read_image,
    save_image,
    video_fps,
)
from edge_sr.errors import EdgeSRError
from edge_sr.fileio import atomic_path, check_writable
from edge_sr.logutil import progress_disabled

log = logging.getLogger(__name__)

ALPHA_MODES = ("keep", "drop")
DEPTHS = ("auto", "8", "16")


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
    alpha: str = "keep"  # "keep": upscale the alpha plane too; "drop": RGB only, with a warning
    depth: str = "auto"  # output bits per channel: "auto" (16 for 16-bit/float inputs), "8", "16"


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


def plan_jobs(cfg: UpscaleConfig) -> list[Job]:
    """Map inputs to outputs, checking every input exists and no output is overwritten."""
    if not cfg.inputs and cfg.source is None:
        raise EdgeSRError("upscale: expected INPUT files/folders or --source, got neither")
    out = Path(cfg.output)
    srcs: list[tuple[str, Path]] = []
    for raw in cfg.inputs:
        p = Path(raw)
        if p.is_dir():
            srcs += [("image", f) for f in list_images(p, skip_others=True)]
        elif not p.exists():
            raise EdgeSRError(f"input {p}: no such file or folder")
        elif is_image_name(p):
            srcs.append(("image", p))
        elif p.suffix.lower() in VIDEO_SUFFIXES:
            srcs.append(("video", p))
        else:
            raise EdgeSRError(f"input {p}: expected an image ({', '.join(sorted(IMAGE_SUFFIXES))})"
                              f", a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a folder")
    suffix = out.suffix.lower()
    single_file = (len(srcs) == 1 and cfg.source is None
                   and suffix in (IMAGE_SUFFIXES if srcs[0][0] == "image" else VIDEO_SUFFIXES))
    if out.exists() and not out.is_dir() and not single_file:
        raise EdgeSRError(f"-o {out}: expected a folder for the outputs, found a file")
    if (cfg.source is None and not single_file and not out.is_dir()
            and suffix in IMAGE_SUFFIXES | VIDEO_SUFFIXES):
        # a file-like name would otherwise become a folder of that name
        what = (f"{len(srcs)} outputs" if len(srcs) != 1
                else "a video" if srcs[0][0] == "video" else "an image")
        raise EdgeSRError(f"-o {out}: names a file, but this run writes {what}; give a folder, or "
                          "a file name with an image suffix for one image, a video suffix "
                          "(.mp4) for one video")
    if not single_file and not out.exists() and suffix and len(srcs) == 1:
        # one output and a name with an unknown suffix: a typo of a file name, or a folder?
        log.warning("-o %s: not an image or video file name (%s), so it is taken as a folder: "
                    "%s", out, ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES)),
                    out / (srcs[0][1].stem + (".png" if srcs[0][0] == "image" else ".mp4")))
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
        check_writable(j.dst, "-o")
        if j.dst.exists() and not cfg.force:
            raise EdgeSRError(f"-o: {j.dst} already exists; pass --force to overwrite it")
    return jobs


@dataclass(frozen=True)
class ImagePlan:
    """How one image is written: bits per channel, and whether its alpha plane is kept."""

    bits: int
    alpha: bool


def _warn(report: UpscaleReport, msg: str) -> None:
    log.warning(msg)
    report.warnings.append(msg)


def _output_depth(cfg: UpscaleConfig) -> int | None:
    if str(cfg.depth) not in DEPTHS:
        raise EdgeSRError(f"--depth: expected one of {', '.join(DEPTHS)}, got {cfg.depth!r}")
    return None if str(cfg.depth) == "auto" else int(cfg.depth)


def plan_image(job: Job, pic: Picture, cfg: UpscaleConfig, report: UpscaleReport) -> ImagePlan:
    """Output depth and alpha of one image; an output format that cannot hold them is an error
    (alpha) or a warning (depth), decided before any work."""
    if cfg.alpha not in ALPHA_MODES:
        raise EdgeSRError(f"--alpha: expected one of {', '.join(ALPHA_MODES)}, got {cfg.alpha!r}")
    fmt = image_format(job.dst)
    asked = _output_depth(cfg)
    bits = asked or (16 if pic.bits > 8 else 8)
    if bits == 16 and fmt not in DEEP_FORMATS:
        if asked:
            raise EdgeSRError(f"-o {job.dst}: {fmt} holds 8 bits per channel, not the 16 "
                              "--depth 16 asks for; write .png or .tif")
        _warn(report, f"{job.src}: {pic.bits}-bit input written as 8-bit, because {job.dst} is "
                      f"{fmt} (8 bits per channel); write .png or .tif to keep 16 bits")
        bits = 8
    keep_alpha = pic.alpha is not None and cfg.alpha == "keep"
    if keep_alpha and fmt not in ALPHA_FORMATS:
        raise EdgeSRError(f"input {job.src} has an alpha channel, which {fmt} ({job.dst}) cannot "
                          "hold; write .png, .tif or .webp, or pass --alpha drop to upscale the "
                          "colour only")
    if pic.alpha is not None and not keep_alpha:
        _warn(report, f"{job.src}: alpha channel dropped (--alpha drop); {job.dst} holds the "
                      "colour only, including any colour under transparent pixels")
    if bits == 16 and pic.icc_profile:
        _warn(report, f"{job.src}: its ICC profile is not copied into the 16-bit {job.dst} "
                      "(OpenCV writes 16-bit files without one); --depth 8 keeps it")
    return ImagePlan(bits, keep_alpha)


def _check_inputs(jobs: list[Job], cfg: UpscaleConfig,
                  report: UpscaleReport) -> dict[Job, ImagePlan]:
    """Decode every input and plan every output before anything is written."""
    plans = {}
    _output_depth(cfg)
    for j in jobs:
        if j.kind == "image":
            try:
                pic = read_image(j.src)
            except EdgeSRError as e:
                raise EdgeSRError(f"{e}; nothing was written (every input is read first): fix "
                                  "or remove that file, or leave it out of the inputs") from None
            plans[j] = plan_image(j, pic, cfg, report)
        elif j.kind == "video":
            open_video(j.src).release()
    return plans


def upscale_frame(predictor, rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 RGB (H*s, W*s, 3), clamped and rounded."""
    lr = rgb.transpose(2, 0, 1).astype(np.float32) / 255.0
    return quantize(upscale_float(predictor, lr.transpose(1, 2, 0)), 8)


def upscale_float(predictor, x: np.ndarray, progress: bool = False) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1] -> float32 (H*s, W*s, 3), not clamped. ``progress``: a tile
    bar on a terminal, else a log line every ``edge_sr.logutil.LOG_EVERY_S`` seconds."""
    sr = predictor.run_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32),
                             progress=progress)[0]
    return np.ascontiguousarray(sr.transpose(1, 2, 0))


def upscale_picture(predictor, pic: Picture, plan: ImagePlan) -> tuple[np.ndarray,
                                                                      np.ndarray | None]:
    """Upscale a picture's colour and (if kept) its alpha plane, at the planned depth.

    The alpha plane goes through the same engine as a grey image and one channel of the result
    (their mean) is kept: the usual practice of SR tools (Real-ESRGAN's default), which keeps
    edges of cut-outs as sharp as the colour's. Colour is upscaled as stored, not premultiplied.
    A grey picture (``Picture.grey``) stays grey: the model's three output channels differ a
    little along edges, and their mean is written to all three.
    """
    sr = upscale_float(predictor, pic.rgb01(), progress=True)
    if pic.grey:
        sr = np.repeat(sr.mean(axis=2, keepdims=True), 3, axis=2)
    rgb = quantize(sr, plan.bits)
    alpha = None
    if plan.alpha:
        a = pic.alpha01()
        sr_a = upscale_float(predictor, np.repeat(a[:, :, None], 3, axis=2)).mean(axis=2)
        alpha = quantize(sr_a, plan.bits)
    return rgb, alpha


def run_video(predictor, job: Job, cfg: UpscaleConfig, report: UpscaleReport) -> None:
    """Upscale a video file or stream frame by frame into an mp4 written atomically."""
    is_stream = job.kind == "stream"
    cap = open_stream(job.src) if is_stream else open_video(job.src)
    fps = video_fps(cap)
    if fps is None:
        _warn(report, f"{job.src}: no frame rate in the source; {job.dst} is written at 30 fps")
        fps = 30.0
    expected = int(cap.get(cv2_module().CAP_PROP_FRAME_COUNT) or 0) if not is_stream else 0
    limit = cfg.max_frames
    s = predictor.scale
    n, writer = 0, None
    bar = tqdm(total=(min(expected, limit) if limit else expected) or None, desc=Path(job.src).name,
               unit="frame", disable=progress_disabled())
    try:
        with atomic_path(job.dst, suffix=".tmp" + job.dst.suffix) as tmp:
            try:
                while limit is None or n < limit:
                    rgb = read_frame(cap)
                    if rgb is None:
                        break
                    sr = upscale_frame(predictor, rgb)
                    if writer is None:
                        writer = VideoSink(tmp, cfg.fourcc, fps, (sr.shape[1], sr.shape[0]))
                    writer.write(sr)
                    n += 1
                    bar.update(1)
            except KeyboardInterrupt:
                if not is_stream or writer is None:
                    raise
                log.warning("interrupted: keeping the %d frames recorded from %s", n, job.src)
            if writer is not None:
                writer.release()
            if n == 0:
                raise EdgeSRError(f"input {job.src}: no frame could be decoded (empty or corrupt "
                                  "video); nothing was written")
    finally:
        bar.close()
        cap.release()
        if writer is not None:
            writer.release()
    if writer.padding != (0, 0):
        (w, h), (sw, sh) = writer.size, writer.stored_size
        _warn(report, f"{job.src}: the x{s} frames are {w}x{h}, but OpenCV's video writer stores "
                      f"only even sizes (YUV 4:2:0) and would drop the odd last column/row, so "
                      f"{job.dst} holds them padded to {sw}x{sh} (last column/row repeated); crop "
                      f"the right {sw - w} and bottom {sh - h} pixel(s) for the exact frames")
    if expected and n < expected and (limit is None or n < limit):
        _warn(report, f"{job.src}: the video ended early, after {n} of the {expected} frames its "
                      f"header announces (truncated or corrupt); {job.dst} holds the {n} decoded "
                      "frames")
    _share(job.dst)
    log.info("%s -> %s: %d frames x%d at %.3f fps", job.src, job.dst, n, s, fps)
    report.frames += n
    report.outputs.append(job.dst)


def upscale(cfg: UpscaleConfig) -> UpscaleReport:
    """Upscale every input of ``cfg`` with the engine; returns what was written."""
    from runtime.predictors import engine_predictor

    jobs = plan_jobs(cfg)
    report = UpscaleReport()
    plans = _check_inputs(jobs, cfg, report)
    predictor = engine_predictor(cfg.engine, threads=cfg.threads, scale=cfg.scale)
    t0 = time.perf_counter()
    try:
        images = [j for j in jobs if j.kind == "image"]
        # not `progress_disabled() or ...`: its None (a bar only on a terminal) must stay None
        for j in tqdm(images, desc="images", unit="img",
                      disable=True if len(images) < 2 else progress_disabled()):
            pic = read_image(j.src)
            rgb, alpha = upscale_picture(predictor, pic, plans[j])
            save_image(j.dst, rgb, alpha=alpha,
                       icc_profile=pic.icc_profile if plans[j].bits == 8 else None)
            _share(j.dst)
            report.outputs.append(j.dst)
            report.frames += 1
            log.info("%s -> %s (%dx%d, %d-bit%s)", j.src, j.dst, rgb.shape[1], rgb.shape[0],
                     plans[j].bits, ", alpha" if alpha is not None else "")
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
