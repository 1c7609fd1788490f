"""DOBI wall time: all 384 quantizers of SwinIR-light on 32 calibration patches of 64x64.

Target (issue 3): <= 2 min on the 2-core CPU. Reports the FP pass and the search time separately,
for the default (1M-element random subset per large tensor) and, with ``--exact``, for the exact
objective over every element.

    python -m benchmarks.dobi_time [--scale 2] [--bits 4] [--exact] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import time
from pathlib import Path

import torch

from calibrate.api import pool_data
from calibrate.dobi import DEFAULT_MAX_ELEMENTS, dobi_bounds
from calibrate.prepare import QuantRecipe, prepare
from edge_sr.fileio import versions, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--bits", default="4", help="comma-separated; searched in one pass")
    ap.add_argument("--exact", action="store_true", help="also time the exact (no subset) search")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/bench/dobi_time.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from edge_sr.checkpoints import load_model

    lm = load_model(f"swinir-light-x{args.scale}-ref")
    calib = pool_data(args.scale, "fast", seed=0).calib_lr
    bits = [int(b) for b in args.bits.split(",")]
    student = prepare(lm.model, QuantRecipe(bits[0]))
    t0 = time.perf_counter()
    with torch.no_grad():
        lm.model(calib)
    fp_seconds = time.perf_counter() - t0
    runs = {}
    for label, cap in [("subset", DEFAULT_MAX_ELEMENTS)] + ([("exact", None)] if args.exact else []):
        _, rep = dobi_bounds(student, calib, bits, max_elements=cap)
        runs[label] = {"max_elements": cap, "seconds": rep.seconds,
                       "search_seconds": rep.rule_seconds, "quantizers": rep.quantizers}
        print(f"DOBI ({label}): {rep.quantizers} quantizers, bits {bits}: {rep.seconds:.1f} s "
              f"(search {rep.rule_seconds:.1f} s)")
    load = os.getloadavg()
    out = {"calibration": list(calib.shape), "bits": bits, "threads": args.threads,
           "fp_forward_seconds": fp_seconds, "runs": runs, "loadavg": load,
           "cpu": subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:20],
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "versions": versions()}
    print(f"plain FP forward of the same batch: {fp_seconds:.1f} s; load average {load}")
    write_json(Path(args.out), out)


if __name__ == "__main__":
    main()
