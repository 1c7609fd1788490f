"""``edge-sr calibrate``: 2DQuant (or DOBI / MinMax / Percentile) calibration to a small file."""

from __future__ import annotations

import click

from calibrate.vocab import DQC_PRECISIONS
from edge_sr.cli.options import logging_options, parse_list, parse_optional_list, quant_options


@click.command("calibrate")
@click.option("--model", "model", required=True, metavar="NAME|PATH",
              help="FP checkpoint: a registry name (edge-sr models) or a .pth path.")
@click.option("--bits", type=int, required=True, help="Weight and activation bits (2-8).")
@click.option("--scale", type=int, default=None,
              help="Upscaling factor; defaults to the checkpoint's, and must agree with it.")
@quant_options(method_default="2dquant", budget_default="fast")
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
@click.option("--recompute", is_flag=True,
              help="DQC: recompute each transformer block in the backward pass instead of "
                   "storing it (NGswin at batch 16 of 64x64: 12 -> 4.8 GB, ~15% slower).")
@click.option("--dqc-precision", type=click.Choice(DQC_PRECISIONS), default=None,
              help="DQC's forward passes: fp32 (the paper), or bf16 autocast (bfloat16 GEMMs; "
                   "fake quantizers compute in fp32; losses and validation stay fp32; a step "
                   "1.4-2.1x faster at batch 16 of 32x32, 1.2x on the cpu budget, where the CPU/GPU "
                   "has bfloat16; -0.03 dB held-out on "
                   "NGswin x2 W4 with edge-sr, mean of 9 runs over 3 seeds). Default: fp32.")
@click.option("--block-recon", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="STEPS",
              help="Beyond the paper: before DQC, train the bounds block by block against the "
                   "FP blocks' outputs on cached inputs (BRECQ-style), STEPS Adam steps per "
                   "block; 0 = off. With --iterations 0 it replaces DQC.")
@click.option("--iterations", type=click.IntRange(min=0), default=None, metavar="N",
              help="DQC iterations instead of the budget's (0: no DQC).")
@click.option("--patience", type=click.IntRange(min=0), default=None, metavar="N",
              help="Stop DQC after N validations in a row without a better held-out PSNR (the "
                   "best bounds are kept); 0: run the budget's iterations. Default: the "
                   "budget's (cpu: 5, fast and paper: 0).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="MIN", help="Stop DQC at the first step after this many minutes, "
                                  "counted from the start of calibration (DOBI included), and "
                                  "write the best-validated bounds so far; the DQC state is kept "
                                  "so that --resume continues it.")
@click.option("--feature-loss", type=click.Choice(["fixed", "released"]), default="fixed",
              show_default=True, help="DQC feature loss: intended, or the released code's bugs.")
@click.option("--resume", is_flag=True, help="Continue an interrupted or time-limited DQC run "
                                             "for the same -o (its DQC state beside -o).")
@click.option("--pool", type=click.Path(file_okay=False), default=None,
              help="Folder of training images (default: data/train/BSD200).")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]",
              help="Where DOBI's forward pass and DQC run; the bounds are searched on the CPU.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="PyTorch intra-op threads [default: all cores]; the result does not depend "
                   "on it beyond float rounding.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Calibration file to write (atomically).")
@click.option("--force", is_flag=True, help="Overwrite -o if it exists.")
@logging_options
def calibrate_cmd(model, bits, scale, budget, method, seed, shared_qkv_input, search_assignment,
                  wide_inputs, rotate, weight_grid, grid, fp_sites, fp_weights, avg_bits, rounding, smooth, weight_lr, qdrop, quant_conv, recompute, dqc_precision, block_recon, iterations,
                  patience, time_limit, feature_loss,
                  resume, pool, device, threads, output, force) -> None:
    """Calibrate a low-bit fake-quant model; score it with 'edge-sr eval --calibration FILE'."""
    from calibrate.api import CalibrationConfig, calibrate, dqc_state_path

    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    try:
        calibrate(CalibrationConfig(  # logs "wrote FILE (method, WbAb, xS, held-out dB)"
            model=model, bits=bits, output=output, scale=scale, method=method, budget=budget,
            seed=seed, qkv_separation=not shared_qkv_input, search_assignment=search_assignment,
            wide_inputs=parse_list(wide_inputs), rotate=parse_optional_list(rotate),
            weight_grid=weight_grid, grid=grid, fp_sites=parse_optional_list(fp_sites) or (), fp_weights=fp_weights, avg_bits=avg_bits, rounding=rounding, smooth=smooth, weight_lr=weight_lr, qdrop=qdrop, quant_conv=quant_conv, recompute=recompute,
            dqc_precision=dqc_precision,
            block_recon=block_recon, iterations=iterations, patience=patience,
            time_limit=time_limit,
            feature_loss=feature_loss, resume=resume, pool=pool, device=device, force=force))
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: say how to continue, if work was saved
        from calibrate.api import resumable_state

        state = dqc_state_path(output)
        if state.exists():
            e.hint = "the same command with --resume continues the DQC from its last save"
        elif resumable_state(state):
            e.hint = ("the same command with --resume reuses the choices already made and "
                      "continues from there")
        raise
