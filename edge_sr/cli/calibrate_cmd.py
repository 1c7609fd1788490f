"""``edge-sr calibrate``: 2DQuant (or DOBI / MinMax / Percentile) calibration to a small file."""

from __future__ import annotations

import click

from edge_sr.cli.options import logging_options, parse_list, parse_rotate


@click.command("calibrate")
@click.option("--model", "model", required=True, metavar="NAME|PATH",
              help="FP checkpoint: a registry name (edge-sr models) or a .pth path.")
@click.option("--bits", type=int, required=True, help="Weight and activation bits (2-8).")
@click.option("--scale", type=int, default=None,
              help="Upscaling factor; defaults to the checkpoint's, and must agree with it.")
@click.option("--recipe", type=click.Choice(["cpu", "fast", "paper"]), default="fast",
              show_default=True,
              help="DQC budget: 'cpu' = 130 it x batch 4 x 64px (~10-15 min of 2 CPU cores on "
                   "NGswin), 'fast' = 60 it x 4 x 16px (a smoke-sized run), 'paper' = 4000 it x "
                   "16 x 64px (GPU).")
@click.option("--method", type=click.Choice(["2dquant", "edge-sr", "dobi", "minmax",
                                            "percentile"]),
              default="2dquant", show_default=True,
              help="2dquant = the faithful paper (DOBI + DQC); edge-sr = 2DQuant with measured "
                   "per-site Hadamard rotation and per-channel weight grids; dobi/minmax/"
                   "percentile = calibration only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shared-qkv-input", is_flag=True,
              help="One input quantizer for the fused qkv (deployment) instead of three (paper).")
@click.option("--search", "search_assignment", type=click.Choice(["paper", "released"]),
              default="paper", show_default=True,
              help="DOBI: one-sided for softmax/post-GELU (paper) or two-sided everywhere "
                   "(released code).")
@click.option("--wide-inputs", default="", metavar="ROLES",
              help="Comma-separated linear roles (qkv, proj, fc1, fc2) whose input quantizer "
                   "runs at 8 bits; beyond the paper, e.g. fc1 for post-norm NGswin.")
@click.option("--rotate", default=None, metavar="ROLES|auto",
              help="Beyond the paper: Hadamard-rotate the inputs of these linear roles (qkv, "
                   "proj, fc1, fc2) or module paths; 'auto' picks the sites where it measures "
                   "better; 'none' turns it off [default: the method's].")
@click.option("--weight-grid", type=click.Choice(["tensor", "channel"]), default=None,
              help="Beyond the paper: one weight grid per tensor (paper) or per output channel "
                   "[default: the method's].")
@click.option("--avg-bits", type=float, default=None, metavar="BITS",
              help="Beyond the paper: mixed precision; promote the linear inputs that measure "
                   "most sensitive (held-out data) to 8 bits within this mean width.")
@click.option("--rounding", type=click.Choice(["nearest", "gptq"]), default=None,
              help="Beyond the paper: weight rounding after DOBI, nearest (paper) or GPTQ "
                   "(output-aware, on the same grids) [default: the method's].")
@click.option("--recompute", is_flag=True,
              help="DQC: recompute each transformer block in the backward pass instead of "
                   "storing it (NGswin at batch 16 of 64x64: 12 -> 4.8 GB, ~15% slower).")
@click.option("--feature-loss", type=click.Choice(["fixed", "released"]), default="fixed",
              show_default=True, help="DQC feature loss: intended, or the released code's bugs.")
@click.option("--resume", is_flag=True, help="Continue an interrupted DQC run for the same -o.")
@click.option("--pool", type=click.Path(file_okay=False), default=None,
              help="Folder of training images (default: data/train/BSD200).")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]",
              help="Where DOBI's forward pass and DQC run; the bounds are searched on the CPU.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Calibration file to write (atomically).")
@logging_options
def calibrate_cmd(model, bits, scale, recipe, method, seed, shared_qkv_input, search_assignment,
                  wide_inputs, rotate, weight_grid, avg_bits, rounding, recompute, feature_loss, resume, pool, device,
                  output) -> None:
    """Calibrate a low-bit fake-quant model; score it with 'edge-sr eval --calibration FILE'."""
    from calibrate.api import CalibrationConfig, calibrate

    path = calibrate(CalibrationConfig(
        model=model, bits=bits, output=output, scale=scale, method=method, recipe=recipe,
        seed=seed, qkv_separation=not shared_qkv_input, search_assignment=search_assignment,
        wide_inputs=parse_list(wide_inputs), rotate=parse_rotate(rotate),
        weight_grid=weight_grid, avg_bits=avg_bits, rounding=rounding, recompute=recompute,
        feature_loss=feature_loss, resume=resume, pool=pool, device=device))
    click.echo(f"wrote {path}")
