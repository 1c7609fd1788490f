"""Options shared by every subcommand."""

from __future__ import annotations

import functools
import logging

import click

from calibrate.vocab import (
    BUDGETS,
    DEPLOY_GRIDS,
    FP_WEIGHTS,
    METHODS,
    ROUNDINGS,
    SITE_KINDS,
    WEIGHT_GRIDS,
)
from edge_sr.logutil import setup_logging


def logging_options(f):
    """Add ``--quiet/--verbose`` to a subcommand (they also exist on the ``edge-sr`` group)."""

    @click.option("-q", "--quiet", "sub_quiet", is_flag=True, help="Only warnings and errors.")
    @click.option("-v", "--verbose", "sub_verbose", is_flag=True,
                  help="Debug logging, and tracebacks on errors.")
    @functools.wraps(f)
    def wrapper(*args, sub_quiet: bool = False, sub_verbose: bool = False, **kwargs):
        ctx = click.get_current_context()
        root = ctx.find_root()
        root.ensure_object(dict)
        if sub_quiet or sub_verbose:
            root.obj["verbose"] = root.obj.get("verbose") or sub_verbose
            setup_logging(quiet=sub_quiet, verbose=root.obj["verbose"])
        return f(*args, **kwargs)

    return wrapper


def echo_info(message: str) -> None:
    """Echo a line about what a command did ("wrote F", a frame count) to stdout, unless
    ``--quiet`` asked for warnings and errors only. A command's result proper (a table, the
    engine's path) is echoed with ``click.echo`` in any case."""
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        click.echo(message)


def parse_size(value: str, option: str, square: bool = True) -> tuple[int, int]:
    """Parse ``WxH`` into (height, width); a single ``N`` is a square where ``square`` (a tile),
    and an error where not (a camera frame: ``--input-size 320`` would build 320x320)."""
    from edge_sr.errors import EdgeSRError

    example = "192 or 192x128" if square else "320x180"
    try:
        parts = [int(v) for v in value.lower().split("x")]
        if len(parts) == 1 and square:
            parts = parts * 2
        w, h = parts
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise EdgeSRError(f"{option}: expected WIDTHxHEIGHT in whole pixels of at least 1, like "
                          f"{example}, got {value!r}") from None
    return h, w


def parse_list(text: str) -> tuple[str, ...]:
    """``"fc1, qkv"`` -> ``("fc1", "qkv")``; empty items are dropped (validation is the API's)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_optional_list(text: str | None) -> tuple[str, ...] | None:
    """``--rotate`` / ``--fp-sites``: None (the default), ``none`` (empty), or a list."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    return parse_list(text)


def _smooth_value(ctx, param, value: str | None) -> float | str | None:
    """``--smooth``: a migration strength in [0, 1], or none."""
    if value is None or value.strip().lower() == "none":
        return None if value is None else "none"
    try:
        alpha = float(value)
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise click.BadParameter(f"expected a migration strength from 0 to 1 or none, got "
                                 f"{value!r}")
    return alpha


def quant_options(method_default: str, budget_default: str, grid_default: str = "real"):
    """``--method``, ``--budget`` and the options beyond the paper, shared by calibrate and
    build (the defaults differ: build uses the measured method and budget). The choices come
    from ``calibrate.vocab`` (torch-free, so --help stays light)."""
    opts = [
        click.option("--method", type=click.Choice(METHODS), default=method_default,
                     show_default=True,
                     help="2dquant = the faithful paper (DOBI + DQC); edge-sr = 2DQuant + "
                          "Hadamard rotation where it measures better, per-channel weights "
                          "and GPTQ (+1.4 to +2.6 dB on converged NGswin); dobi/minmax/"
                          "percentile = calibration only, no DQC."),
        click.option("--budget", type=click.Choice(BUDGETS), default=budget_default,
                     show_default=True,
                     help="DQC budget: cpu = 130 it x batch 4 x 64px LR (chosen by measurement: "
                          "<= 15 min of 2 CPU cores on NGswin), fast = 60 it x 4 x 16px (raised "
                          "to the model's minimum), paper = 4000 it x 16 x 64px (GPU)."),
        click.option("--rotate", default=None, metavar="ROLES|auto|none",
                     help="Beyond the paper: Hadamard-rotate the inputs of these linear roles "
                          "(qkv, proj, fc1, fc2) or module paths; 'auto' picks the sites where "
                          "it measures better; 'none' turns it off [default: the method's]."),
        click.option("--weight-grid", type=click.Choice(WEIGHT_GRIDS), default=None,
                     help="Beyond the paper: one weight grid per tensor (paper) or per output "
                          "channel [default: the method's]."),
        click.option("--grid", default=grid_default, show_default=True,
                     type=click.Choice(DEPLOY_GRIDS + (("auto",) if grid_default == "auto"
                                                       else ())),
                     help="Beyond the paper: real = the paper's real-valued zero points (exact "
                          "export with correction terms); ort / trt = the grids that engine "
                          "runs natively (0 on every grid, symmetric weights), searched and "
                          "learned under that constraint: plain Q/DQ, integer kernels"
                          + ("; auto = the backend's." if grid_default == "auto" else ".")),
        click.option("--fp-sites", default=None, metavar="KINDS|none",
                     help="Beyond the paper: kinds of site kept in floating point, in the "
                          "calibrated model and the engine alike: some of "
                          f"{', '.join(SITE_KINDS)} (the linears, the attention products q.k "
                          "and p.v, the softmax output alone), or none [default: none for "
                          "calibrate; build: what measured faster on the backend]."),
        click.option("--fp-weights", type=click.Choice(FP_WEIGHTS), default=None,
                     help="Beyond the paper: the weights kept out of WbAb (convs, position-bias "
                          "tables, unquantized linears) as float32 (paper) or rounded to FP16 "
                          "before calibration and stored so; int8/int4 also make the convs and "
                          "linears among them weight-only integer grids (per output channel; "
                          "image layers stay FP16); auto holds each such layer at INT4 where "
                          "that alone costs <= 0.002 dB held-out, else INT8 "
                          "[default: edge-sr auto at <= 4 bits, fp16 at 8; the others fp32]."),
        click.option("--avg-bits", type=float, default=None, metavar="BITS",
                     help="Beyond the paper: mixed precision; the linear inputs that measure "
                          "most sensitive (held-out data) go to 8 bits within this mean width."),
        click.option("--rounding", type=click.Choice(ROUNDINGS), default=None,
                     help="Beyond the paper: weight rounding after DOBI, nearest (paper) or "
                          "GPTQ (output-aware, on the same grids) [default: the method's]."),
        click.option("--smooth", default=None, metavar="ALPHA|none", callback=_smooth_value,
                     help="Beyond the paper: SmoothQuant input smoothing of every quantized "
                          "linear, with migration strength ALPHA in [0, 1] (factors measured on "
                          "calibration data, folded into the weights) [default: the method's]."),
        click.option("--weight-lr", type=float, default=None, metavar="LR",
                     help="Beyond the paper: DQC also trains the quantized linears' weights "
                          "and biases, at LR x each weight grid's step per Adam step; 0 = "
                          "bounds only, as the paper [default: the method's]."),
        click.option("--qdrop", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
                     metavar="P",
                     help="Beyond the paper (QDrop, Wei et al. 2022): while DQC trains, each "
                          "activation element stays unquantized with probability P; 0 = every "
                          "element quantized, as the paper [default: the method's: 0 for both "
                          "2dquant and edge-sr]."),
        click.option("--quant-conv", is_flag=True,
                     help="Beyond the paper: the body's 3x3 convolutions (SwinIR-light's RSTB "
                          "convolutions and conv_after_body) run on ONNX Runtime's integer "
                          "QLinearConv, W8A8 with an 8-bit output grid whatever --bits is, "
                          "learned like the others. Needs --grid ort."),
    ]

    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco
