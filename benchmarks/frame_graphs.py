"""Frame-shaped graphs: file sizes, and one shared qkv quantizer against three, timed in ORT.

    python -m benchmarks.frame_graphs sizes [--models swinir-light-x2-ref,ngswin-x2]
    python -m benchmarks.frame_graphs qkv --model swinir-light-x2-ref [--threads 2 --runs 5]
    python -m benchmarks.frame_graphs shapes --model swinir-light-x2-ref [--threads 2 --runs 5]
    python -m benchmarks.frame_graphs time A.onnx B.onnx ... [--threads 2 --runs 9]
    python -m benchmarks.frame_graphs dynamic --model swinir-light-x2-ref [--threads 2 --runs 5]

``sizes`` exports, at the 320x180 frame padded to each model's window, the FP32 graph
(``edge_sr.onnx_export``) and QDQ files (``calibrate.export_qdq``, ``--weights auto``) of DOBI
students on random calibration patches: W8A8 and W4A4 on the ``ort`` grid with FP16 FP weights
(what ``build`` makes), W4A4 on ``ort`` with FP32 FP weights, and W4A4 on ``real``; file sizes do
not depend on the bound values. Each file is split into weights (initializers) and graph
(nodes, names, metadata). ``qkv`` exports W8A8 ``ort`` graphs with the paper's
three qkv input quantizers and with one shared (``--shared-qkv-input``) and times them in one
process, interleaved run by run (median). ``shapes`` times the FP32 graph and a W8A8 ``ort``
graph (the attention products FP, as ``build`` makes it) exported at several engine shapes, and
gives each shape's cost per LR pixel and per 320x180 frame once the tiler's overlapping tiles
are counted (``runtime.tiling``). ``time`` times ONNX files that take the same input (engines of
one model and shape, e.g. two exports of one calibration) in one process, interleaved run by
run, with the engine's session options, and prints their medians and ratios to the first.
``dynamic`` exports the FP32 graph once with a dynamic height and width
(``export_fp_onnx(dynamic=True)``; with ``--calibration F`` the QDQ graphs of that file,
``export_qdq(dynamic=True)``) and once per frame size with fixed shapes, and times each
fixed graph against the dynamic one at its size, interleaved. Run on an otherwise idle CPU.
Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

FRAME = (180, 320)  # LR (height, width)


def _student(model, bits: int, grid: str, qkv_separation: bool = True,
             fp_weights: str = "fp32", fp_sites: tuple[str, ...] = ()):
    import torch

    from calibrate.dobi import init_bounds
    from calibrate.prepare import QuantRecipe, prepare

    st = prepare(model, QuantRecipe(bits=bits, grid=grid, qkv_separation=qkv_separation,
                                    fp_weights=fp_weights, fp_sites=fp_sites))
    init_bounds(st, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    return st


def _qdq(student, tile, path: Path) -> Path:
    from calibrate.export_qdq import ExportConfig, export_qdq

    return export_qdq(student, ExportConfig(target="ort", tile=tile), path)


def _weight_bytes(path: Path) -> int:
    import onnx

    return sum(t.ByteSize() for t in onnx.load(str(path)).graph.initializer)


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (the form docs/results uses) from a header and string cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cpu_sessions(paths: dict[str, Path], threads: int) -> dict:
    """One ORT CPU session per graph, ``threads`` intra-op threads, warnings silenced."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    return {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            for k, p in paths.items()}


def interleaved_ms(sessions: dict, x, runs: int, on_round=None) -> dict[str, float]:
    """Median ms per session over ``runs`` rounds, the sessions run one after another in each
    round (so slow drift of the machine hits all alike), after one warm-up call each."""
    import numpy as np

    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"lr": x})
    for r in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"lr": x})
            times[k].append(time.perf_counter() - t)
        if on_round is not None:
            on_round(r)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def run_record(a, tile, fp32_ms: float, fp_psnr: float, rows: list[dict], **extra) -> dict:
    """The JSON record of a per-variant speed run (model, bits, tile, threads, runs, CPU model,
    date, FP32 ms and held-out PSNR, the rows), and its one-line summary printed."""
    from benchmarks.dqc_step import cpu_model

    out = dict(model=a.model, bits=a.bits, tile=list(tile), threads=a.threads, runs=a.runs,
               cpu=cpu_model(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               fp32_ms=fp32_ms, fp_val_psnr=fp_psnr, rows=rows, **extra)
    print(f"{a.model} W{a.bits}A{a.bits} ort, {tile[0]}x{tile[1]}, {a.threads} threads "
          f"[{out['cpu']}]; FP32 {fp32_ms:.0f} ms, FP held-out {fp_psnr:.3f} dB")
    return out


def score_and_time(fp_model, variants, tile, val, scale: int, threads: int, runs: int,
                   log=None) -> tuple[list[dict], dict[str, float]]:
    """For each ``(label, make_student)``: the student's held-out PSNR (``val`` = LR, HR) and
    its ``ort`` QDQ graph at ``tile``; then every graph and the FP32 one timed side by side
    (``interleaved_ms``). Returns one row per variant (``variant``, ``val_psnr``, ``ms``,
    ``speed_vs_fp32``) and the medians by label (``"FP32"`` included)."""
    import numpy as np

    from calibrate.dqc import val_psnr
    from calibrate.export_qdq import ExportConfig, export_qdq
    from edge_sr.onnx_export import export_fp_onnx

    rows, paths = [], {}
    with tempfile.TemporaryDirectory() as d:
        paths["FP32"] = export_fp_onnx(fp_model, Path(d) / "fp32.onnx", tile=tile)
        for i, (label, make_student) in enumerate(variants):
            st = make_student()
            rows.append(dict(variant=label, val_psnr=val_psnr(st, *val, scale)))
            paths[label] = export_qdq(st, ExportConfig(target="ort", tile=tile),
                                      Path(d) / f"v{i}.onnx")
            if log is not None:
                log.info("%s: held-out %.3f dB", label, rows[-1]["val_psnr"])
        sessions = cpu_sessions(paths, threads)
    x = np.random.default_rng(0).random((1, 3, *tile), dtype=np.float32)
    ms = interleaved_ms(sessions, x, runs, on_round=None if log is None else
                        lambda r: log.info("round %d/%d", r + 1, runs))
    for row in rows:
        row |= dict(ms=ms[row["variant"]], speed_vs_fp32=ms["FP32"] / ms[row["variant"]])
    return rows, ms


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

    from benchmarks.dqc_step import cpu_model
    from edge_sr.checkpoints import load_model

    lm = load_model(a.model)
    tile = lm.model.size_requirements.fit(*FRAME)
    with tempfile.TemporaryDirectory() as d:
        paths = {label: _qdq(_student(lm.model, 8, "ort", sep), tile, Path(d) / f"{sep}.onnx")
                 for label, sep in (("three qkv quantizers", True), ("one shared", False))}
        sess = cpu_sessions(paths, a.threads)
    x = np.random.default_rng(0).random((1, 3, *tile), dtype=np.float32)
    ms = interleaved_ms(sess, x, a.runs)
    print(f"{a.model} W8A8 ort, {tile[0]}x{tile[1]}, {a.threads} threads [{cpu_model()}]: " +
          ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items()))


def shapes(a: argparse.Namespace) -> None:
    import numpy as np

    from benchmarks.dqc_step import cpu_model
    from edge_sr.checkpoints import load_model
    from edge_sr.onnx_export import export_fp_onnx
    from runtime.tiling import TilePlan, default_overlap

    lm = load_model(a.model)
    req = lm.model.size_requirements
    tiles = sorted({req.fit(*(int(v) for v in t.split("x")[::-1])) for t in a.tiles.split(",")})
    fh, fw = req.fit(*FRAME)
    rows = []
    for tile in tiles:
        with tempfile.TemporaryDirectory() as d:
            st = _student(lm.model, 8, "ort", fp_sites=("qk", "pv"))
            paths = {"FP32": export_fp_onnx(lm.model, Path(d) / "fp32.onnx", tile=tile),
                     "W8A8": _qdq(st, tile, Path(d) / "w8.onnx")}
            sess = cpu_sessions(paths, a.threads)
        x = np.random.default_rng(0).random((1, 3, *tile), dtype=np.float32)
        ms = interleaved_ms(sess, x, a.runs)
        # tiles per 320x180 frame as upscale runs it: the frame padded to the tile if smaller
        n = len(TilePlan.make(max(FRAME[0], tile[0]), max(FRAME[1], tile[1]), tile,
                              default_overlap(tile)))
        rows.append((tile, ms, n))
    print(f"{a.model}, {a.threads} threads [{cpu_model()}]; frame 320x180 (engine shape for one "
          f"tile: {fh}x{fw})")
    print(markdown_table(
        ["engine shape (H x W)", "FP32 ms", "W8A8 ms", "FP32 us / LR pixel", "W8A8 us / LR pixel",
         "tiles per 320x180 frame", "FP32 ms / frame", "W8A8 ms / frame"],
        [[f"{th}x{tw}", f"{ms['FP32']:.0f}", f"{ms['W8A8']:.0f}",
          f"{1e3 * ms['FP32'] / (th * tw):.1f}", f"{1e3 * ms['W8A8'] / (th * tw):.1f}", str(n),
          f"{n * ms['FP32']:.0f}", f"{n * ms['W8A8']:.0f}"] for (th, tw), ms, n in rows]))


def time_files(a: argparse.Namespace) -> None:
    import numpy as np

    from benchmarks.dqc_step import cpu_model
    from runtime.backends.onnxruntime import OrtBackend

    paths = [Path(f) for f in a.files]
    backends = {str(f): OrtBackend(f, threads=a.threads) for f in paths}
    first = next(iter(backends.values()))
    h, w = first.tile
    x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    ms = interleaved_ms({k: b.session for k, b in backends.items()}, x, a.runs)
    base = ms[str(paths[0])]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_model()}, "
          f"{a.threads} threads, {a.runs} interleaved runs, input {h}x{w} LR")
    print(markdown_table(["graph", "MB", "median ms", "vs first"],
                         [[k, f"{Path(k).stat().st_size / 1e6:.2f}", f"{v:.0f}",
                           f"{base / v:.2f}x"] for k, v in ms.items()]))


def dynamic(a: argparse.Namespace) -> None:
    import numpy as np

    from benchmarks.dqc_step import cpu_model
    from edge_sr.checkpoints import load_model
    from edge_sr.cli.options import parse_size
    from edge_sr.onnx_export import export_fp_onnx

    sizes = [parse_size(f, "--frames") for f in a.frames.split(",")]
    if a.calibration:  # the QDQ graphs of a calibration file, as `edge-sr export` writes them
        from calibrate.calibfile import load_calibrated
        from calibrate.export_qdq import ExportConfig, export_qdq

        req = load_calibrated(a.calibration).model.size_requirements
        sizes = [req.fit(h, w) for h, w in sizes]  # QDQ graphs take whole windows

        def export(path, tile, dynamic=False):
            return export_qdq(a.calibration, ExportConfig(target="ort", tile=tile,
                                                          dynamic=dynamic), path)
        what = f"QDQ of {a.calibration}"
    else:
        fp = load_model(a.model).model

        def export(path, tile, dynamic=False):
            return export_fp_onnx(fp, path, tile=tile, dynamic=dynamic)
        what = f"{a.model}, FP32"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        dyn = export(Path(d) / "dynamic.onnx", sizes[0], dynamic=True)
        for h, w in sizes:
            fixed = export(Path(d) / f"fixed_{h}x{w}.onnx", (h, w))
            x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
            ms = interleaved_ms(cpu_sessions({"fixed": fixed, "dynamic": dyn}, a.threads), x,
                                a.runs)
            rows.append([f"{w}x{h}", f"{fixed.stat().st_size / 1e6:.2f}",
                         f"{dyn.stat().st_size / 1e6:.2f}", f"{ms['fixed']:.0f}",
                         f"{ms['dynamic']:.0f}", f"{ms['fixed'] / ms['dynamic']:.2f}x"])
    print(f"{what}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{cpu_model()}, {a.threads} threads, median of {a.runs} interleaved runs")
    print(markdown_table(["LR input", "fixed-shape MB", "dynamic MB", "fixed ms", "dynamic ms",
                          "dynamic speed vs fixed"], rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sizes")
    s.add_argument("--models", default="swinir-light-x2-ref,ngswin-x2")
    q = sub.add_parser("qkv")
    q.add_argument("--model", default="swinir-light-x2-ref")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--runs", type=int, default=5)
    h = sub.add_parser("shapes")
    h.add_argument("--model", default="swinir-light-x2-ref")
    h.add_argument("--tiles", default="64x64,96x96,128x128,192x192,320x180",
                   help="engine shapes WIDTHxHEIGHT (each padded to the model's window)")
    h.add_argument("--threads", type=int, default=2)
    h.add_argument("--runs", type=int, default=5)
    t = sub.add_parser("time")
    t.add_argument("files", nargs="+", help="ONNX files taking the same (1, 3, h, w) input")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--runs", type=int, default=9)
    y = sub.add_parser("dynamic")
    y.add_argument("--model", default="swinir-light-x2-ref")
    y.add_argument("--frames", default="320x180,640x360", help="LR sizes WIDTHxHEIGHT")
    y.add_argument("--calibration", default=None,
                   help="time the QDQ graphs (ort target) of this calibration file instead")
    y.add_argument("--threads", type=int, default=2)
    y.add_argument("--runs", type=int, default=5)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    {"sizes": sizes, "qkv": qkv, "shapes": shapes, "time": time_files,
     "dynamic": dynamic}[a.cmd](a)


if __name__ == "__main__":
    main()
