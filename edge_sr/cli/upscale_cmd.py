"""``edge-sr upscale``: images, videos and streams through an engine (``runtime.upscale``)."""

from __future__ import annotations

import click

from edge_sr.cli.options import logging_options

HELP = """Upscale INPUT images, folders and videos, or a camera/stream --source.

\b
Images: PNG, JPEG, BMP, TIFF, WebP (folders of them too) -> OUT/<stem>.png.
  EXIF orientation is applied (outputs are upright; other EXIF is not copied).
  Alpha is kept, upscaled separately by the same engine (--alpha drop: colour only).
  16-bit and float ([0, 1]) inputs give 16-bit PNG/TIFF outputs (--depth 8 for 8-bit);
  8-bit inputs 8-bit ones. Greyscale becomes RGB. ICC profiles go into 8-bit outputs.
  Animated or multi-page images are refused: extract their frames first.
Videos: MP4, AVI, MKV, MOV, WebM, M4V, MPEG (OpenCV/FFmpeg) -> OUT/<stem>.mp4 (mp4v),
  8-bit, at the source frame rate; audio is not copied. Odd upscaled sizes are padded
  to even (last row/column repeated), with a warning.
Nothing half-written is left; a file that cannot be read is one error line.
"""


@click.command("upscale", help=HELP)
@click.option("--engine", type=click.Path(file_okay=False), required=True, metavar="DIRECTORY", help="Engine directory (edge-sr build).")
@click.argument("inputs", nargs=-1)
@click.option("-o", "--output", type=click.Path(), required=True,
              help="Output folder (or file, for a single image, video or stream).")
@click.option("--source", default=None, metavar="INDEX|PIPELINE|URL",
              help="Camera index (0), GStreamer pipeline or stream URL, recorded to OUT/stream.mp4.")
@click.option("--max-frames", type=int, default=None, help="Stop a stream after N frames.")
@click.option("--alpha", type=click.Choice(["keep", "drop"]), default="keep", show_default=True,
              help="Images with transparency: upscale the alpha channel too, or drop it (warned).")
@click.option("--depth", type=click.Choice(["auto", "8", "16"]), default="auto",
              show_default=True,
              help="Output bits per channel; auto: 16 for 16-bit and float inputs, else 8.")
@click.option("--force", is_flag=True, help="Overwrite outputs that exist.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads [default: all cores].")
@click.option("--scale", type=int, default=None, help="Check the engine is this scale.")
@logging_options
def upscale_cmd(engine, inputs, output, source, max_frames, alpha, depth, force, threads,
                scale) -> None:
    from edge_sr.cli.options import echo_info
    from runtime.upscale import UpscaleConfig, upscale

    rep = upscale(UpscaleConfig(engine=engine, inputs=list(inputs), output=output, source=source,
                                force=force, threads=threads, scale=scale, max_frames=max_frames,
                                alpha=alpha, depth=depth))
    for p in rep.outputs:
        echo_info(f"wrote {p}")
    echo_info(f"{rep.frames} frame(s) in {rep.seconds:.1f} s")
