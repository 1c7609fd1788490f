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
figure. ``--noise-seeds N`` draws the noise N times (seeds 0..N-1) and reports the spread of the
floor: its mean and largest |delta|, and how many draws move the set's PSNR at least as far as
the engine does.
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
                     noise: float | None = None, noise_seeds: int = 1) -> dict:
    """Set PSNR (dB) of the engine and of its fake-quant model through the same tiles, per set
    in ``datasets``; with ``noise``, also the fake-quant model with Gaussian input noise of that
    std, once per seed in ``range(noise_seeds)``. Returns the JSON-ready rows."""
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
    floors = [f"noise_floor_{k}" for k in range(noise_seeds)] if noise else []
    for k, name in enumerate(floors):
        preds[name] = BackendPredictor(
            TorchBackend(_InputNoise(student, noise, seed=k), m.scale, tuple(m.tile), m.batch),
            f"fake-quant + input noise (seed {k})", overlap=m.overlap)
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
        draws = []
        for k, name in enumerate(floors):
            n = res[name].datasets[d]
            per_n = {i.name: i.psnr for i in n.images}
            worst_n = max(abs(per_n[i.name] - i.psnr) for i in f.images)
            draws.append({"seed": k, "psnr": n.psnr, "delta_db": n.psnr - f.psnr,
                          "worst_image_delta_db": worst_n})
            print(f"{engine_dir} {d}: fake-quant with input noise {noise:g} (seed {k}): "
                  f"{n.psnr:.4f} dB, delta {n.psnr - f.psnr:+.4f} dB, worst image {worst_n:.4f} dB")
        if draws:
            first = draws[0]  # the single-seed keys, as before --noise-seeds
            out[d].update(noise=noise, noise_floor_psnr=first["psnr"],
                          noise_floor_delta_db=first["delta_db"],
                          noise_floor_worst_image_delta_db=first["worst_image_delta_db"],
                          noise_floor_draws=draws, **floor_summary(
                              [x["delta_db"] for x in draws], e.psnr - f.psnr))
            if len(draws) > 1:
                sm = out[d]
                print(f"{engine_dir} {d}: the floor over {len(draws)} seeds: mean |delta| "
                      f"{sm['noise_floor_mean_abs_delta_db']:.4f} dB, largest "
                      f"{sm['noise_floor_max_abs_delta_db']:.4f} dB; {sm['noise_floor_at_least_engine']} "
                      f"of {len(draws)} draws move the set as far as the engine does or further")
    return out


def floor_summary(deltas: list[float], engine_delta: float) -> dict:
    """The noise floor's spread: mean and largest |delta| (dB) over the draws, and how many
    draws have |delta| >= the engine's |delta|."""
    mags = [abs(x) for x in deltas]
    return {"noise_floor_mean_abs_delta_db": sum(mags) / len(mags),
            "noise_floor_max_abs_delta_db": max(mags),
            "noise_floor_at_least_engine": sum(m >= abs(engine_delta) for m in mags)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--datasets", default="Set5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--noise-floor", action="store_true",
                    help="also score the fake-quant model with its input moved by --noise")
    ap.add_argument("--noise", type=float, default=1e-7)
    ap.add_argument("--noise-seeds", type=int, default=1,
                    help="noise draws for the floor (seeds 0..N-1): its spread, not one draw")
    a = ap.parse_args(argv)
    if a.noise_seeds < 1:
        ap.error(f"--noise-seeds: expected a positive count, got {a.noise_seeds}")
    rows = [engine_exactness(e, a.datasets.split(","), a.threads,
                             a.noise if a.noise_floor else None, a.noise_seeds)
            for e in a.engines]
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
