"""``edge-sr eval``: score a model on benchmark sets (a thin shell over ``edge_sr.evaluate``)."""

from __future__ import annotations

import click

from edge_sr.cli.options import echo_info, logging_options


@click.command("eval")
@click.option("--model", "model", metavar="NAME|PATH",
              help="Checkpoint: a registry name (edge-sr models) or a .pth path. With "
                   "--calibration it defaults to the checkpoint the file names.")
@click.option("--scale", type=int, default=None,
              help="Upscaling factor; defaults to the checkpoint's, and must agree with it.")
@click.option("--datasets", default="Set5,Set14", show_default=True,
              help="Comma-separated benchmark names (Set5, Set14, B100, Urban100, BSD200-val) "
                   "or folders holding HR/.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the scores as JSON to this file (atomically).")
@click.option("--save-images", type=click.Path(file_okay=False), default=None,
              help="Write the SR outputs as PNG to DIR/<set>/<name>.png.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Score the fake-quant model of this calibration file instead of the FP model.")
@click.option("--onnx", type=click.Path(dir_okay=False), default=None,
              help="Score this ONNX file with ONNX Runtime (CPU) instead of PyTorch.")
@click.option("--threads", type=int, default=None, help="Intra-op threads (torch or ORT).")
@click.option("--limit", type=int, default=None, hidden=True,
              help="Score only the first N images of each set (smoke runs).")
@logging_options
def eval_cmd(model, scale, datasets, json_path, save_images, calibration, onnx, threads,
             limit) -> None:
    """Score a model on benchmark sets: Y-PSNR / Y-SSIM, crop = scale (BasicSR protocol)."""
    from edge_sr.errors import EdgeSRError
    from edge_sr.evaluate import EvalConfig, evaluate
    from edge_sr.fileio import versions, write_json
    from runtime.predictors import make_predictor

    names = [d.strip() for d in datasets.split(",") if d.strip()]
    if not names:
        raise EdgeSRError(f"--datasets: expected comma-separated set names, got {datasets!r}")
    if model is None and onnx is None and calibration is None:
        raise EdgeSRError("--model: expected a checkpoint name or path (or --calibration FILE, "
                          "or --onnx FILE), got none")
    predictor = make_predictor(model=model, scale=scale, calibration=calibration, onnx=onnx,
                               threads=threads)
    result = evaluate(predictor, EvalConfig(datasets=names, scale=scale,
                                            save_images=save_images, limit=limit))
    click.echo(result.table())
    if json_path:
        obj = result.to_json()
        info = getattr(predictor, "info", None)
        if info:
            obj["source"] = info
        if limit is not None:
            obj["limit"] = limit
        obj["versions"] = versions()
        write_json(json_path, obj)
        echo_info(f"wrote {json_path}")
