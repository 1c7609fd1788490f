"""``edge-sr build``: one command from a checkpoint to a deployable engine (``runtime.build``)."""

from __future__ import annotations

import json

import click

from edge_sr.cli.options import logging_options, quant_options
from runtime.vocab import BACKEND_CHOICES, ENGINE_BITS


@click.command("build")
@click.option("--bits", type=int, default=None,
              help=f"Weight and activation bit width: {', '.join(map(str, ENGINE_BITS[:-1]))} "
                   f"or {ENGINE_BITS[-1]} (W8A8: the safest first deployment).")
@click.option("--scale", type=int, default=None,
              help="Upscaling factor (2, 3, 4) [default: the --model checkpoint's; required "
                   "without --model, where it picks the reference SwinIR-light].")
@click.option("--model", metavar="NAME|PATH", default=None,
              help="Checkpoint name or .pth path [default: swinir-light-x{scale}-ref].")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
              show_default=True, help="auto: TensorRT with a CUDA GPU, else ONNX Runtime (CPU).")
@quant_options(method_default="edge-sr", budget_default="cpu", grid_default="auto")
@click.option("--tile", default=None, metavar="N|WxH",
              help="LR tile the engine runs: N or WxH (a multiple of the model's window) "
                   "[default: 192, chosen by measured cost per pixel and per frame, "
                   "docs/results/grids.md].")
@click.option("--input-size", default=None, metavar="WxH",
              help="A camera's LR frame: the engine is exported at this shape (padded to the "
                   "model's window), so each frame runs as one tile; replaces --tile.")
@click.option("--dynamic", is_flag=True,
              help="One engine for any input size (ONNX Runtime, SwinIR-light): each image runs "
                   "whole in one call, padded to the model's window; no tiles. Not with --tile, "
                   "--input-size or --batch.")
@click.option("--batch", type=int, default=1, show_default=True, help="Tiles per engine call.")
@click.option("-o", "--out", "--output", "out", type=click.Path(file_okay=False), default=None,
              help="Engine directory [default: engines/<model>-w{bits}a{bits}].")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only once the build "
                                            "succeeded).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for PyTorch (calibration, validation) and ONNX Runtime "
                   "[default: all cores].")
@click.option("--wide-inputs", default="", metavar="ROLES",
              help="Comma-separated linear roles (qkv, proj, fc1, fc2) whose inputs stay 8-bit "
                   "(beyond the paper; fc1 for NGswin).")
@click.option("--shared-qkv-input", is_flag=True,
              help="One input quantizer for q, k and v (not the paper's three): one integer "
                   "GEMM per block instead of three and a Concat.")
@click.option("--unfused-attention", is_flag=True,
              help="ONNX Runtime: keep each attention as MatMul / Softmax nodes (opset 21; "
                   "the FP32 graph opset 17) instead of ONNX's Attention operator (opset 23), "
                   "for ONNX Runtime older than 1.23 (e.g. some JetPack builds); slower. "
                   "TensorRT engines are never fused.")
@click.option("--speed-runs", type=click.IntRange(min=0), default=5, show_default=True, metavar="N",
              help="Quick speed check after validation: N interleaved calls of the engine and of "
                   "its FP32 graph on one tile, on this machine (0: skip).")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Build from this calibration file (edge-sr calibrate) instead of calibrating: "
                   "--bits, --scale and --model default to the file's, and its calibration "
                   "options are the engine's (the build's --method, --budget, --grid ... are not "
                   "used).")
@click.option("--print-config", is_flag=True, help="Print the build configuration and stop.")
@logging_options
def build_cmd(bits, scale, model, backend, budget, method, tile, input_size, dynamic, batch, out,
              force, threads,
              wide_inputs, rotate, weight_grid, grid, fp_sites, fp_weights, avg_bits, rounding, smooth, weight_lr, qdrop, quant_conv, shared_qkv_input,
              unfused_attention, speed_runs, calibration, print_config) -> None:
    """Build a quantized SR engine: checkpoint -> calibrate -> export -> build -> validate."""
    from edge_sr.cli.options import parse_list, parse_optional_list, parse_size
    from runtime.build import BuildConfig, build, config_dict

    if calibration is not None:  # the file's bits, scale and checkpoint by default
        from calibrate.calibfile import read_calibration

        meta = read_calibration(calibration)[1]  # a missing or foreign file: one error line
        bits = meta.bits if bits is None else bits
        scale = meta.scale if scale is None else scale
        model = meta.checkpoint_name if model is None else model
    if bits is None:
        raise click.MissingParameter(param_type="option", param_hint="'--bits'",
                                     message="Required without --calibration.")
    if scale is None and model is None:
        raise click.MissingParameter(param_type="option", param_hint="'--scale'",
                                     message="Required without --model (it picks the "
                                             "reference SwinIR-light checkpoint).")
    # the checkpoint's scale; --print-config checks a given one too (build does so when it loads)
    if model is not None and (scale is None or print_config):
        from edge_sr.checkpoints import checkpoint_scale

        own = checkpoint_scale(model)
        if scale is not None and own != scale:
            raise click.BadParameter(f"{model} is an x{own} checkpoint, but {scale} was given.",
                                     param_hint="'--scale'")
        scale = own
    cfg = BuildConfig(bits=bits, scale=scale, model=model, backend=backend, budget=budget,
                      method=method, batch=batch, out=out, dynamic=dynamic,
                      tile=None if tile is None else parse_size(tile, "--tile"),
                      input_size=(None if input_size is None else
                                  parse_size(input_size, "--input-size", square=False)[::-1]),
                      force=force, threads=threads,
                      wide_inputs=parse_list(wide_inputs), rotate=parse_optional_list(rotate),
                      weight_grid=weight_grid, grid=grid, fp_sites=parse_optional_list(fp_sites), fp_weights=fp_weights, avg_bits=avg_bits, rounding=rounding, smooth=smooth, weight_lr=weight_lr, qdrop=qdrop, quant_conv=quant_conv,
                      shared_qkv_input=shared_qkv_input, fuse_attention=not unfused_attention,
                      speed_runs=speed_runs, calibration=calibration)
    if print_config:
        click.echo(json.dumps(config_dict(cfg), indent=2))
        return
    try:
        res = build(cfg)
    except KeyboardInterrupt as e:  # the engine folder is gone; the calibration's progress stays
        if cfg.calibration is None:
            e.hint = ("an interrupted calibration's progress stays in the calibration cache, "
                      "and the same command continues it")
        raise
    v = res.manifest.validation
    click.echo(f"engine: {res.path}")
    click.echo("stages: " + ", ".join(f"{k} {t:.1f}s" for k, t in res.stage_seconds.items()))
    click.echo(f"validation ({len(v['per_image'])} held-out BSD200 crops): engine "
               f"{v['psnr_y_db']:.3f} dB, fake-quant {v['psnr_y_fake_quant_db']:.3f} dB, FP "
               f"{v['psnr_y_fp_db']:.3f} dB; fidelity vs fake-quant {v['fidelity_psnr_y_db']:.2f} dB")
    if (sp := res.manifest.speed) is not None:
        h, w = sp["input_hw"]
        spread = sp.get("speed_vs_fp32_rounds")
        noise = ("" if not spread or spread["clear"] else
                 f"; the calls' ratios span {spread['q25']:.2f}-{spread['q75']:.2f}x, too close "
                 "to call")
        click.echo(f"speed on this machine, {sp.get('device', sp['cpu'])}: engine "
                   f"{sp['engine_ms']:.1f} ms, its FP32 graph {sp['fp32_ms']:.1f} ms per {w}x{h} "
                   f"LR tile: the engine runs {sp['speed_vs_fp32']:.2f}x as fast (median of "
                   f"{sp['runs']} interleaved calls{noise}; 'edge-sr profile --compare' times a "
                   "frame)")
