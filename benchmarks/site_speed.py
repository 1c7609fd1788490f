"""Per-site choices by measurement (issue 18 item 3): for each kind of quantization site, is the
integer path faster than FP on ORT's CPU, and what does quantizing it cost in PSNR?

    python -m benchmarks.site_speed --model swinir-light-x2-ref --bits 8 --threads 2 \\
        --runs 7 --out results/site_speed/swinir_w8.json

One DOBI calibration on the ``ort`` grid (BSD200 calibration patches) gives every quantizer its
bounds; each variant keeps one kind of site (``calibrate.prepare.SITE_KINDS``) in floating point
in the student and in the engine alike, with the other bounds unchanged (DOBI searches each
quantizer on FP activations, so they do not depend on the other sites). Every variant and the
FP32 graph are exported at the frame shape and timed in one process, interleaved run by run
(median). PSNR is measured on the held-out BSD200 patches (``data/train``, never a test set), on
the fake-quant student, which the engine reproduces (``benchmarks.engine_exactness``).
Run on an otherwise idle CPU. Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path

FRAME = (180, 320)  # LR (height, width)
log = logging.getLogger("site_speed")


def _variants(kinds: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    return [("all quantized", ())] + [(f"{k} FP", (k,)) for k in kinds]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="swinir-light-x2-ref")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--size", default="320x180", help="LR frame WIDTHxHEIGHT")
    ap.add_argument("--kinds", default=None, help="site kinds (default: all of SITE_KINDS)")
    ap.add_argument("--also", default="", help="extra variants: '+'-joined kinds, comma-separated "
                    "(e.g. qk+pv)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (atomically)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from benchmarks.frame_graphs import markdown_table, run_record, score_and_time
    from calibrate.api import pool_data
    from calibrate.dobi import init_bounds
    from calibrate.dqc import val_psnr
    from calibrate.prepare import SITE_KINDS, QuantRecipe, prepare
    from edge_sr.checkpoints import load_model
    from edge_sr.fileio import write_json

    torch.set_num_threads(a.threads)
    w, h = (int(v) for v in a.size.lower().split("x"))
    lm = load_model(a.model)
    tile = lm.model.size_requirements.fit(h, w)
    kinds = a.kinds.split(",") if a.kinds else list(SITE_KINDS)
    variants = _variants(kinds) + [(f"{v.replace('+', ' + ')} FP", tuple(v.split("+")))
                                   for v in filter(None, a.also.split(","))]
    data = pool_data(lm.scale, "paper", seed=0)
    base = prepare(lm.model, QuantRecipe(bits=a.bits, grid="ort"))
    t0 = time.perf_counter()
    init_bounds(base, data.calib_lr)
    log.info("DOBI %.0f s", time.perf_counter() - t0)
    state = base.state_dict()
    fp_psnr = val_psnr(lm.model, *data.val, lm.scale)

    def student(fp_sites):  # the one DOBI calibration, minus the sites kept FP
        st = prepare(lm.model, QuantRecipe(bits=a.bits, grid="ort", fp_sites=fp_sites))
        missing = st.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise AssertionError(f"{fp_sites}: bounds not carried over: {missing[:3]}")
        return st

    rows, ms = score_and_time(lm.model, [(label, partial(student, fp_sites))
                                         for label, fp_sites in variants],
                              tile, data.val, lm.scale, a.threads, a.runs, log)
    for row, (_, fp_sites) in zip(rows, variants):
        row["fp_sites"] = list(fp_sites)
    base_ms, base_psnr = ms["all quantized"], rows[0]["val_psnr"]
    for row in rows:
        row |= dict(ms_saved_by_quantizing=ms[row["variant"]] - base_ms,
                    psnr_cost_of_quantizing=row["val_psnr"] - base_psnr)
    out = run_record(a, tile, ms["FP32"], fp_psnr, rows, grid="ort")
    print(markdown_table(
        ["variant", "ms", "vs ORT FP32", "ms the site's integer path saves", "held-out PSNR",
         "PSNR the site's quantization costs"],
        [[r["variant"], f"{r['ms']:.0f}", f"{r['speed_vs_fp32']:.2f}x",
          f"{r['ms_saved_by_quantizing']:+.0f}", f"{r['val_psnr']:.3f}",
          f"{r['psnr_cost_of_quantizing']:+.3f}"] for r in rows]))
    if a.out:
        write_json(a.out, out)


if __name__ == "__main__":
    main()
