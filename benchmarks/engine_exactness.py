"""Exactness of built engines on a benchmark set: the engine against its own fake-quant model,
both run through the engine's tiles (same tile shape, padding and blending), so the difference is
export + runtime error only.

    python -m benchmarks.engine_exactness engines/speed/* [--datasets Set5] [--json F]

A whole-image fake-quant score (``edge-sr eval --calibration``) is not the right reference for a
fixed-shape engine: the model pads a whole image to its own multiple, while the engine's tiler
mirror-pads each tile to the engine's shape, and the two paddings give different border pixels.
The calibration file is the one the engine's manifest names, in the build cache. Reporting only:
nothing is chosen on these sets. Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def engine_exactness(engine_dir: str, datasets: list[str], threads: int = 1) -> dict:
    import torch

    from edge_sr.checkpoints import load_model
    from edge_sr.evaluate import EvalConfig, evaluate
    from runtime.calib_cache import cache_root, load_student
    from runtime.engine import open_engine
    from runtime.predictors import BackendPredictor, TorchBackend, engine_predictor

    torch.set_num_threads(threads)
    eng = open_engine(engine_dir)
    m = eng.manifest
    lm = load_model(m.model["path"], scale=m.scale)
    calib = cache_root() / m.calibration["file"]  # build's calibration cache
    student = load_student(calib, lm)
    preds = {"engine": engine_predictor(engine_dir, threads=threads),
             "fake_quant": BackendPredictor(TorchBackend(student, m.scale, tuple(m.tile), m.batch),
                                            "fake-quant", overlap=m.overlap)}
    out = {"engine": str(engine_dir), "tile": m.tile, "overlap": m.overlap}
    res = {k: evaluate(p, EvalConfig(datasets=datasets, scale=m.scale, ssim=False,
                                     progress=False)) for k, p in preds.items()}
    for d in datasets:
        e, f = res["engine"].datasets[d], res["fake_quant"].datasets[d]
        per = {i.name: i.psnr for i in e.images}
        worst = max(abs(per[i.name] - i.psnr) for i in f.images)
        out[d] = {"engine_psnr": e.psnr, "fake_quant_psnr": f.psnr,
                  "delta_db": e.psnr - f.psnr, "worst_image_delta_db": worst}
        print(f"{engine_dir} {d}: engine {e.psnr:.4f} dB, fake-quant {f.psnr:.4f} dB "
              f"(same tiles), delta {e.psnr - f.psnr:+.4f} dB, worst image {worst:.4f} dB")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--datasets", default="Set5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = [engine_exactness(e, a.datasets.split(","), a.threads) for e in a.engines]
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
