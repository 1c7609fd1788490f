"""``edge-sr upscale``: images, videos and streams through an engine (``runtime.upscale``)."""

from __future__ import annotations

import click

from edge_sr.cli.options import logging_options


@click.command("upscale")
@click.option("--engine", type=click.Path(), required=True, help="Engine directory (edge-sr build).")
@click.argument("inputs", nargs=-1)
@click.option("-o", "--output", type=click.Path(), required=True,
              help="Output folder (or file, for a single image / stream).")
@click.option("--source", default=None, metavar="INDEX|PIPELINE|URL",
              help="Camera index (0), GStreamer pipeline or stream URL, recorded to OUT/stream.mp4.")
@click.option("--max-frames", type=int, default=None, help="Stop a stream after N frames.")
@click.option("--force", is_flag=True, help="Overwrite outputs that exist.")
@click.option("--threads", type=int, default=None, help="Inference threads.")
@click.option("--scale", type=int, default=None, help="Check the engine is this scale.")
@logging_options
def upscale_cmd(engine, inputs, output, source, max_frames, force, threads, scale) -> None:
    """Upscale INPUT images (PNG/JPEG/folders) and videos, or a camera/stream --source."""
    from runtime.upscale import UpscaleConfig, upscale

    rep = upscale(UpscaleConfig(engine=engine, inputs=list(inputs), output=output, source=source,
                                force=force, threads=threads, scale=scale, max_frames=max_frames))
    for p in rep.outputs:
        click.echo(f"wrote {p}")
    click.echo(f"{rep.frames} frame(s) in {rep.seconds:.1f} s")
