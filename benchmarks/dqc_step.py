"""One DQC step against the model's own FP forward + backward, side by side in one run.

    python -m benchmarks.dqc_step --model ngswin-x2 --batch 16 --lr-patch 32 --json F

Writes ``step_ms`` (median of one DQC step: teacher forward without autograd, student
forward, output + feature loss, backward, Adam; ``calibrate.dqc.DQCStep``), ``fp_fwd_bwd_ms``
(median of a plain eager float32 forward + backward of the FP model without quantizers, the
gradient taken w.r.t. the input), ``ratio`` = step / fp, ``peak_rss_mb`` of each (each runs in its
own child process, so the peaks are separate), and ``lr_pixels_per_s`` of the DQC step. The two
measurements alternate ``--rounds`` times (child processes A, B, A, B, ...), so drift in the
machine's speed hits both. Each child first runs ``--warmup`` untimed steps (3: the heap grows to
a step's peak over the first two or three, page-faulting fresh memory in). ``--precision bf16``
times DQC under autocast (the FP baseline stays plain float32); ``--fused off`` times the eager
fake-quant ops instead of ``calibrate.fused_fq``'s kernels. ``--method edge-sr`` times the student
``edge-sr build`` trains (calibrated up to DQC first, in a child process: one to a few
minutes), and ``--calibration F`` the student of a calibration file, each with its method's DQC
settings.
Benchmarks are not tests: results go to ``--json`` and docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

from edge_sr.hardware import cpu_model  # noqa: F401  (other benchmarks import it from here)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind: str, args: dict, q) -> None:
    import os

    if args.get("fused", "on") == "off":
        os.environ["EDGE_SR_FUSED_FQ"] = "0"
    import torch

    from edge_sr.allocator import keep_freed_memory

    keep_freed_memory()  # EDGE_SR_MALLOC_TUNING=lean: return_freed_memory instead
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    from edge_sr.checkpoints import load_model

    dev = torch.device(args.get("device", "cpu"))
    lm = load_model(args["model"], device=str(dev))
    x = torch.rand(args["batch"], 3, args["lr_patch"], args["lr_patch"],
                   generator=torch.Generator().manual_seed(0)).to(dev)
    times = []

    def sync():  # GPU work is asynchronous: a step ends when its kernels do
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if kind == "fp":
        model = lm.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for i in range(args["warmup"] + args["steps"]):
            xi = x.clone().requires_grad_(True)
            sync()
            t = time.perf_counter()
            model(xi).sum().backward()
            sync()
            if i >= args["warmup"]:
                times.append(time.perf_counter() - t)
    else:
        from calibrate.dobi import init_bounds
        from calibrate.dqc import DQCConfig
        from calibrate.prepare import QuantRecipe, prepare

        try:
            from calibrate.dqc import DQCStep
        except ImportError:  # an older checkout (PYTHONPATH=<worktree>): the same step, inline
            DQCStep = _legacy_step()
        kw = dict(iterations=1, batch=args["batch"], lr_patch=max(8, args["lr_patch"]))
        if args.get("calibration"):  # the student a calibration made, with its method's DQC
            from dataclasses import asdict

            from calibrate.api import CalibrationConfig
            from calibrate.calibfile import load_calibrated

            cal = load_calibrated(args["calibration"], lm.model)
            student = cal.model
            method_cfg = CalibrationConfig(model=args["model"], bits=cal.meta.bits, output="-",
                                           method=cal.meta.method).dqc_config(lm.model)
            kw = asdict(method_cfg) | kw
        else:
            recipe = QuantRecipe(bits=args["bits"])
            student = prepare(lm.model, recipe)
            init_bounds(student, x[:2, :, :min(64, args["lr_patch"]), :min(64, args["lr_patch"])])
        if args["recompute"]:
            kw["recompute"] = True
        if args.get("precision", "fp32") != "fp32":
            kw["precision"] = args["precision"]
        trainer = DQCStep(student, lm.model, DQCConfig(**kw))
        for i in range(args["warmup"] + args["steps"]):
            sync()
            t = time.perf_counter()
            trainer.step(x)
            sync()
            if i >= args["warmup"]:
                times.append(time.perf_counter() - t)
        trainer.close()
    peak = _peak_rss_mb()
    if dev.type == "cuda":  # the GPU's peak, not the host's
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    q.put({"kind": kind, "times": times, "peak_rss_mb": peak})


def _legacy_step():
    """``DQCStep`` for checkouts that predate it: the loop body of their ``run_dqc``."""
    import torch

    from calibrate.dqc import _FeatureTap, feature_loss, output_loss
    from calibrate.prepare import bound_parameters

    class LegacyStep:
        def __init__(self, student, teacher, cfg):
            self.student, self.teacher, self.cfg = student.eval(), teacher.eval(), cfg
            self.params = bound_parameters(student)
            for p in self.params:
                p.requires_grad_(True)
            self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=cfg.betas)
            self.names = student.feature_modules()
            self.tap_s = _FeatureTap(student, self.names)
            self.tap_t = _FeatureTap(teacher, self.names)

        def step(self, lr):
            with torch.no_grad():
                out_t = self.teacher(lr)
            out_s = self.student(lr)
            loss = output_loss(out_s, out_t, self.cfg.feature_loss)
            loss = loss + self.cfg.feature_weight * sum(
                feature_loss(self.tap_s.out[n], self.tap_t.out[n], self.cfg.feature_loss)
                for n in self.names)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            return loss.detach()

        def close(self):
            self.tap_s.close()
            self.tap_t.close()

    return LegacyStep


def _calibrate_child(args: dict, out: str) -> None:
    import torch

    from calibrate.api import CalibrationConfig, calibrate

    torch.set_num_threads(args["threads"])
    calibrate(CalibrationConfig(model=args["model"], bits=args["bits"], output=out,
                                method="edge-sr", iterations=0))


def edge_sr_student(args: dict, folder: Path) -> Path:
    """Calibrate ``args["model"]`` with ``--method edge-sr`` up to DQC (smoothing, the rotations
    chosen per site, DOBI, GPTQ; ``iterations=0``) and return the file: edge-sr's student needs
    data for those, so the children load it instead of building a student themselves. It runs
    in a child process of its own: a child's peak RSS starts from its parent's."""
    out = folder / "edge_sr_student.pt"
    p = mp.get_context("spawn").Process(target=_calibrate_child, args=(args, str(out)))
    p.start()
    p.join()
    if p.exitcode != 0 or not out.is_file():
        raise SystemExit(f"dqc_step: the edge-sr calibration failed (exit {p.exitcode})")
    return out


def measure(args: dict) -> dict:
    ctx = mp.get_context("spawn")
    if args["method"] == "edge-sr" and not args.get("calibration"):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            return measure(args | {"calibration": str(edge_sr_student(args, Path(d)))})
    runs: dict[str, list] = {"fp": [], "dqc": []}
    peaks: dict[str, float] = {"fp": 0.0, "dqc": 0.0}
    for _ in range(args["rounds"]):
        for kind in ("fp", "dqc"):
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(kind, args, q))
            p.start()
            res = q.get()
            p.join()
            runs[kind] += res["times"]
            peaks[kind] = max(peaks[kind], res["peak_rss_mb"])
    step = statistics.median(runs["dqc"])
    fp = statistics.median(runs["fp"])
    px = args["batch"] * args["lr_patch"] ** 2
    return {
        "model": args["model"], "bits": args["bits"], "method": args["method"],
        "calibration": args.get("calibration"),
        "batch": args["batch"], "lr_patch": args["lr_patch"], "recompute": args["recompute"],
        "precision": args.get("precision", "fp32"), "fused_fake_quant": args.get("fused", "on"),
        "warmup": args["warmup"], "steps": args["steps"],
        "threads": args["threads"], "step_ms": step * 1e3, "fp_fwd_bwd_ms": fp * 1e3,
        "ratio": step / fp, "peak_rss_mb": peaks["dqc"], "fp_peak_rss_mb": peaks["fp"],
        "lr_pixels_per_s": px / step, "samples": {k: [t * 1e3 for t in v] for k, v in runs.items()},
        "device": args.get("device", "cpu"), "peak_is": "GPU allocated" if
        args.get("device", "cpu").startswith("cuda") else "host RSS",
        "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="swinir-light-x2-ref")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr-patch", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="2dquant", choices=["2dquant", "edge-sr"],
                    help="2dquant: the faithful student, bounds from DOBI on the batch; edge-sr: "
                         "calibrated first up to DQC (one to a few minutes), as build does")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="time the student of this calibration file (edge-sr calibrate), with "
                         "its method's DQC settings; --bits and --method are then the file's")
    ap.add_argument("--recompute", action="store_true",
                    help="activation checkpointing per block (DQCConfig.recompute)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="DQCConfig.precision (bf16: autocast; the FP baseline stays fp32)")
    ap.add_argument("--fused", default="on", choices=["on", "off"],
                    help="off: EDGE_SR_FUSED_FQ=0, the eager fake-quant ops (the before)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (peaks are then GPU memory)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps first: the heap grows to the step's peak in the first "
                         "two or three, page-faulting fresh memory in")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.batch < 1 or a.lr_patch < 8 or a.steps < 1:
        ap.error("--batch >= 1, --lr-patch >= 8 and --steps >= 1 expected")
    if a.calibration is not None:
        if not a.calibration.is_file():
            ap.error(f"--calibration {a.calibration}: no such file")
        from calibrate.calibfile import read_calibration

        meta = read_calibration(a.calibration)[1]
        a.bits, a.method = meta.bits, meta.method
        a.calibration = str(a.calibration)
    res = measure(vars(a) | {"lr_patch": a.lr_patch})
    line = (f"{a.model} {a.batch}x{a.lr_patch}^2 W{a.bits} {a.method}"
            f"{' recompute' if a.recompute else ''}{' ' + a.precision if a.precision != 'fp32' else ''}"
            f"{' eager-fq' if a.fused == 'off' else ''}: step {res['step_ms']:.0f} ms, FP32 eager fwd+bwd "
            f"{res['fp_fwd_bwd_ms']:.0f} ms, ratio {res['ratio']:.2f}, peak RSS "
            f"{res['peak_rss_mb']:.0f} MB (FP {res['fp_peak_rss_mb']:.0f} MB), "
            f"{res['lr_pixels_per_s']:.0f} LR px/s [{res['cpu']}, {a.threads} threads"
            f"{', ' + a.device if a.device != 'cpu' else ''}]")
    print(line)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(a.json)


if __name__ == "__main__":
    sys.exit(main())
