"""Bicubic upscaling scored with edge-sr's protocol: the baseline every SR table quotes.

    python -m benchmarks.bicubic --scale 3 --datasets Set5,Set14,B100,Urban100 --json F

Each set's LR images (shipped, or made with the MATLAB-port bicubic where a set ships none) are
upscaled with the same port (``edge_sr.data.matlab_resize.bicubic_upscale``) and scored as the
models are: mean Y-PSNR / Y-SSIM with crop = scale (``edge_sr.metrics``). A benchmark, not a
test: results go to ``--json`` and docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge_sr.data.datasets import load_benchmark
from edge_sr.data.matlab_resize import bicubic_upscale
from edge_sr.fileio import atomic_path
from edge_sr.metrics import psnr_y, ssim_y


def score(name: str, scale: int) -> dict:
    """{"psnr", "ssim", "images"} of bicubic on one set at ``scale`` (dB, SSIM in [0, 1])."""
    ps, ss = [], []
    for pair in load_benchmark(name, scale):
        sr = bicubic_upscale(pair.lr, scale)
        ps.append(psnr_y(sr, pair.hr, scale))
        ss.append(ssim_y(sr, pair.hr, scale))
    return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "images": len(ps)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, required=True)
    ap.add_argument("--datasets", default="Set5,Set14")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = {"scale": args.scale, "datasets": {}}
    for name in args.datasets.split(","):
        out["datasets"][name] = score(name, args.scale)
        print(f"{name:10s} {out['datasets'][name]['psnr']:.4f} dB  "
              f"SSIM {out['datasets'][name]['ssim']:.4f}", flush=True)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
