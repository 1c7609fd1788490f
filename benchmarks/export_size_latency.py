"""QDQ export benchmarks: file size, ORT latency (FP32 vs QDQ) and export fidelity on Set5/Set14.

    python -m benchmarks.export_size_latency size       # bytes: FP32 ONNX vs QDQ INT8/INT4
    python -m benchmarks.export_size_latency latency    # ORT CPU, 2 threads, 64x64 and 256x256
    python -m benchmarks.export_size_latency fidelity   # ORT vs fake-quant PSNR, bits x scales
    python -m benchmarks.export_size_latency fidelity-table FILE...   # its RESULTS table

Students are the reference SwinIR-light checkpoints calibrated by DOBI (``calibrate.dobi``, on
BSD200 calibration patches; min/max bounds if DOBI is not importable). Each mode writes
``results/bench/export_<mode>.json`` (atomically, after every row, so partial runs keep their rows).
Latency runs FP32 and quantized sessions interleaved, one warm-up each, median of ``--runs``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from calibrate.export.ortcheck import fused_op_types, integer_coverage, make_session
from calibrate.export_qdq import ExportConfig, export_qdq
from edge_sr.data.datasets import center_crop
from edge_sr.fileio import atomic_path, versions, write_json
from edge_sr.hardware import cpu_model
from edge_sr.onnx_tidy import share_constants
from edge_sr.paths import REPO_ROOT

log = logging.getLogger("benchmarks.export")
OUT_DIR = REPO_ROOT / "results" / "bench"


def fp_model(scale: int):
    from edge_sr.checkpoints import load_model

    return load_model(f"swinir-light-x{scale}-ref", scale).model


def calib_lr(scale: int, n: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` LR patches from the calibration split of BSD200 (never the test sets)."""
    from edge_sr.data.pool import load_pair, pool_split

    rng = np.random.default_rng(seed)
    paths = pool_split().calib[:n]
    out = []
    for p in paths:
        lr = load_pair(p, scale).lr
        i, j = (int(rng.integers(0, d - size + 1)) for d in lr.shape[:2])
        out.append(torch.from_numpy(lr[i:i + size, j:j + size].transpose(2, 0, 1).copy()))
    return torch.stack(out).float() / 255


def students(scale: int, bits_list: list[int], calib: torch.Tensor, fp=None) -> dict:
    """{bits: (fake-quant model, method)} for the reference checkpoint, one DOBI pass for all."""
    from calibrate.prepare import QuantRecipe, prepare

    fp = fp if fp is not None else fp_model(scale)
    try:
        from calibrate.dobi import apply_bounds, dobi_bounds
    except ImportError:
        from calibrate.export.students import minmax_student

        return {b: (minmax_student(fp, calib, b, shrink=1.0), "minmax") for b in bits_list}
    key = hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:12]
    cache = OUT_DIR / "cache" / f"dobi_x{fp.scale}_{key}_{'-'.join(map(str, bits_list))}.pt"
    if cache.exists():  # same checkpoint scale, same patches, same bits: same bounds
        bounds = torch.load(cache)
    else:
        bounds, _ = dobi_bounds(prepare(fp, QuantRecipe(bits=bits_list[0])), calib, bits_list)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            torch.save(bounds, tmp)
    out = {}
    for b in bits_list:
        st = prepare(fp, QuantRecipe(bits=b))
        apply_bounds(st, bounds[b])
        out[b] = (st, "dobi")
    return out


def onnx_bytes(path: Path) -> dict:
    """File bytes, bytes after sharing identical traced constants (the attention masks), and
    where the bytes go: quantized-linear codes, FP conv weights, other float constants."""
    proto = onnx.load(str(path))
    raw = path.stat().st_size
    saved = share_constants(proto)
    cats = {"quantized_weight_codes": 0, "conv_weights": 0, "other_constants": 0}
    for t in proto.graph.initializer:
        n = len(t.raw_data) or t.ByteSize()
        if re.search(r"/W\d+$", t.name):
            cats["quantized_weight_codes"] += n
        elif len(t.dims) == 4 and ("conv" in t.name or "upsample" in t.name):
            cats["conv_weights"] += n
        else:
            cats["other_constants"] += n
    return {"file_bytes": raw, "shared_bytes": raw - saved, **cats}


def run_size(args) -> dict:
    from edge_sr.onnx_export import export_fp_onnx

    rows = []
    out = {"benchmark": "export_size", "tile": args.tile, "rows": rows, "versions": versions()}
    fp = fp_model(2)
    calib = calib_lr(2, n=args.calib)
    with tempfile.TemporaryDirectory() as d:
        fp_path = export_fp_onnx(fp, Path(d) / "fp32.onnx", tile=tuple(args.tile), opset=20)
        fp_row = {"graph": "fp32", **onnx_bytes(fp_path)}
        fp_row["fp32_weight_bytes_of_quantized_linears"] = sum(
            m.weight.numel() * 4 for n, m in fp.named_modules()
            if isinstance(m, torch.nn.Linear) and ".residual_group." in n)
        rows.append(fp_row)
        for bits, (st, method) in students(2, args.bits, calib, fp).items():
            for wc in ("int8", "auto"):
                p = export_qdq(st, ExportConfig(tile=tuple(args.tile), weight_container=wc),
                               Path(d) / f"q{bits}_{wc}.onnx")
                rows.append({"graph": f"qdq W{bits}A{bits} weights={wc}", "bits": bits,
                             "calibration": method, **onnx_bytes(p)})
                write_json(args.out, out)
    return out


def run_latency(args) -> dict:
    from edge_sr.onnx_export import export_fp_onnx

    rows = []
    out = {"benchmark": "export_latency", "threads": args.threads, "runs": args.runs,
           "load_average": os.getloadavg(), "cpu": cpu_model(), "rows": rows, "versions": versions()}
    fp = fp_model(2)
    calib = calib_lr(2, n=args.calib)
    studs = students(2, args.bits, calib, fp)
    with tempfile.TemporaryDirectory() as d:
        for tile in args.tiles:
            t = (tile, tile)
            graphs = {"fp32": export_fp_onnx(fp, Path(d) / f"fp_{tile}.onnx", tile=t, opset=20)}
            for b, (st, _) in studs.items():
                for wc in ("int8", "auto"):
                    graphs[f"W{b}A{b} weights={wc}"] = export_qdq(
                        st, ExportConfig(tile=t, weight_container=wc), Path(d) / f"q{b}{wc}.onnx")
            sessions = {k: make_session(p, threads=args.threads) for k, p in graphs.items()}
            x = np.random.default_rng(0).random((1, 3, tile, tile), dtype=np.float32)
            times = {k: [] for k in sessions}
            for s in sessions.values():
                s.run(None, {"lr": x})  # warm-up
            for _ in range(args.runs):  # interleaved, so load drifts hit every graph alike
                for k, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, {"lr": x})
                    times[k].append((time.perf_counter() - t0) * 1e3)
            base = statistics.median(times["fp32"])
            for k, ts in times.items():
                cov = integer_coverage(fused_op_types(graphs[k])) if k != "fp32" else None
                rows.append({"tile": tile, "graph": k, "median_ms": statistics.median(ts),
                             "min_ms": min(ts), "speed_vs_fp32": base / statistics.median(ts),
                             "runs_ms": [round(v, 2) for v in ts], "ort_kernels": cov})
            write_json(args.out, out)
    out["load_average_end"] = os.getloadavg()
    write_json(args.out, out)
    return out


def run_fidelity(args) -> dict:
    from calibrate.export.fidelity import dataset_fidelity
    from edge_sr.data import load_benchmark

    rows = []
    out = {"benchmark": "export_fidelity", "tile": args.tile, "target": args.target,
           "crop": args.crop,
           "rows": rows, "versions": versions()}
    with tempfile.TemporaryDirectory() as d:
        for scale in args.scales:
            fp = fp_model(scale)
            calib = calib_lr(scale, n=args.calib)
            for bits, (st, method) in students(scale, args.bits, calib, fp).items():
                p = export_qdq(st, ExportConfig(target=args.target, tile=tuple(args.tile)),
                               Path(d) / "q.onnx")
                sess = make_session(p, threads=args.threads)
                for ds in args.datasets:
                    pairs = [center_crop(p, args.crop, scale) if args.crop else p
                             for p in load_benchmark(ds, scale)]
                    r = dataset_fidelity(st, sess, pairs, tuple(args.tile), scale,
                                         f"{ds} x{scale} W{bits}A{bits}")
                    rows.append({"dataset": ds, "scale": scale, "bits": bits,
                                 "calibration": method, **r})
                    log.info("%s x%d W%dA%d: torch %.4f ort %.4f delta %+.5f max|u8| %d", ds,
                             scale, bits, bits, r["psnr_torch"], r["psnr_ort"], r["delta_psnr"],
                             r["max_abs_u8"])
                    write_json(args.out, out)
    return out


def fidelity_table(paths: list[str]) -> str:
    """Markdown rows of one or more fidelity JSONs (the RESULTS table)."""
    lines = ["| set | scale | bits | images | PSNR fake-quant (dB) | PSNR ORT (dB) | ΔPSNR (dB) | "
             "worst image \\|ΔPSNR\\| | max \\|Δ\\| (uint8 levels) | values differing | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            lines.append(
                f"| {r['dataset']} | x{r['scale']} | W{r['bits']}A{r['bits']} | "
                f"{len(r['per_image'])} | {r['psnr_torch']:.4f} | {r['psnr_ort']:.4f} | "
                f"{r['delta_psnr']:+.5f} | {r['max_abs_delta_psnr_image']:.5f} | "
                f"{r['max_abs_u8']} | {100 * r['frac_diff_u8']:.4f} % | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["size", "latency", "fidelity", "fidelity-table"])
    ap.add_argument("files", nargs="*", help="fidelity-table: the fidelity JSONs to print")
    ap.add_argument("--bits", type=int, nargs="+", default=None)
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--datasets", nargs="+", default=["Set5", "Set14"])
    ap.add_argument("--tile", type=int, nargs=2, default=[64, 64])
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--target", default="ort")
    ap.add_argument("--crop", type=int, default=None,
                    help="fidelity: score only each image's central CROP x CROP LR patch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--calib", type=int, default=4, help="calibration patches (64x64 LR)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.mode == "fidelity-table":
        print(fidelity_table(args.files))
        return {}
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.bits = args.bits or ([2, 3, 4, 8] if args.mode != "latency" else [4])
    args.out = args.out or str(OUT_DIR / f"export_{args.mode}.json")
    torch.set_num_threads(args.threads)
    run = {"size": run_size, "latency": run_latency, "fidelity": run_fidelity}[args.mode]
    out = run(args)
    log.info("wrote %s", args.out)
    return out


if __name__ == "__main__":
    main()
