"""Exactness of built engines on a benchmark set: the engine against its own fake-quant model,
both run through the engine's tiles (same tile shape, padding and blending), so the difference is
export + runtime error only.

    python -m benchmarks.engine_exactness engines/speed/* [--datasets Set5] [--json F]

A whole-image fake-quant score (``edge-sr eval --calibration``) is not the right reference for a
fixed-shape engine: the model pads a whole image to its own multiple, while the engine's tiler
mirror-pads each tile to the engine's shape, and the two paddings give different border pixels.
The calibration file is the one the engine's manifest names, in the build cache. Reporting only:
nothing is chosen on these sets. Benchmarks are not tests.

``--noise-floor`` adds a third row: the fake-quant model against itself with its input moved by
Gaussian noise of ``--noise`` (default 1e-7, about one float32 ulp of a pixel near 1.0). A low-bit
model is chaotic: float32 summation-order noise moves values across rounding midpoints of the
next quantizer, and each one-level step propagates. No engine can be closer to the fake-quant
model than the model is to itself under such noise, so this row is the floor of the exactness
figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class _InputNoise:
    """Wraps a torch SR module: adds fixed-seed Gaussian noise of std ``sigma`` to each input."""

    def __init__(self, model, sigma: float, seed: int = 0) -> None:
        import torch

        self.model, self.sigma = model, sigma
        self.gen = torch.Generator().manual_seed(seed)

    def eval(self):
        return self

    def __call__(self, x):
        import torch

        return self.model(x + self.sigma * torch.randn(x.shape, generator=self.gen))


def engine_exactness(engine_dir: str, datasets: list[str], threads: int = 1,
                     noise: float | None = None) -> dict:
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
    if noise:
        preds["noise_floor"] = BackendPredictor(
            TorchBackend(_InputNoise(student, noise), m.scale, tuple(m.tile), m.batch),
            "fake-quant + input noise", overlap=m.overlap)
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
        if noise:
            n = res["noise_floor"].datasets[d]
            per_n = {i.name: i.psnr for i in n.images}
            worst_n = max(abs(per_n[i.name] - i.psnr) for i in f.images)
            out[d].update(noise=noise, noise_floor_psnr=n.psnr, noise_floor_delta_db=n.psnr - f.psnr,
                          noise_floor_worst_image_delta_db=worst_n)
            print(f"{engine_dir} {d}: fake-quant with input noise {noise:g}: {n.psnr:.4f} dB, "
                  f"delta {n.psnr - f.psnr:+.4f} dB, worst image {worst_n:.4f} dB (the floor)")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--datasets", default="Set5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--noise-floor", action="store_true",
                    help="also score the fake-quant model with its input moved by --noise")
    ap.add_argument("--noise", type=float, default=1e-7)
    a = ap.parse_args(argv)
    rows = [engine_exactness(e, a.datasets.split(","), a.threads,
                             a.noise if a.noise_floor else None) for e in a.engines]
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
