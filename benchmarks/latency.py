"""Latency of an engine against its FP32 graph on ONNX Runtime, for a 320x180 -> 640x360 x2 frame.

    python -m benchmarks.latency [--engine engines/swinir-light-x2-w4a4] [--threads 2] [--runs 20]
    python -m benchmarks.latency --tiling      # tiled FP graph vs whole-image PyTorch, Set5+Set14

Writes results/bench/latency.json (or tiling.json) and prints a Markdown table with the command,
date and CPU, for docs/results/runtime.md. The FP32 and quantized graphs run interleaved, frame by
frame, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from edge_sr.fileio import versions, write_json


def latency(args) -> dict:
    from runtime.profile import ProfileConfig, profile

    res = profile(ProfileConfig(engine=args.engine, input_size=(180, 320), runs=args.runs,
                                warmup=args.warmup, compare=True, threads=args.threads,
                                json_path=Path(args.out) / "latency_profile.json"))
    rows = ["| graph | precision | p50 ms | p90 ms | p99 ms | frames/s | peak RSS increase MiB |",
            "|---|---|---|---|---|---|---|"]
    for k, v in res["variants"].items():
        rows.append(f"| {k} | {v['precision']} | {v['p50_ms']:.0f} | {v['p90_ms']:.0f} | "
                    f"{v['p99_ms']:.0f} | {v['fps']:.3f} | {v['memory']['peak_rss_increase_mib']:.0f} |")
    rows.append(f"\nFP32 / quantized p50: {res['ratio_fp32_over_quantized_p50']:.2f}x; "
                f"{res['tiles_per_frame']} tiles of {res['tile'][1]}x{res['tile'][0]} per frame "
                f"(overlap {res['overlap']}); {res['device']}")
    return {"profile": res, "table": "\n".join(rows)}


def tiling(args) -> dict:
    """Tiled 64x64 FP ONNX graph vs whole-image PyTorch, Y-PSNR on Set5 and Set14 (x2)."""
    import tempfile

    import torch

    from edge_sr.checkpoints import load_model
    from edge_sr.data import load_benchmark
    from edge_sr.data.images import to_tensor, to_uint8
    from edge_sr.metrics import psnr_y
    from edge_sr.onnx_export import export_fp_onnx
    from runtime.backends.onnxruntime import OrtBackend
    from runtime.tiling import default_overlap, run_tiled

    torch.set_num_threads(args.threads)
    lm = load_model("swinir-light-x2-ref", scale=2)
    tile = (64, 64)
    with tempfile.TemporaryDirectory() as d:
        be = OrtBackend(export_fp_onnx(lm.model, Path(d) / "fp.onnx", tile=tile),
                        threads=args.threads)
        out = {"tile": list(tile), "overlap": default_overlap(tile), "sets": {}}
        for name in ("Set5", "Set14"):
            rows = []
            for p in load_benchmark(name, 2):
                x = to_tensor(p.lr)
                with torch.no_grad():
                    whole = psnr_y(to_uint8(lm.model(x)), p.hr, 2)
                sr = torch.from_numpy(run_tiled(be, x.numpy()))
                rows.append({"image": p.name, "whole": whole, "tiled": psnr_y(to_uint8(sr), p.hr, 2)})
                print(name, rows[-1], file=sys.stderr, flush=True)
            out["sets"][name] = {"whole_db": sum(r["whole"] for r in rows) / len(rows),
                                 "tiled_db": sum(r["tiled"] for r in rows) / len(rows),
                                 "max_abs_image_diff_db": max(abs(r["tiled"] - r["whole"])
                                                              for r in rows),
                                 "images": rows}
    lines = ["| set | whole-image PyTorch (dB) | tiled FP ONNX (dB) | difference | worst image |",
             "|---|---|---|---|---|"]
    for k, v in out["sets"].items():
        lines.append(f"| {k} | {v['whole_db']:.4f} | {v['tiled_db']:.4f} | "
                     f"{v['tiled_db'] - v['whole_db']:+.4f} | {v['max_abs_image_diff_db']:.4f} |")
    return {"tiling": out, "table": "\n".join(lines)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="engines/swinir-light-x2-w4a4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--tiling", action="store_true", help="measure tiled vs whole-image PSNR")
    args = ap.parse_args(argv)
    from runtime.backends.onnxruntime import cpu_model

    t0 = time.perf_counter()
    res = tiling(args) if args.tiling else latency(args)
    res |= {"command": "python -m benchmarks.latency " + " ".join(argv or sys.argv[1:]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "threads": args.threads, "versions": versions(),
            "seconds": round(time.perf_counter() - t0, 1)}
    path = Path(args.out) / ("tiling.json" if args.tiling else "latency.json")
    write_json(path, res)
    print(f"`{res['command']}` on {res['date']}, CPU {res['cpu']}, {args.threads} threads\n")
    print(res["table"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
