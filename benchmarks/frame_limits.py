"""The limit an engine can reach on a frame: the model's FLOPs against the CPU's peaks.

    python -m benchmarks.frame_limits --size 320x180 [--ghz 2.6 --cores 2] [--json F]

Counts the FP model's floating-point operations for one LR frame (``torch.utils.flop_counter``:
matrix products and convolutions, 2 per multiply-add; element-wise work such as softmax,
LayerNorm and GELU is not counted) and splits them into what an integer engine can run on
integer kernels (the linears and the attention products) and the rest (the convolutions, which
edge-sr keeps in FP32). The peaks are arithmetic, not measured: per core and cycle, AVX-512 FP32
FMA = ``--fp32-per-cycle`` FLOPs and VNNI (``vpdpbusd``) = ``--int8-per-cycle`` operations;
the defaults are AMD Zen 4's (two 256-bit pipes that run 512-bit instructions in two halves:
32 FP32 FLOPs and 128 INT8 ops per cycle). Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_sr.fileio import write_json


def count(model_name: str, h: int, w: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edge_sr.checkpoints import load_model

    lm = load_model(model_name)
    x = torch.rand(1, 3, h, w)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        lm.model(x)
    per_op = {str(k).split(".")[-1]: int(v) for k, v in fc.get_flop_counts()["Global"].items()}
    conv = sum(v for k, v in per_op.items() if "conv" in k)
    total = int(fc.get_total_flops())
    return {"model": model_name, "lr_hw": [h, w], "gflops": total / 1e9,
            "gflops_matmul": (total - conv) / 1e9, "gflops_conv": conv / 1e9, "per_op": per_op}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="swinir-light-x2-ref,ngswin-x2")
    ap.add_argument("--size", default="320x180", help="LR frame WxH")
    ap.add_argument("--ghz", type=float, default=2.6)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--fp32-per-cycle", type=float, default=32)
    ap.add_argument("--int8-per-cycle", type=float, default=128)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))
    fp32_peak = a.ghz * a.cores * a.fp32_per_cycle  # GFLOP/s
    int8_peak = a.ghz * a.cores * a.int8_per_cycle  # GOP/s
    rows = []
    for m in a.models.split(","):
        r = count(m, h, w)
        r["ms_at_fp32_peak"] = r["gflops"] / fp32_peak * 1e3
        # integer products at the INT8 peak, convolutions at the FP32 peak
        r["ms_at_int8_peak"] = (r["gflops_matmul"] / int8_peak + r["gflops_conv"] / fp32_peak) * 1e3
        rows.append(r)
        print(f"{m} {w}x{h}: {r['gflops']:.1f} GFLOP ({r['gflops_matmul']:.1f} in matrix "
              f"products, {r['gflops_conv']:.1f} in convolutions); at the FP32 peak "
              f"({fp32_peak:.0f} GFLOP/s) {r['ms_at_fp32_peak']:.0f} ms, with the products at the "
              f"INT8 peak ({int8_peak:.0f} GOP/s) {r['ms_at_int8_peak']:.0f} ms")
    if a.json:
        write_json(a.json, {"peaks": {"fp32_gflops": fp32_peak, "int8_gops": int8_peak,
                                      "ghz": a.ghz, "cores": a.cores}, "rows": rows})


if __name__ == "__main__":
    main()
