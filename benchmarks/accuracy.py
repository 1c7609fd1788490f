"""Accuracy bench (issue 3): FP / MinMax / Percentile / DOBI / 2DQuant-fast on the reference
checkpoints, drop from FP beside the paper's drop (spec §6).

Resumable: each (scale, bits, method, set) cell is one JSON in results/accuracy/ and is skipped
when present; calibration files are cached in results/accuracy/calib/. Per scale, one FP pass
over the 32 calibration patches gives DOBI bounds for every bit width and the MinMax/Percentile
statistics. Order: x2, then x4, then x3; Set5 before Set14; the wide rows (B100, Urban100 at x4,
2 and 4 bits) last. ``python -m benchmarks.accuracy --table`` only rewrites the table.

    nice python -m benchmarks.accuracy [--scales 2,4,3] [--bits 4,2,3] [--table]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import subprocess
import time
from pathlib import Path

import torch

from calibrate.api import CalibrationConfig, dqc_sampler, pick_percentile, pool_data
from calibrate.baselines import baseline_rule
from calibrate.calibfile import CalibrationMeta, load_calibrated, save_calibration, state_checksum
from calibrate.dobi import apply_bounds, collect, search_bounds_multi
from calibrate.dqc import run_dqc, val_psnr
from calibrate.prepare import QuantRecipe, prepare
from edge_sr.fileio import versions, write_json

log = logging.getLogger("benchmarks.accuracy")
OUT = Path("results/accuracy")
DOC = Path("docs/results/accuracy.md")
METHODS = ("minmax", "percentile", "dobi", "2dquant")
LABEL = {"fp": "FP", "minmax": "MinMax", "percentile": "Percentile", "dobi": "DOBI",
         "2dquant": "2DQuant (fast)"}

# Paper Table 3 PSNR (spec §6): {scale: {(method, bits): (Set5, Set14, B100, Urban100)}}.
PAPER = {
    2: {("fp", 32): (38.15, 33.86, 32.31, 32.76),
        ("minmax", 4): (34.39, 30.55, 29.72, 28.40), ("percentile", 4): (37.37, 32.96, 31.61, 31.17),
        ("dobi", 4): (37.44, 33.15, 31.75, 31.29), ("2dquant", 4): (37.87, 33.41, 32.02, 31.84),
        ("minmax", 3): (28.19, 26.40, 25.83, 25.19), ("percentile", 3): (34.37, 31.04, 29.82, 28.25),
        ("dobi", 3): (36.37, 32.33, 31.12, 29.65), ("2dquant", 3): (37.32, 32.85, 31.60, 30.45),
        ("minmax", 2): (33.88, 30.81, 29.99, 27.48), ("percentile", 2): (30.82, 28.80, 27.95, 26.30),
        ("dobi", 2): (35.25, 31.72, 30.62, 28.52), ("2dquant", 2): (36.00, 31.98, 30.91, 28.62)},
    3: {("fp", 32): (34.63, 30.54, 29.20, 28.66),
        ("minmax", 4): (31.66, 28.17, 27.19, 25.60), ("percentile", 4): (33.34, 29.61, 28.49, 27.06),
        ("dobi", 4): (33.78, 29.87, 28.72, 27.53), ("2dquant", 4): (34.06, 30.12, 28.89, 27.69),
        ("minmax", 3): (26.01, 23.41, 22.46, 21.70), ("percentile", 3): (30.91, 28.02, 27.23, 25.32),
        ("dobi", 3): (32.85, 29.33, 28.27, 26.36), ("2dquant", 3): (33.24, 29.56, 28.50, 26.65),
        ("minmax", 2): (26.05, 24.74, 24.42, 22.87), ("percentile", 2): (25.30, 23.60, 23.77, 22.33),
        ("dobi", 2): (30.54, 27.74, 26.69, 24.80), ("2dquant", 2): (31.62, 28.54, 27.85, 25.30)},
    4: {("fp", 32): (32.45, 28.77, 27.69, 26.48),
        ("minmax", 4): (28.63, 25.73, 25.10, 23.07), ("percentile", 4): (30.64, 27.61, 26.96, 24.96),
        ("dobi", 4): (31.10, 28.03, 27.18, 25.43), ("2dquant", 4): (31.77, 28.30, 27.37, 25.71),
        ("minmax", 3): (19.41, 18.35, 18.79, 17.88), ("percentile", 3): (27.55, 25.15, 24.45, 22.80),
        ("dobi", 3): (29.59, 26.87, 26.24, 24.17), ("2dquant", 3): (30.90, 27.75, 26.99, 24.85),
        ("minmax", 2): (23.96, 22.92, 22.70, 21.16), ("percentile", 2): (23.03, 22.12, 21.83, 20.45),
        ("dobi", 2): (28.82, 26.46, 25.97, 23.67), ("2dquant", 2): (29.53, 26.86, 26.46, 23.84)},
}
SETS = ("Set5", "Set14", "B100", "Urban100")


def cell_path(scale: int, bits: int, method: str, dataset: str) -> Path:
    return OUT / f"x{scale}_w{bits}_{method}_{dataset}.json"


def calib_path(scale: int, bits: int, method: str) -> Path:
    return OUT / "calib" / f"x{scale}_w{bits}_{method}.pt"


class ScaleRun:
    """Everything one scale needs, built lazily: FP model, pool data, bound statistics."""

    def __init__(self, scale: int, bits_list: list[int]) -> None:
        from edge_sr.checkpoints import load_model

        self.scale, self.bits_list = scale, bits_list
        self.lm = load_model(f"swinir-light-x{scale}-ref")
        self._data = self._stats = None
        self.recipe_cfg = CalibrationConfig(model=self.lm.name, bits=4, output="-",
                                            recipe="fast")

    @property
    def data(self):
        if self._data is None:
            self._data = pool_data(self.scale, "fast", seed=0)
        return self._data

    def stats(self, student):
        """One FP pass: DOBI for every bit width + MinMax/Percentile bounds, per quantizer."""
        cache = OUT / f"x{self.scale}_stats.pt"
        if self._stats is None and cache.exists():
            self._stats = torch.load(cache, weights_only=False)
        if self._stats is None:
            def rule(x, search):
                return {"dobi": search_bounds_multi(x, self.bits_list, search),
                        **baseline_rule(x, search)}
            res, rep = collect(student, self.data.calib_lr, rule)
            self._stats = (res, rep)
            from edge_sr.fileio import atomic_path

            with atomic_path(cache) as tmp:
                torch.save(self._stats, tmp)
            write_json(OUT / f"x{self.scale}_stats_time.json",
                       {"seconds": rep.seconds, "rule_seconds": rep.rule_seconds,
                        "bits": self.bits_list, "quantizers": rep.quantizers})
        return self._stats

    def calibrated(self, bits: int, method: str):
        path = calib_path(self.scale, bits, method)
        if path.exists():
            return load_calibrated(path, self.lm.model)
        recipe = QuantRecipe(bits)
        student = prepare(self.lm.model, recipe)
        res, rep = self.stats(student)
        info: dict = {"stats_pass_seconds": rep.seconds}
        if method in ("dobi", "2dquant"):
            apply_bounds(student, {n: r["dobi"][bits] for n, r in res.items()})
        elif method == "minmax":
            apply_bounds(student, {n: r["minmax"] for n, r in res.items()})
        else:
            keys = [k for k in next(iter(res.values())) if k.startswith("p")]
            per = {k: {n: r[k] for n, r in res.items()} for k in keys}
            key, scores = pick_percentile(student, per, self.data, self.scale)
            apply_bounds(student, per[key])
            info |= {"percentile": key, "percentile_val_psnr": scores}
        info["val_psnr_init"] = val_psnr(student, *self.data.val, self.scale)
        cfg = CalibrationConfig(model=self.lm.name, bits=bits, output=str(path), method=method,
                                recipe="fast")
        if method == "2dquant":
            dqc_cfg = cfg.dqc_config()
            r = run_dqc(student, self.lm.model, dqc_sampler(self.data.sampler, 0), self.data.val,
                        dqc_cfg, state_path=Path(str(path) + ".dqc-state.pt"), resume=True)
            info |= {"dqc_seconds": r.seconds, "dqc_iterations": r.iterations,
                     "dqc_best_iteration": r.best_iteration, "val_psnr": r.best_val_psnr,
                     "dqc_history": r.history}
            Path(str(path) + ".dqc-state.pt").unlink(missing_ok=True)
        meta = CalibrationMeta(bits=bits, scale=self.scale, method=method,
                               recipe=recipe.to_dict(), checkpoint_name=self.lm.name,
                               checkpoint_sha256=self.lm.sha256,
                               state_sha256=state_checksum(self.lm.model), arch=self.lm.arch,
                               config=cfg.to_dict(), stats=info, versions=versions())
        save_calibration(path, student, meta)
        return load_calibrated(path, self.lm.model)


def score(model, scale: int, dataset: str) -> dict:
    from edge_sr.data.datasets import load_benchmark
    from edge_sr.evaluate import evaluate_pairs
    from edge_sr.predictors import TorchPredictor

    pred = TorchPredictor(model, scale, "bench")
    t0 = time.perf_counter()
    res = evaluate_pairs(pred, load_benchmark(dataset, scale), scale, label=dataset, ssim=True)
    return {"psnr": res.psnr, "ssim": res.ssim, "images": len(res.images),
            "eval_seconds": time.perf_counter() - t0}


def run_cell(run: ScaleRun, bits: int, method: str, dataset: str) -> None:
    path = cell_path(run.scale, bits, method, dataset)
    if path.exists():
        return
    t0 = time.perf_counter()
    if method == "fp":
        model, meta = run.lm.model, {}
    else:
        cm = run.calibrated(bits, method)
        model, meta = cm.model, cm.meta.stats
    out = {"scale": run.scale, "bits": bits, "method": method, "dataset": dataset,
           **score(model, run.scale, dataset), "calibration": {k: v for k, v in meta.items()},
           "checkpoint": run.lm.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "versions": versions()}
    write_json(path, out)
    log.info("x%d W%d %s %s: %.3f dB (%.0f s)", run.scale, bits, method, dataset, out["psnr"],
             time.perf_counter() - t0)


def plan(scales: list[int], bits_list: list[int]) -> list[tuple[int, int, str, str]]:
    cells = []
    for s in scales:
        for ds in ("Set5", "Set14"):
            cells.append((s, 32, "fp", ds))
            cells += [(s, b, m, ds) for b in bits_list for m in METHODS]
    for ds in ("B100", "Urban100"):
        if 4 in scales:
            cells.append((4, 32, "fp", ds))
            cells += [(4, b, m, ds) for b in (4, 2) if b in bits_list for m in METHODS]
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scales", default="2,4,3")
    ap.add_argument("--bits", default="4,2,3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="only rewrite the table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    scales = [int(s) for s in args.scales.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    if not args.table:
        torch.set_num_threads(args.threads)
        runs: dict[int, ScaleRun] = {}
        for s, b, m, ds in plan(scales, bits_list):
            if cell_path(s, b, m, ds).exists():
                continue
            if s not in runs:
                runs = {s: ScaleRun(s, bits_list)}  # one scale in memory at a time
            run_cell(runs[s], b, m, ds)
            write_table()
    write_table()


def _load_cells() -> dict:
    cells = {}
    for p in sorted(OUT.glob("x*_w*_*.json")):
        if "stats_time" in p.name:
            continue
        d = json.loads(p.read_text())
        cells[(d["scale"], d["bits"], d["method"], d["dataset"])] = d
    return cells


def _fmt(v, spec="{:.2f}"):
    return "–" if v is None else spec.format(v)


def render(cells: dict, cpu_model: str) -> str:
    """Markdown tables: PSNR, our drop from FP and the paper's drop, per set."""
    lines = [f"Generated by `python -m benchmarks.accuracy` on {cpu_model}, "
             f"{datetime.date.today().isoformat()}. Y-PSNR (dB) / drop from our FP; *paper* = the "
             "drop from FP in Table 3 (spec §6) for the same scale, bits and method. "
             "'–' = not run.", ""]
    for sets in (("Set5", "Set14"), ("B100", "Urban100")):
        head = "| scale | bits | method | " + " | ".join(
            f"{d} PSNR | {d} drop | {d} paper drop" for d in sets) + " | held-out val PSNR | notes |"
        rows = []
        keys = sorted({(s, b, m) for (s, b, m, d) in cells if d in sets},
                      key=lambda k: (k[0], -k[1], ["fp", *METHODS].index(k[2])))
        for s, b, m in keys:
            row = [f"x{s}", "FP" if b == 32 else str(b), LABEL[m]]
            t, v = "", None
            for d in sets:
                c, fp = cells.get((s, b, m, d)), cells.get((s, 32, "fp", d))
                i = SETS.index(d)
                pd = (PAPER[s][(m, b)][i] - PAPER[s][("fp", 32)][i]) if (m, b) in PAPER[s] else None
                drop = c["psnr"] - fp["psnr"] if c and fp else None
                row += [_fmt(c and c["psnr"]), _fmt(drop, "{:+.2f}"),
                        _fmt(pd if m != "fp" else None, "{:+.2f}")]
                if c and c.get("calibration"):
                    cal = c["calibration"]
                    v = cal.get("val_psnr", cal.get("val_psnr_init"))
                    if "dqc_seconds" in cal:
                        t = (f"DQC {cal['dqc_seconds']:.0f} s ({cal['dqc_iterations']} it, best "
                             f"@{cal['dqc_best_iteration']})")
                    elif "percentile" in cal:
                        t = f"picked {cal['percentile']}"
            rows.append("| " + " | ".join(row + [_fmt(v), t]) + " |")
        if rows:
            lines += [head, "|" + "---|" * (3 + 3 * len(sets) + 2), *rows, ""]
    missing = [c for c in plan([2, 4, 3], [4, 2, 3]) if c not in cells]
    if missing:
        by: dict = {}
        for sc, b, m, d in missing:
            by.setdefault((sc, d), []).append(f"{LABEL[m]}" + ("" if b == 32 else f" W{b}"))
        lines += ["**Not run** (no CPU time left before the deadline):", ""]
        lines += [f"- x{sc} {d}: {', '.join(v)}" for (sc, d), v in by.items()]
        lines.append("")
    for p in sorted(OUT.glob("x*_stats_time.json")):
        d = json.loads(p.read_text())
        lines.append(f"- {p.name[:2]}: one FP statistics pass (DOBI for bits {d['bits']} + "
                     f"MinMax/Percentile, {d['quantizers']} quantizers): {d['seconds']:.0f} s, of "
                     f"which searches {d['rule_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def write_table() -> None:
    """Replace the generated block of docs/results/accuracy.md (between the markers)."""
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                  if ln.startswith("Model name")), platform.processor())
    block = f"{START}\n{render(_load_cells(), model)}{END}"
    old = DOC.read_text() if DOC.exists() else f"# Accuracy\n\n{START}\n{END}\n"
    if START in old and END in old:
        text = old[:old.index(START)] + block + old[old.index(END) + len(END):]
    else:
        text = old + "\n" + block + "\n"
    from edge_sr.fileio import atomic_path

    DOC.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(DOC) as tmp:
        tmp.write_text(text)
    plot_psnr_vs_bits(_load_cells(), OUT / "psnr_vs_bits.png")


def plot_psnr_vs_bits(cells: dict, path: Path) -> None:
    """PNG: Set5 PSNR against bit width, one line per method and scale, FP as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_sr.fileio import atomic_path

    scales = sorted({s for (s, _, _, d) in cells if d == "Set5"})
    if not scales:
        return
    fig, axes = plt.subplots(1, len(scales), figsize=(5 * len(scales), 4), squeeze=False)
    for ax, s in zip(axes[0], scales):
        for m in METHODS:
            pts = sorted((b, c["psnr"]) for (sc, b, mm, d), c in cells.items()
                         if sc == s and mm == m and d == "Set5")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABEL[m])
        fp = cells.get((s, 32, "fp", "Set5"))
        if fp:
            ax.axhline(fp["psnr"], ls="--", color="k", label="FP")
        ax.set(title=f"x{s} reference SwinIR-light, Set5", xlabel="bits (W = A)",
               ylabel="Y-PSNR (dB)", xticks=[2, 3, 4])
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


START, END = "<!-- accuracy-table:start -->", "<!-- accuracy-table:end -->"


if __name__ == "__main__":
    main()
