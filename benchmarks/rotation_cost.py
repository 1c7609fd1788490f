"""What the online rotations cost on ORT's CPU, against what they buy in PSNR, by how strict the
per-site choice is (``calibrate.site_choice.choose_rotations``'s ``margin``).

    python -m benchmarks.rotation_cost --model ngswin-x2 --bits 4 --threads 2 --runs 7 \\
        --out results/rotation_cost/ngswin_w4.json

A rotated linear input costs one FP32 ``MatMul(x, R)`` in the engine (``P/Rotate``). ``auto``
rotates a site when the rotated input's output error is below ``margin`` x the plain one; one
pass gives every site's two errors, so each margin's site set comes from the same report. Each
variant is DOBI on the ``ort`` grid with per-channel weights and the attention products FP (what
``build`` makes, without GPTQ and DQC), scored on the held-out BSD200 patches (never a test set),
exported at the 320x180 frame and timed in one process, interleaved run by run (median), beside
the FP32 graph. Run on an otherwise idle CPU. Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

FRAME = (180, 320)  # LR (height, width)
log = logging.getLogger("rotation_cost")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ngswin-x2")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--margins", default="0.05,0.25,0.5,0.9",
                    help="margins to compare with no rotation (0.9: today's auto)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (atomically)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from benchmarks.frame_graphs import markdown_table, run_record, score_and_time
    from calibrate.api import pool_data
    from calibrate.dobi import init_bounds
    from calibrate.dqc import val_psnr
    from calibrate.prepare import QuantRecipe, prepare
    from calibrate.site_choice import choose_rotations
    from edge_sr.checkpoints import load_model
    from edge_sr.fileio import write_json

    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    tile = lm.model.size_requirements.fit(*FRAME)
    data = pool_data(lm.scale, "paper", seed=0)
    base = QuantRecipe(bits=a.bits, grid="ort", weight_grid="channel", fp_sites=("qk", "pv"))
    _, report = choose_rotations(lm.model, base, data.calib_lr)
    variants = [("no rotation", ())]
    for m in (float(v) for v in a.margins.split(",")):
        sites = tuple(s for s, r in report.items()
                      if r["rotated"] is not None and r["rotated"] < m * r["plain"])
        variants.append((f"margin {m:g}", sites))

    def student(sites):
        st = prepare(lm.model, replace(base, rotate=sites))
        init_bounds(st, data.calib_lr)
        return st

    rows, ms = score_and_time(lm.model, [(label, partial(student, sites))
                                         for label, sites in variants],
                              tile, data.val, lm.scale, a.threads, a.runs, log)
    for row, (_, sites) in zip(rows, variants):
        row["rotated_sites"] = len(sites)
    out = run_record(a, tile, ms["FP32"], val_psnr(lm.model, *data.val, lm.scale), rows,
                     sites=len(report))
    print(markdown_table(
        ["rotation choice", "sites rotated", "ms", "vs ORT FP32", "held-out PSNR"],
        [[r["variant"], f"{r['rotated_sites']} / {len(report)}", f"{r['ms']:.0f}",
          f"{r['speed_vs_fp32']:.2f}x", f"{r['val_psnr']:.3f}"] for r in rows]))
    if a.out:
        write_json(a.out, out)


if __name__ == "__main__":
    main()
