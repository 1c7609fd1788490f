"""DQC budgets on a CPU: held-out PSNR against wall time, to choose ``build``'s default budget.

    python -m benchmarks.dqc_budget run --model ngswin-x2 --bits 4 --method edge-sr \\
        --batch 4 --lr-patch 64 --iterations 200 --val-every 10 --threads 1
    python -m benchmarks.dqc_budget report        # table + PNG of every run so far

``run`` calibrates through ``calibrate.api.calibrate_model`` (DOBI, the method's options, then DQC
at the given batch x patch) and validates every ``--val-every`` iterations on the ``cpu`` recipe's
8 held-out 64x64 LR patches of the BSD200 pool's validation split (never a test set). Each run writes
``results/dqc_budget/<model>_w<bits>_<method>_b<batch>p<patch>.json``: the validation history
with wall seconds since DQC started, the seconds spent before DQC (DOBI and the per-site
choices), the CPU model and thread count. ``report`` writes ``results/dqc_budget/curve.png`` and
prints a Markdown table of the best held-out PSNR reached within 5, 10 and 15 minutes of total
calibration time. ``run --budget paper --device cuda --time-limit MIN --score Set5,Set14`` is the
GPU form (scripts/gpu_session.sh): the paper's budget cut at a deadline, validated on the paper
recipe's 16 held-out patches, then scored on the benchmark sets for reporting only.
Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

OUT = Path("results/dqc_budget")
CHECKPOINTS_MIN = (5, 10, 15)


def run(a: argparse.Namespace) -> Path:
    import torch

    from benchmarks.dqc_step import cpu_model
    from calibrate.api import CalibrationConfig, calibrate_model, pool_data
    from edge_sr.checkpoints import load_model

    torch.set_num_threads(a.threads)
    lm = load_model(a.model, device=a.device)
    cfg = CalibrationConfig(model=a.model, bits=a.bits, output="-", method=a.method,
                            budget=a.budget, iterations=a.iterations, dqc_batch=a.batch,
                            dqc_patch=a.lr_patch, val_every=a.val_every, bound_lr=a.bound_lr,
                            device=a.device, time_limit=a.time_limit, grid=a.grid,
                            fp_sites=tuple(s for s in a.fp_sites.split(",") if s),
                            weight_lr=a.weight_lr, block_recon=a.block_recon)
    # the recipe's data: 32 calibration patches and its held-out validation patches
    # ("cpu": 8 of 64x64 LR; "paper": 16 of 64x64)
    data = pool_data(lm.scale, cfg.budget, cfg.seed, lr_patch=cfg.dqc_config(lm.model).lr_patch)
    t0 = time.perf_counter()
    cal = calibrate_model(lm, data, cfg)
    total = time.perf_counter() - t0
    st = cal.meta.stats
    pre = total - st.get("dqc_seconds", 0.0)
    res = {"model": a.model, "bits": a.bits, "method": a.method, "batch": a.batch,
           "lr_patch": cfg.dqc_config(lm.model).lr_patch, "iterations": a.iterations,
           "bound_lr": cfg.option("bound_lr"), "weight_lr": cfg.option("weight_lr"),
           "block_recon": a.block_recon, "block_recon_report": st.get("block_recon"),
           "grid": cfg.grid, "fp_sites": list(cfg.fp_sites), "threads": a.threads, "cpu": cpu_model(),
           "device": _device_name(a.device), "dqc_stopped_at": st.get("dqc_stopped_at"),
           "time_limit_min": a.time_limit,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "seconds_before_dqc": pre, "seconds_total": total,
           "history": st.get("dqc_history", []), "val_psnr_init": st["val_psnr_init"],
           "best_val_psnr": st["val_psnr"], "recipe": cal.meta.recipe}
    if a.score:
        res["scores"] = score_sets(cal.model, lm.scale, a.score.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{a.model}_w{a.bits}_{a.method}_b{a.batch}p{res['lr_patch']}"
                  f"{'_' + a.tag if a.tag else ''}.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(path)
    if a.save:
        from calibrate.calibfile import save_calibration

        save_calibration(a.save, cal.model, cal.meta)
    print(f"{path}: best {res['best_val_psnr']:.3f} dB (init {res['val_psnr_init']:.3f}) in "
          f"{total / 60:.1f} min" + "".join(f"; {k} {v['psnr']:.3f} dB"
                                             for k, v in res.get("scores", {}).items()))
    return path


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") \
        else "cpu"


def score_sets(model, scale: int, sets: list[str]) -> dict:
    """Y-PSNR/SSIM of the fake-quant ``model`` on benchmark sets (reporting only: the run's
    choices are made on held-out pool patches before this)."""
    from edge_sr.evaluate import EvalConfig, evaluate
    from runtime.predictors import TorchPredictor

    res = evaluate(TorchPredictor(model, scale, "fake-quant"),
                   EvalConfig(datasets=sets, scale=scale, progress=False))
    return {name: {"psnr": d.psnr, "ssim": d.ssim} for name, d in res.datasets.items()}


def curve(res: dict) -> list[tuple[float, float]]:
    """(minutes of calibration, best held-out PSNR so far) after each validation."""
    pts, best = [], float("-inf")
    for h in res["history"]:
        best = max(best, h["val_psnr"])
        pts.append(((res["seconds_before_dqc"] + h.get("seconds", 0.0)) / 60, best))
    return pts


def report(a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(Path(a.out).glob("*.json"))]
    if not runs:
        sys.exit(f"no runs under {a.out}; run 'python -m benchmarks.dqc_budget run ...' first")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    print("| model | W | method | batch x patch | bound lr | threads | " +
          " | ".join(f"best ≤ {m} min" for m in CHECKPOINTS_MIN) + " | iterations (min) |")
    print("|---|---|---|---|---|---|" + "---|" * len(CHECKPOINTS_MIN) + "---|")
    for r in runs:
        pts = curve(r)
        label = f"{r['model']} W{r['bits']} {r['method']} {r['batch']}x{r['lr_patch']}²"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
        cells = []
        for m in CHECKPOINTS_MIN:
            within = [p[1] for p in pts if p[0] <= m]
            cells.append(f"{max(within):.2f}" if within else "–")
        last = r["history"][-1]
        print(f"| {r['model']} | {r['bits']} | {r['method']} | {r['batch']}x{r['lr_patch']}² | "
              f"{r['bound_lr']} | {r['threads']} | " + " | ".join(cells) +
              f" | {last['iteration']} ({r['seconds_total'] / 60:.1f}) |")
    ax.set_xlabel("calibration time (min, DOBI + DQC)")
    ax.set_ylabel("held-out Y-PSNR (dB), best so far")
    ax.axvline(15, color="grey", ls=":")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(a.out) / "curve.png", dpi=120)
    print(f"\nwrote {Path(a.out) / 'curve.png'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="ngswin-x2")
    r.add_argument("--bits", type=int, default=4)
    r.add_argument("--method", default="edge-sr", choices=["2dquant", "edge-sr"])
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--lr-patch", type=int, default=64)
    r.add_argument("--iterations", type=int, default=200)
    r.add_argument("--val-every", type=int, default=10)
    r.add_argument("--bound-lr", default=None, choices=["absolute", "relative"])
    r.add_argument("--block-recon", type=int, default=0, metavar="STEPS",
                   help="block reconstruction before DQC, STEPS Adam steps per block")
    r.add_argument("--weight-lr", type=float, default=None,
                   help="DQC also trains the linears' weights at this lr x grid step")
    r.add_argument("--grid", default="real", help="the engine grid learned (real, ort, ...)")
    r.add_argument("--fp-sites", default="", metavar="KINDS",
                   help="site kinds kept in floating point, e.g. qk,pv")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--budget", default="cpu", choices=["cpu", "paper"],
                   help="whose held-out patches validate (and whose DQC defaults apply)")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="stop DQC after this many minutes of calibration (CalibrationConfig)")
    r.add_argument("--score", default="", metavar="SETS",
                   help="also score the result on these benchmark sets, e.g. Set5,Set14")
    r.add_argument("--out", default=str(OUT))
    r.add_argument("--tag", default="")
    r.add_argument("--save", type=Path, default=None, help="also write the calibration file")
    rp = sub.add_parser("report")
    rp.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    (run if a.cmd == "run" else report)(a)


if __name__ == "__main__":
    main()
