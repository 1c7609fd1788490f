"""Held-out PSNR of ``--method edge-sr`` at its start (site choice, smoothing, DOBI, GPTQ; no
DQC) for several SmoothQuant migration strengths: how ``calibrate.api.SMOOTH_ALPHA`` was chosen.

    python scripts/smooth_study.py --model ngswin-x2 --bits 4 --alphas none,0.35,0.5,0.65,0.8 \\
        --threads 1 [--grid ort --fp-sites qk,pv]

Scores on the ``cpu`` recipe's 8 held-out 64x64 LR patches (``val8``, what DQC validates on) and
on 24 other held-out 64x64 patches (``ho24``, seed 7): both from the BSD200 pool's validation
split, never a test set. Prints one JSON line per alpha.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.sensitivity import held_out
from calibrate.api import CalibrationConfig, calibrate_model, pool_data
from calibrate.dqc import val_psnr
from edge_sr.checkpoints import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ngswin-x2")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--alphas", default="none,0.35,0.5,0.65,0.8")
    ap.add_argument("--grid", default="ort")
    ap.add_argument("--fp-sites", default="qk,pv")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    data = pool_data(lm.scale, "cpu", 0, lr_patch=64)
    lr, hr = held_out(lm.scale, 24, 64, seed=7)
    for alpha in a.alphas.split(","):
        t = time.perf_counter()
        cfg = CalibrationConfig(model=a.model, bits=a.bits, output="-", method="edge-sr",
                                budget="cpu", grid=a.grid, iterations=0,
                                fp_sites=tuple(s for s in a.fp_sites.split(",") if s),
                                smooth="none" if alpha == "none" else float(alpha))
        cal = calibrate_model(lm, data, cfg)
        print(json.dumps({"model": a.model, "bits": a.bits, "alpha": alpha,
                          "val8": round(cal.meta.stats["val_psnr_init"], 3),
                          "ho24": round(val_psnr(cal.model, lr, hr, lm.scale), 3),
                          "rotated": len(cal.meta.recipe["rotate"]),
                          "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
