"""Frame-shaped graphs: file sizes, and one shared qkv quantizer against three, timed in ORT.

    python -m benchmarks.frame_graphs sizes [--models swinir-light-x2-ref,ngswin-x2]
    python -m benchmarks.frame_graphs qkv --model swinir-light-x2-ref [--threads 2 --runs 5]

``sizes`` exports, at the 320x180 frame padded to each model's window, the FP32 graph
(``edge_sr.onnx_export``) and QDQ files (``calibrate.export_qdq``, ``--weights auto``) of DOBI
students on random calibration patches: W8A8 and W4A4 on the ``ort`` grid with FP16 FP weights
(what ``build`` makes), W4A4 on ``ort`` with FP32 FP weights, and W4A4 on ``real``; file sizes do
not depend on the bound values. Each file is split into weights (initializers) and graph
(nodes, names, metadata). ``qkv`` exports W8A8 ``ort`` graphs with the paper's
three qkv input quantizers and with one shared (``--shared-qkv-input``) and times them in one
process, interleaved run by run (median). Run on an otherwise idle CPU. Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

FRAME = (180, 320)  # LR (height, width)


def _student(model, bits: int, grid: str, qkv_separation: bool = True,
             fp_weights: str = "fp32"):
    import torch

    from calibrate.dobi import init_bounds
    from calibrate.prepare import QuantRecipe, prepare

    st = prepare(model, QuantRecipe(bits=bits, grid=grid, qkv_separation=qkv_separation,
                                    fp_weights=fp_weights))
    init_bounds(st, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    return st


def _qdq(student, tile, path: Path) -> Path:
    from calibrate.export_qdq import ExportConfig, export_qdq

    return export_qdq(student, ExportConfig(target="ort", tile=tile), path)


def _weight_bytes(path: Path) -> int:
    import onnx

    return sum(t.ByteSize() for t in onnx.load(str(path)).graph.initializer)


def sizes(a: argparse.Namespace) -> None:
    from edge_sr.checkpoints import load_model
    from edge_sr.onnx_export import export_fp_onnx

    with tempfile.TemporaryDirectory() as d:
        for name in a.models.split(","):
            lm = load_model(name)
            tile = lm.model.size_requirements.fit(*FRAME)
            row = {"fp32": export_fp_onnx(lm.model, Path(d) / "fp32.onnx", tile=tile)}
            for bits, grid, fpw in ((8, "ort", "fp16"), (4, "ort", "fp16"), (4, "ort", "fp32"),
                                    (4, "real", "fp32")):
                row[f"w{bits}a{bits}_{grid}_{fpw}"] = _qdq(
                    _student(lm.model, bits, grid, fp_weights=fpw), tile,
                    Path(d) / f"w{bits}_{grid}_{fpw}.onnx")
            mb = {k: os.path.getsize(p) / 1e6 for k, p in row.items()}
            n = sum(p.numel() for p in lm.model.parameters())
            print(f"{name} ({n / 1e6:.3f} M parameters, tile {tile[0]}x{tile[1]}):")
            for k, p in row.items():
                w = _weight_bytes(p) / 1e6
                print(f"  {k}: {mb[k]:.2f} MB ({mb[k] / mb['fp32']:.2f}x FP32); weights "
                      f"{w:.2f} MB ({w / _weight_bytes(row['fp32']) * 1e6:.2f}x FP32's), "
                      f"graph {mb[k] - w:.2f} MB")


def qkv(a: argparse.Namespace) -> None:
    import numpy as np
    import onnxruntime as ort

    from benchmarks.dqc_step import cpu_model
    from edge_sr.checkpoints import load_model

    lm = load_model(a.model)
    tile = lm.model.size_requirements.fit(*FRAME)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = a.threads, 1, 3
    with tempfile.TemporaryDirectory() as d:
        sess = {}
        for label, sep in (("three qkv quantizers", True), ("one shared", False)):
            p = _qdq(_student(lm.model, 8, "ort", sep), tile, Path(d) / f"{sep}.onnx")
            sess[label] = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, *tile), dtype=np.float32)
    times: dict[str, list[float]] = {k: [] for k in sess}
    for s in sess.values():
        s.run(None, {"lr": x})
    for _ in range(a.runs):
        for k, s in sess.items():
            t = time.perf_counter()
            s.run(None, {"lr": x})
            times[k].append(time.perf_counter() - t)
    print(f"{a.model} W8A8 ort, {tile[0]}x{tile[1]}, {a.threads} threads [{cpu_model()}]: " +
          ", ".join(f"{k} {1e3 * float(np.median(v)):.0f} ms" for k, v in times.items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sizes")
    s.add_argument("--models", default="swinir-light-x2-ref,ngswin-x2")
    q = sub.add_parser("qkv")
    q.add_argument("--model", default="swinir-light-x2-ref")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--runs", type=int, default=5)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    (sizes if a.cmd == "sizes" else qkv)(a)


if __name__ == "__main__":
    main()
