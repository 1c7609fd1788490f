"""FP throughput of ``edge-sr eval``: Set5 x2, the x2 reference checkpoint, PyTorch CPU, 2 threads.

Reports LR megapixels per second, the median of ``--runs`` timed passes after one warm-up pass,
both for the whole evaluation loop (model + uint8 conversion + PSNR/SSIM) and for the model
alone. Writes ``results/bench/eval_throughput.json`` and prints it. The machine's load average is
recorded because shared CPUs make such figures vary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from edge_sr.allocator import keep_freed_memory
from edge_sr.data import load_benchmark
from edge_sr.evaluate import evaluate_pairs
from edge_sr.fileio import versions, write_json
from edge_sr.hardware import cpu_model
from edge_sr.paths import REPO_ROOT
from runtime.predictors import make_predictor


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="swinir-light-x2-ref")
    ap.add_argument("--dataset", default="Set5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "bench" / "eval_throughput.json"))
    args = ap.parse_args(argv)

    keep_freed_memory()
    pred = make_predictor(args.model, threads=args.threads)
    pairs = load_benchmark(args.dataset, pred.scale)
    mp = sum(p.lr.shape[0] * p.lr.shape[1] for p in pairs) / 1e6
    evaluate_pairs(pred, pairs, pred.scale, label=args.dataset, progress=False)  # warm-up
    loop, model = [], []
    psnr = None
    for _ in range(max(1, args.runs)):
        t0 = time.perf_counter()
        res = evaluate_pairs(pred, pairs, pred.scale, label=args.dataset, progress=False)
        loop.append(time.perf_counter() - t0)
        model.append(res.seconds)
        psnr = res.psnr
    out = {
        "benchmark": "eval_throughput",
        "model": pred.name,
        "dataset": args.dataset,
        "scale": pred.scale,
        "backend": "pytorch-cpu-fp32",
        "threads": torch.get_num_threads(),
        "runs": len(loop),
        "lr_megapixels": round(mp, 6),
        "eval_seconds": [round(t, 3) for t in loop],
        "model_seconds": [round(t, 3) for t in model],
        "eval_lr_mpix_per_s": round(mp / statistics.median(loop), 5),
        "model_lr_mpix_per_s": round(mp / statistics.median(model), 5),
        "psnr": round(psnr, 4),
        "cpu": cpu_model(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " UTC",
        "versions": versions(),
    }
    write_json(args.out, out)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
