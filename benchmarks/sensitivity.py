"""Which quantizers cost the PSNR: held-out PSNR with one group of quantizers on or off.

Starts from the accuracy bench's cached DOBI (or MinMax) bounds for a family, scale and bit width
(run ``benchmarks.accuracy`` first, or this runs its statistics pass), then scores the fake-quant
model on held-out BSD200 patches (the pool's validation split, never a test set) with:

- every quantizer on, and every quantizer off (FP);
- only one group on ("only G"), and every group but one on ("all but G").

Groups: the linear weights, the linear inputs (qkv, proj, fc1, fc2 separately), the q and k
outputs, the v output and the softmax output. Writes results/bench/sensitivity_<family>.json and a
PNG bar chart beside it.

    python -m benchmarks.sensitivity --family ngswin --scale 2 --bits 4 [--method dobi]
    python -m benchmarks.sensitivity --calibration F --patches 24 --size 64 --seed 7

``--calibration F`` scores the groups of a calibration file's student instead (after DQC, with
its rotations, smoothing and weights), as method ``file:<path>``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from pathlib import Path

import torch

from benchmarks.accuracy.plan import FAMILIES, SETTINGS
from benchmarks.accuracy.run import ScaleRun
from calibrate.dobi import apply_bounds
from calibrate.dqc import val_psnr
from calibrate.prepare import QuantRecipe, prepare, quantizers
from edge_sr.fileio import atomic_path, versions, write_json

log = logging.getLogger("benchmarks.sensitivity")


def group_of(name: str) -> str:
    """The group a quantizer belongs to, from its module path."""
    if ".weight_quantizers." in name:
        return "weights"
    if ".act_quantizers." in name:
        linear = name.split(".act_quantizers.")[0].rsplit(".", 1)[-1]
        return f"{linear} input"
    slot = name.rsplit(".", 1)[-1]
    return {"q_quant": "q/k outputs", "k_quant": "q/k outputs", "v_quant": "v output",
            "attn_probs_quant": "softmax output"}.get(slot, slot)


def held_out(scale: int, patches: int, size: int, seed: int = 1):
    """``patches`` LR/HR patches of ``size`` from the pool's held-out (validation) images."""
    from edge_sr.data.pool import PatchSampler, pool_split

    split = pool_split()
    return PatchSampler(size, scale, flips=False, rot=False, seed=seed,
                        images=split.val).sample(patches)


def run(family: str, scale: int, bits: int, method: str, patches: int, size: int,
        calibration: Path | None = None, seed: int = 1) -> dict:
    if calibration is not None:
        from calibrate.calibfile import load_calibrated

        cal = load_calibrated(calibration)
        student, name = cal.model, cal.meta.checkpoint_name
        scale, bits, method = cal.meta.scale, cal.meta.bits, f"file:{calibration}"
    else:
        SETTINGS.family = FAMILIES[family]
        sr = ScaleRun(scale, [4, 2, 3])
        student, name = prepare(sr.lm.model, QuantRecipe(bits)), sr.lm.name
        res, _ = sr.stats(student)
        key = "dobi" if method == "dobi" else method
        apply_bounds(student, {n: (r[key][bits] if key == "dobi" else r[key])
                               for n, r in res.items()})
    lr, hr = held_out(scale, patches, size, seed)
    qs = dict(quantizers(student))
    groups = sorted({group_of(n) for n in qs})

    def score(on: set[str]) -> float:
        for n, q in qs.items():
            q.enabled = group_of(n) in on
        return val_psnr(student, lr, hr, scale)

    t0 = time.perf_counter()
    rows = {"FP": score(set()), "all": score(set(groups))}
    for g in groups:
        rows[f"only {g}"] = score({g})
        rows[f"all but {g}"] = score(set(groups) - {g})
        log.info("%s: only %.3f, all but %.3f", g, rows[f"only {g}"], rows[f"all but {g}"])
    return {"family": family, "checkpoint": name, "scale": scale, "bits": bits,
            "method": method, "held_out": {"patches": patches, "lr_size": size, "seed": seed},
            "groups": {g: sum(group_of(n) == g for n in qs) for g in groups},
            "psnr": rows, "seconds": time.perf_counter() - t0,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "versions": versions()}


def plot(results: list[dict], path: Path) -> None:
    """PNG: PSNR lost to each group alone (bars), one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        p = r["psnr"]
        groups = list(r["groups"])
        ax.barh(groups, [p["FP"] - p[f"only {g}"] for g in groups], label="only this group")
        ax.barh(groups, [p["FP"] - p[f"all but {g}"] for g in groups], alpha=0.4,
                label="all but this group")
        ax.axvline(p["FP"] - p["all"], color="k", ls="--", label="all quantized")
        ax.set(title=f"{r['checkpoint']} W{r['bits']}A{r['bits']} {r['method']}",
               xlabel="held-out PSNR lost (dB)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def render(runs: list[dict]) -> str:
    """Markdown: held-out PSNR and loss from FP, per group, one column pair per run."""
    head = "| quantized | " + " | ".join(
        f"{r['checkpoint']} W{r['bits']} {r['method']}: PSNR | lost" for r in runs) + " |"
    lines = [head, "|---|" + "---|---|" * len(runs)]
    keys = list(runs[0]["psnr"])
    for k in keys:
        cells = []
        for r in runs:
            v = r["psnr"].get(k)
            cells += ["–", "–"] if v is None else [f"{v:.3f}", f"{v - r['psnr']['FP']:+.3f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="ngswin")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", choices=["dobi", "minmax"], default="dobi")
    ap.add_argument("--patches", type=int, default=16)
    ap.add_argument("--size", type=int, default=48, help="LR patch size")
    ap.add_argument("--seed", type=int, default=1, help="held-out patch seed")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="score this calibration file's student instead of DOBI/MinMax bounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="print the stored runs as markdown")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(f"results/bench/sensitivity_{args.family}.json")
    if args.table:
        print(render(json.loads(out.read_text())["runs"]))
        return
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    r = run(args.family, args.scale, args.bits, args.method, args.patches, args.size,
            args.calibration, args.seed)
    runs = [x for x in runs if (x["scale"], x["bits"], x["method"]) !=
            (r["scale"], r["bits"], r["method"])] + [r]
    write_json(out, {"runs": runs})
    plot(runs, out.with_suffix(".png"))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
