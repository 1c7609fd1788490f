"""``edge-sr export``: write the QDQ ONNX of a calibration file (thin shell over
``calibrate.export_qdq.export_qdq``)."""

from __future__ import annotations

import click

from calibrate.vocab import TARGET_NAMES, WEIGHT_CONTAINERS
from edge_sr.cli.options import logging_options


@click.command("export")
@click.argument("calibration", type=click.Path(dir_okay=False))
@click.option("--target", type=click.Choice(TARGET_NAMES), default="ort", show_default=True,
              help="ort: uint8 activations with zero points; trt: symmetric, zero point 0.")
@click.option("--tile", default="64x64", show_default=True, metavar="WxH",
              help="Fixed LR input tile of the graph; a multiple of the model's window.")
@click.option("--dynamic", is_flag=True,
              help="Symbolic input height and width (--tile only traces): one graph for any "
                   "size; SwinIR-light on the ort/trt grids.")
@click.option("--batch", type=int, default=1, show_default=True, help="Fixed batch size.")
@click.option("--opset", type=int, default=21, show_default=True, help="ONNX opset (>= 21; the ort target's fused attention raises it to 23).")
@click.option("--weights", "weight_container", type=click.Choice(WEIGHT_CONTAINERS),
              default="auto", show_default=True,
              help="Weight storage: auto = INT4 for <= 4 bits (smallest file); int8 = what "
                   "ONNX Runtime fuses into integer MatMul kernels.")
@click.option("--lowbit-plugin", is_flag=True,
              help="Replace quantized linears with edge_sr::LowBitLinear plugin nodes (TensorRT).")
@click.option("--unfused-attention", is_flag=True,
              help="ort target: keep each attention as MatMul / Softmax nodes (--opset) instead "
                   "of ONNX's Attention operator (opset 23; ONNX Runtime >= 1.23). The trt "
                   "target is never fused.")
@click.option("--keep-names", is_flag=True,
              help="Keep the traced node and initializer names and each quantized node's "
                   "edge_sr.* metadata (larger file; for per-module profiles, reading, and "
                   "later --lowbit-plugin passes). Default: short names, and the sites "
                   "described once, in the model's edge_sr.qdq metadata.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .onnx file to write (atomically).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@logging_options
def export_cmd(calibration, target, tile, dynamic, batch, opset, weight_container, lowbit_plugin,
               unfused_attention, keep_names, output, force) -> None:
    """Export CALIBRATION (a file from ``edge-sr calibrate``) as QDQ ONNX, exact to its grids."""
    from pathlib import Path

    from calibrate.export_qdq import ExportConfig, export_qdq
    from edge_sr.cli.options import echo_info, parse_size
    from edge_sr.errors import EdgeSRError

    if not Path(calibration).is_file():  # the words build and eval use (calibfile)
        raise EdgeSRError(f"calibration file {calibration}: expected a file written by 'edge-sr "
                          "calibrate', found nothing there")
    cfg = ExportConfig(target=target, tile=parse_size(tile, "--tile"), batch=batch, opset=opset,
                       lowbit_plugin=lowbit_plugin, weight_container=weight_container,
                       dynamic=dynamic, keep_names=keep_names,
                       fuse_attention=not unfused_attention)
    path = export_qdq(calibration, cfg, output, force=force)
    echo_info(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
