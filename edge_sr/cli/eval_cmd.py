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
              help="Write the scores as JSON to this file (atomically, replacing it): each set's "
                   "mean PSNR / SSIM, and every image's under per_image.")
@click.option("--save-images", type=click.Path(file_okay=False), default=None,
              help="Write the SR outputs as PNG to DIR/<set>/<name>.png.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Score the fake-quant model of this calibration file instead of the FP model.")
@click.option("--onnx", type=click.Path(dir_okay=False), default=None,
              help="Score this ONNX file with ONNX Runtime (CPU) instead of PyTorch.")
@click.option("--engine", type=click.Path(file_okay=False), default=None,
              help="Score this engine directory (edge-sr build), tiled as upscale runs it.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (torch or ORT) [default: all cores].")
@click.option("--limit", type=int, default=None, hidden=True,
              help="Score only the first N images of each set (smoke runs).")
@logging_options
def eval_cmd(model, scale, datasets, json_path, save_images, calibration, onnx, engine,
             threads, limit) -> None:
    """Score a model on benchmark sets: Y-PSNR / Y-SSIM, crop = scale (BasicSR protocol)."""
    from edge_sr.errors import EdgeSRError
    from edge_sr.evaluate import EvalConfig, evaluate
    from edge_sr.fileio import check_writable, versions, write_json
    from runtime.predictors import make_predictor

    names = [d.strip() for d in datasets.split(",") if d.strip()]
    if not names:
        raise EdgeSRError(f"--datasets: expected comma-separated set names, got {datasets!r}")
    if model is None and onnx is None and calibration is None and engine is None:
        raise EdgeSRError("--model: expected a checkpoint name or path (or --calibration FILE, "
                          "--onnx FILE or --engine DIR), got none")
    if json_path:  # before the scoring, not after it
        check_writable(json_path, "--json")
    if save_images:
        check_writable(f"{save_images}/x.png", "--save-images")
    predictor = make_predictor(model=model, scale=scale, calibration=calibration, onnx=onnx,
                               threads=threads, engine=engine)
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
        obj["per_image"] = result.per_image()  # dataset, image, psnr, ssim, seconds
        obj["versions"] = versions()
        write_json(json_path, obj)
        echo_info(f"wrote {json_path}")
