"""Accuracy bench: FP / MinMax / Percentile / DOBI / 2DQuant-fast, drop from FP beside the
published drops (spec §6, docs/anchors.md).

Two model families: ``--family swinir`` (issue 3: the reference SwinIR-light checkpoints, x2/x3/x4,
results/accuracy/, docs/results/accuracy.md) and ``--family ngswin`` (issue 7: the official NGswin
checkpoints, x2/x3, results/accuracy_ngswin/, docs/results/ngswin_accuracy.md).

Resumable: each (scale, bits, method, set) cell is one JSON and is skipped when present;
calibration files are cached under calib/. A cell scores image by image into ``<cell>.parts/``,
so an interrupted cell resumes at its next image, and a worker with nothing of its own left helps
score the images of cells that other workers are running. Per scale, one FP pass over the 32
calibration patches gives DOBI bounds for every bit width and the MinMax/Percentile statistics.
Order: scales as given, Set5 before Set14; the wide rows (B100, Urban100 at 4 and 2 bits) last.
``--table`` only rewrites the table.

    nice python -m benchmarks.accuracy [--family swinir] [--scales 2,4,3] [--bits 4,2,3] [--table]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from calibrate.api import CalibrationConfig, dqc_sampler, pick_percentile, pool_data
from calibrate.baselines import baseline_rule
from calibrate.calibfile import CalibrationMeta, load_calibrated, save_calibration, state_checksum
from calibrate.dobi import apply_bounds, collect, search_bounds_multi
from calibrate.dqc import run_dqc, val_psnr
from calibrate.prepare import QuantRecipe, prepare, quantizers
from edge_sr.allocator import keep_freed_memory
from edge_sr.fileio import sha256_file, versions, write_json
from edge_sr.logutil import progress_disabled

log = logging.getLogger("benchmarks.accuracy")
METHODS = ("minmax", "percentile", "dobi", "2dquant")
# Variant, run only when asked (--methods): 2DQuant with one shared input quantizer for the fused
# qkv linear (what an engine runs) instead of the paper's three. DOBI gives all three the same
# bounds (they see one tensor), so the two differ only after DQC.
SHARED = "2dquant-shared"
# Variant beyond the paper (--methods): 2DQuant with fc1's input quantizer at 8 bits
# (QuantRecipe.wide_inputs), for post-norm NGswin whose fc1 input is the raw residual stream.
WIDE = "2dquant-a8fc1"
# The paper recipe (4000 iterations, batch 16, 64x64 LR patches): run where a GPU was lent.
PAPER_RECIPE = "2dquant-paper"
# The paper recipe stopped early (a GPU lease ran out): made by scripts/calib_from_dqc_state.py
# from the run's state file, never by this bench.
PAPER_CUT = "2dquant-paper-cut"
ORDER = ("fp", *METHODS, PAPER_RECIPE, PAPER_CUT, SHARED, WIDE)
LABEL = {"fp": "FP", "minmax": "MinMax", "percentile": "Percentile", "dobi": "DOBI",
         "2dquant": "2DQuant (fast)", PAPER_RECIPE: "2DQuant (paper recipe)",
         PAPER_CUT: "2DQuant (paper recipe, cut short)",
         SHARED: "2DQuant (fast), shared qkv input", WIDE: "2DQuant (fast), fc1 input 8-bit"}
DQC_METHODS = ("2dquant", PAPER_RECIPE, SHARED, WIDE)

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

# CondiQuant (arXiv 2502.15478) on SwinIR-light, docs/anchors.md: {scale: {bits: (Set5, Set14,
# B100, Urban100)}}; its FP row is Table 3's.
CONDIQUANT = {
    2: {4: (38.03, 33.50, 32.16, 32.03), 3: (37.77, 33.21, 31.94, 31.18),
        2: (37.15, 32.74, 31.55, 29.96)},
    3: {4: (34.32, 30.29, 29.05, 28.05), 3: (33.92, 30.02, 28.84, 27.37),
        2: (33.00, 29.44, 28.45, 26.36)},
    4: {4: (32.09, 28.50, 27.52, 25.97), 3: (31.62, 28.20, 27.31, 25.39),
        2: (30.64, 27.59, 26.93, 24.54)},
}


@dataclass(frozen=True)
class Family:
    """Which checkpoints a bench run quantizes and where its cells and table go."""

    key: str
    checkpoint: str  # registry name with ``{scale}``
    title: str
    out: Path
    doc: Path
    scales: tuple[int, ...]
    wide_scales: tuple[int, ...]  # scales that get the B100/Urban100 rows (4 and 2 bits)
    condiquant: bool  # add CondiQuant's published drop beside ours


FAMILIES = {
    "swinir": Family("swinir", "swinir-light-x{scale}-ref", "reference SwinIR-light",
                     Path("results/accuracy"), Path("docs/results/accuracy.md"), (2, 4, 3), (4,),
                     False),
    "ngswin": Family("ngswin", "ngswin-x{scale}", "NGswin (official)",
                     Path("results/accuracy_ngswin"), Path("docs/results/ngswin_accuracy.md"),
                     (2, 3), (2, 3), True),
}
FAMILY = FAMILIES["swinir"]  # set by main()
DEVICE = "cpu"  # set by main()


class Busy(Exception):
    """Another worker is making the calibration (or statistics) this cell needs."""


def claim(path: Path) -> bool:
    """Take ``path``'s claim file (atomic create), so parallel workers never run the same cell or
    calibration twice; a claim left by a dead process on this host is taken over."""
    lock = path.with_name(path.name + ".claim")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
                alive = host != socket.gethostname() or _alive(int(pid))
            except (OSError, ValueError):  # being written: give it a moment, then read it as held
                time.sleep(0.5)              # unless it is gone or still empty (stale)
                try:
                    alive = lock.stat().st_size > 0
                except OSError:
                    alive = False
            if alive:
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        return True
    return False


def release(path: Path) -> None:
    path.with_name(path.name + ".claim").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def device_name() -> str:
    if DEVICE.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(DEVICE))
    return cpu_model()


def cpu_model() -> str:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        cpu = ""
    return next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                 if ln.startswith("Model name")), platform.processor())


def cell_path(scale: int, bits: int, method: str, dataset: str) -> Path:
    return FAMILY.out / f"x{scale}_w{bits}_{method}_{dataset}.json"


def calib_path(scale: int, bits: int, method: str) -> Path:
    return FAMILY.out / "calib" / f"x{scale}_w{bits}_{method}.pt"


class ScaleRun:
    """Everything one scale needs, built lazily: FP model, pool data, bound statistics."""

    def __init__(self, scale: int, bits_list: list[int]) -> None:
        from edge_sr.checkpoints import load_model

        self.scale, self.bits_list = scale, bits_list
        self.lm = load_model(FAMILY.checkpoint.format(scale=scale), device=DEVICE)
        self._data = self._stats = self._paper_data = None
        self.recipe_cfg = CalibrationConfig(model=self.lm.name, bits=4, output="-",
                                            recipe="fast")

    @property
    def data(self):
        if self._data is None:
            self._data = pool_data(self.scale, "fast", seed=0)
        return self._data

    def recipe_data(self, recipe: str):
        """The recipe's pool data: the same 32 DOBI patches, its own DQC and validation patches."""
        if recipe == "fast":
            return self.data
        if self._paper_data is None:
            self._paper_data = pool_data(self.scale, recipe, seed=0)
        return self._paper_data

    def stats(self, student):
        """One FP pass: DOBI for every bit width + MinMax/Percentile bounds, per quantizer."""
        cache = FAMILY.out / f"x{self.scale}_stats.pt"
        if self._stats is None and cache.exists():
            self._stats = torch.load(cache, weights_only=False)
        if self._stats is None:
            if not claim(cache):
                raise Busy(cache)
            if cache.exists():  # another worker finished it meanwhile
                release(cache)
                return self.stats(student)

            def rule(x, search):
                return {"dobi": search_bounds_multi(x, self.bits_list, search),
                        **baseline_rule(x, search)}
            res, rep = collect(student, self.data.calib_lr, rule)
            self._stats = (res, rep)
            from edge_sr.fileio import atomic_path

            with atomic_path(cache) as tmp:
                torch.save(self._stats, tmp)
            write_json(FAMILY.out / f"x{self.scale}_stats_time.json",
                       {"seconds": rep.seconds, "rule_seconds": rep.rule_seconds,
                        "bits": self.bits_list, "quantizers": rep.quantizers,
                        "device": device_name()})
            release(cache)
        return self._stats

    def calibrated(self, bits: int, method: str):
        path = calib_path(self.scale, bits, method)
        if path.exists():
            return load_calibrated(path, self.lm.model)
        if not claim(path):
            raise Busy(path)
        try:
            if not path.exists():  # unless another worker finished it meanwhile
                self._calibrate(path, bits, method)
        finally:
            release(path)
        return load_calibrated(path, self.lm.model)

    def _calibrate(self, path: Path, bits: int, method: str) -> None:
        if method == PAPER_CUT:
            raise SystemExit(f"{path}: {PAPER_CUT} cells score a file that "
                             "scripts/calib_from_dqc_state.py makes; it is not there")
        recipe = QuantRecipe(bits, qkv_separation=method != SHARED,
                             wide_inputs=("fc1",) if method == WIDE else ())
        student = prepare(self.lm.model, recipe)
        res, rep = self.stats(student if recipe == QuantRecipe(bits)
                              else prepare(self.lm.model, QuantRecipe(bits)))
        info: dict = {"stats_pass_seconds": rep.seconds, "device": device_name(),
                      "device_type": torch.device(DEVICE).type}
        dqc_recipe = "paper" if method == PAPER_RECIPE else "fast"
        data = self.recipe_data(dqc_recipe)
        if method in ("dobi", *DQC_METHODS):
            # a shared qkv input quantizer is named like the separated q-input one (index 0)
            names = [n for n, _ in quantizers(student)]
            bounds = {n: res[n]["dobi"][bits] for n in names}
            apply_bounds(student, bounds | own_width_dobi(student, self.data.calib_lr))
        elif method == "minmax":
            apply_bounds(student, {n: r["minmax"] for n, r in res.items()})
        else:
            keys = [k for k in next(iter(res.values())) if k.startswith("p")]
            per = {k: {n: r[k] for n, r in res.items()} for k in keys}
            key, scores = pick_percentile(student, per, self.data, self.scale)
            apply_bounds(student, per[key])
            info |= {"percentile": key, "percentile_val_psnr": scores}
        info["val_psnr_init"] = val_psnr(student, *data.val, self.scale)
        cfg = CalibrationConfig(model=self.lm.name, bits=bits, output=str(path),
                                method="2dquant" if method in DQC_METHODS else method,
                                recipe=dqc_recipe, qkv_separation=recipe.qkv_separation,
                                wide_inputs=recipe.wide_inputs, device=DEVICE)
        if method in DQC_METHODS:
            dqc_cfg = cfg.dqc_config()
            r = run_dqc(student, self.lm.model, dqc_sampler(data.sampler, 0), data.val,
                        dqc_cfg, state_path=Path(str(path) + ".dqc-state.pt"), resume=True)
            info |= {"dqc_seconds": r.seconds, "dqc_iterations": r.iterations,
                     "dqc_best_iteration": r.best_iteration, "val_psnr": r.best_val_psnr,
                     "dqc_history": r.history}
            Path(str(path) + ".dqc-state.pt").unlink(missing_ok=True)
        meta = CalibrationMeta(bits=bits, scale=self.scale, method=cfg.method,
                               recipe=recipe.to_dict(), checkpoint_name=self.lm.name,
                               checkpoint_sha256=self.lm.sha256,
                               state_sha256=state_checksum(self.lm.model), arch=self.lm.arch,
                               config=cfg.to_dict(), stats=info, versions=versions())
        save_calibration(path, student, meta)


def own_width_dobi(student, calib_lr: torch.Tensor) -> dict[str, tuple[float, float]]:
    """DOBI at their own width for the quantizers wider than the recipe's bits (the cached
    statistics hold only the recipe widths); one FP pass that searches those quantizers only."""
    qs = dict(quantizers(student))
    wide = {n for n, q in qs.items() if q.bits != student.quant_recipe.bits}
    width = {qs[n].bits for n in wide}
    res, _ = collect(student, calib_lr, lambda x, s: search_bounds_multi(x, sorted(width), s),
                     names=wide)
    return {n: r[qs[n].bits] for n, r in res.items()}


def parts_dir(cell: Path) -> Path:
    """Where a cell keeps one JSON per scored image until it is folded into the cell."""
    return cell.with_name(cell.stem + ".parts")


def model_key(run: ScaleRun, bits: int, method: str) -> str:
    """What the parts of a cell were scored with: parts from another model are never mixed in."""
    if method == "fp":
        return run.lm.sha256
    return sha256_file(calib_path(run.scale, bits, method))


def _part_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("model_key")
    except (OSError, ValueError, AttributeError):
        return None


def score(model, scale: int, dataset: str, cell: Path, key: str, lead: bool = True) -> dict | None:
    """Score image by image into ``<cell>.parts/``, each image claimed like a cell.

    An interrupted cell resumes at its next image, and an idle worker can take images of a cell
    that another worker leads (``lead=False``: it returns None when nothing is left to take). The
    lead waits for the images others hold and returns the set's scores.
    """
    from edge_sr.data.datasets import load_benchmark
    from edge_sr.evaluate import DatasetResult, ImageResult, score_pair
    from edge_sr.predictors import TorchPredictor

    pairs = load_benchmark(dataset, scale)
    pred = TorchPredictor(model, scale, "bench")
    parts = parts_dir(cell)
    parts.mkdir(parents=True, exist_ok=True)
    paths = [parts / f"{i:03d}_{pair.name}.json" for i, pair in enumerate(pairs)]
    for path in paths:  # unreadable, or from an earlier calibration or checkpoint: score again
        if path.exists() and _part_key(path) != key:
            log.warning("%s: unreadable or scored with another model; scoring it again", path)
            path.unlink()
    me = f"{socket.gethostname()} {os.getpid()}"
    bar = tqdm(total=len(pairs), initial=sum(p.exists() for p in paths), unit="img", leave=False,
               desc=f"{dataset} x{scale}{'' if lead else ' (helping)'}",
               disable=progress_disabled())
    while True:
        held = False
        for pair, path in zip(pairs, paths):
            if path.exists():
                continue
            if not claim(path):
                held = True
                continue
            try:
                if not path.exists():
                    t0 = time.perf_counter()
                    r = score_pair(pred, pair, scale, dataset, ssim=True)
                    write_json(path, {**dataclasses.asdict(r), "wall": time.perf_counter() - t0,
                                      "worker": me, "model_key": key})
                    bar.update()
            finally:
                release(path)
        if not held and all(p.exists() for p in paths):
            break
        if not lead:
            bar.close()
            return None
        time.sleep(5)
        bar.n = sum(p.exists() for p in paths)  # images others finished meanwhile
        bar.refresh()
    bar.close()
    rows = [json.loads(p.read_text()) for p in paths]
    res = DatasetResult(dataset, [ImageResult(**{k: r[k] for k in
                                                 ("name", "psnr", "ssim", "seconds", "lr_pixels")})
                                  for r in rows])
    return {"psnr": res.psnr, "ssim": res.ssim, "images": len(res.images),
            "eval_seconds": math.fsum(r["wall"] for r in rows),  # per image: model + metrics
            "eval_workers": len({r["worker"] for r in rows}),
            "per_image": [{"name": r["name"], "psnr": r["psnr"], "ssim": r["ssim"],
                           "seconds": r["seconds"]} for r in rows]}


def run_cell(run: ScaleRun, bits: int, method: str, dataset: str, lead: bool = True) -> None:
    """Score one cell; with ``lead=False``, only help score the images of one led elsewhere."""
    path = cell_path(run.scale, bits, method, dataset)
    if path.exists():
        return
    t0 = time.perf_counter()
    if method == "fp":
        model, meta = run.lm.model, {}
    else:
        cm = run.calibrated(bits, method)
        model, meta = cm.model, cm.meta.stats
    scores = score(model, run.scale, dataset, path, model_key(run, bits, method), lead)
    if scores is None:
        return
    out = {"scale": run.scale, "bits": bits, "method": method, "dataset": dataset,
           **scores, "calibration": {k: v for k, v in meta.items()},
           "checkpoint": run.lm.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": device_name(), "device_type": torch.device(DEVICE).type,
           "versions": versions()}
    write_json(path, out)
    shutil.rmtree(parts_dir(path), ignore_errors=True)
    log.info("x%d W%d %s %s: %.3f dB (%.0f s)", run.scale, bits, method, dataset, out["psnr"],
             time.perf_counter() - t0)


def plan(scales: list[int], bits_list: list[int], datasets: tuple[str, ...] = SETS,
         methods: tuple[str, ...] = METHODS) -> list[tuple[int, int, str, str]]:
    cells = []
    for s in scales:
        for ds in ("Set5", "Set14"):
            cells.append((s, 32, "fp", ds))
            cells += [(s, b, m, ds) for b in bits_list for m in methods]
    for ds in ("B100", "Urban100"):
        for s in (s for s in scales if s in FAMILY.wide_scales):
            cells.append((s, 32, "fp", ds))
            cells += [(s, b, m, ds) for b in (4, 2) if b in bits_list for m in methods]
    return [c for c in cells if c[3] in datasets]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="swinir")
    ap.add_argument("--scales", default=None, help="default: the family's (2,4,3 / 2,3)")
    ap.add_argument("--bits", default="4,2,3")
    ap.add_argument("--datasets", default=",".join(SETS), help="restrict the plan to these sets")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"some of {', '.join(ORDER[1:])} (FP always runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda[:N]; several workers may share one results folder")
    ap.add_argument("--out", default=None,
                    help="results folder instead of the family's (its table goes there too)")
    ap.add_argument("--table", action="store_true", help="only rewrite the table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    global FAMILY, DEVICE
    FAMILY = FAMILIES[args.family]
    if args.out:
        FAMILY = dataclasses.replace(FAMILY, out=Path(args.out), doc=Path(args.out) / "table.md")
    DEVICE = args.device
    scales = _int_list(ap, "--scales", args.scales, FAMILY.scales) if args.scales \
        else list(FAMILY.scales)
    bits_list = _int_list(ap, "--bits", args.bits, range(2, 9))
    datasets = tuple(d for d in args.datasets.split(",") if d)
    if unknown := set(datasets) - set(SETS):
        ap.error(f"--datasets: unknown {sorted(unknown)}; expected some of {', '.join(SETS)}")
    methods = tuple(m for m in args.methods.split(",") if m)
    if unknown := set(methods) - set(ORDER[1:]):
        ap.error(f"--methods: unknown {sorted(unknown)}; expected some of {', '.join(ORDER[1:])}")
    if not args.table:
        from calibrate.api import check_device

        check_device(DEVICE)
        if torch.device(DEVICE).type == "cuda":  # plain FP32 like the CPU cells: no TF32 convs
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        torch.set_num_threads(args.threads)
        keep_freed_memory()
        exit_on_sigterm()
        work(plan(scales, bits_list, datasets, methods), bits_list)
    write_table()


def _int_list(ap: argparse.ArgumentParser, flag: str, text: str, allowed) -> list[int]:
    """A comma-separated list of integers from ``allowed``, or an argparse error naming ``flag``."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ap.error(f"{flag} {text!r}: expected comma-separated integers")
    if not vals or any(v not in allowed for v in vals):
        ap.error(f"{flag} {text!r}: expected some of {', '.join(map(str, allowed))}")
    return vals


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so a stopped worker releases its claims (``finally``) and
    leaves no lock that a worker on another host would have to respect forever."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def work(cells: list[tuple[int, int, str, str]], bits_list: list[int]) -> None:
    """Run every missing cell in plan order. Cells and calibrations are claimed, so several
    workers (processes, e.g. sharing one GPU) can run the same plan side by side; a cell whose
    calibration another worker is making is retried later. A worker left with nothing of its own
    helps score the images of cells that others are running, then stops."""
    runs: dict[int, ScaleRun] = {}

    def run_for(s: int) -> ScaleRun:
        nonlocal runs
        if s not in runs:
            runs = {s: ScaleRun(s, bits_list)}  # one scale in memory at a time
        return runs[s]

    pending = [c for c in cells if not cell_path(*c).exists()]
    while pending:
        progressed = waiting = False
        for s, b, m, ds in pending:
            path = cell_path(s, b, m, ds)
            if path.exists() or not claim(path):
                continue
            try:
                run_cell(run_for(s), b, m, ds)
                progressed = True
                write_table()
            except Busy as e:
                waiting = True
                log.debug("x%d W%d %s %s waits for %s", s, b, m, ds, e)
            finally:
                release(path)
        pending = [c for c in pending if not cell_path(*c).exists()]
        if not progressed:
            if not waiting:
                help_others(pending, run_for)
                return  # what is left is claimed by other workers
            time.sleep(5)


def help_others(pending: list[tuple[int, int, str, str]], run_for) -> None:
    """Take unclaimed images of the cells other workers are scoring, one cell after another."""
    for s, b, m, ds in pending:
        path = cell_path(s, b, m, ds)
        if path.exists() or not parts_dir(path).is_dir():
            continue
        log.info("x%d W%d %s %s: helping the worker that runs it", s, b, m, ds)
        try:
            run_cell(run_for(s), b, m, ds, lead=False)
        except Busy:
            continue


def _load_cells() -> dict:
    cells = {}
    for p in sorted(FAMILY.out.glob("x*_w*_*.json")):
        if "stats_time" in p.name:
            continue
        d = json.loads(p.read_text())
        cells[(d["scale"], d["bits"], d["method"], d["dataset"])] = d
    return cells


def _fmt(v, spec="{:.2f}"):
    return "–" if v is None else spec.format(v)


def render(cells: dict, cpu_model: str) -> str:
    """Markdown tables: PSNR, our drop from FP and the paper's drop, per set."""
    cq_note = (" After the slash: CondiQuant's published drop for SwinIR-light at the same scale "
               "and bits (docs/anchors.md)." if FAMILY.condiquant else "")
    gpus = sorted({c["device"] for c in cells.values() if c.get("device_type") == "cuda"})
    where = f" (cells marked † on {', '.join(gpus)}, `--device cuda`)" if gpus else ""
    lines = [f"Generated by `python -m benchmarks.accuracy --family {FAMILY.key}` on {cpu_model}"
             f"{where}, {datetime.date.today().isoformat()}. Model: {FAMILY.title}. Y-PSNR (dB) / "
             "drop from our FP; *paper* = the drop from FP in 2DQuant's Table 3 (spec §6, "
             "SwinIR-light) for the same scale, bits and method (its 2DQuant row for both of our "
             f"recipes).{cq_note} '–' = not run.", ""]
    for sets in (("Set5", "Set14"), ("B100", "Urban100")):
        head = "| scale | bits | method | " + " | ".join(
            f"{d} PSNR | {d} drop | {d} paper drop" for d in sets) + " | held-out val PSNR | notes |"
        rows = []
        keys = sorted({(s, b, m) for (s, b, m, d) in cells if d in sets},
                      key=lambda k: (k[0], -k[1], ORDER.index(k[2])))
        for s, b, m in keys:
            row = [f"x{s}", "FP" if b == 32 else str(b), LABEL[m]]
            t, v = "", None
            for d in sets:
                c, fp = cells.get((s, b, m, d)), cells.get((s, 32, "fp", d))
                i = SETS.index(d)
                pm = "2dquant" if m in (PAPER_RECIPE, PAPER_CUT) else m
                pd = (PAPER[s][(pm, b)][i] - PAPER[s][("fp", 32)][i]) if (pm, b) in PAPER[s] else None
                drop = c["psnr"] - fp["psnr"] if c and fp else None
                paper = _fmt(pd if m != "fp" else None, "{:+.2f}")
                if FAMILY.condiquant and m != "fp" and b in CONDIQUANT.get(s, {}):
                    paper += f" / {CONDIQUANT[s][b][i] - PAPER[s][('fp', 32)][i]:+.2f}"
                mark = "†" if c and c.get("device_type") == "cuda" else ""
                row += [_fmt(c and c["psnr"]) + mark, _fmt(drop, "{:+.2f}"), paper]
                if c and c.get("calibration"):
                    cal = c["calibration"]
                    v = cal.get("val_psnr", cal.get("val_psnr_init"))
                    if "dqc_planned_iterations" in cal:
                        t = (f"DQC stopped at {cal['dqc_iterations']} of "
                             f"{cal['dqc_planned_iterations']} it (best @{cal['dqc_best_iteration']})"
                             f" on {cal.get('device') or 'a GPU'}")
                    elif "dqc_seconds" in cal:
                        # older files name the device only (a GPU's name is its vendor's)
                        gpu = (cal.get("device_type") == "cuda"
                               or cal.get("device", "").startswith("NVIDIA"))
                        t = (f"DQC {cal['dqc_seconds']:.0f} s{' on GPU' if gpu else ''} "
                             f"({cal['dqc_iterations']} it, best @{cal['dqc_best_iteration']})")
                    elif "percentile" in cal:
                        t = f"picked {cal['percentile']}"
            rows.append("| " + " | ".join(row + [_fmt(v), t]) + " |")
        if rows:
            lines += [head, "|" + "---|" * (3 + 3 * len(sets) + 2), *rows, ""]
    lines += ordering(cells)
    missing = [c for c in plan(list(FAMILY.scales), [4, 2, 3]) if c not in cells]
    if missing:
        by: dict = {}
        for sc, b, m, d in missing:
            parts = parts_dir(cell_path(sc, b, m, d))
            done = len(list(parts.glob("*.json"))) if parts.is_dir() else 0
            by.setdefault((sc, d), []).append(f"{LABEL[m]}" + ("" if b == 32 else f" W{b}")
                                              + (f" ({done} image{'s' * (done > 1)} scored)" if done else ""))
        lines += ["**Not run yet** (each cell resumes with the command above, at its next image):",
                  ""]
        lines += [f"- x{sc} {d}: {', '.join(v)}" for (sc, d), v in by.items()]
        lines.append("")
    for p in sorted(FAMILY.out.glob("x*_stats_time.json")):
        d = json.loads(p.read_text())
        lines.append(f"- {p.name[:2]}: one FP statistics pass (DOBI for bits {d['bits']} + "
                     f"MinMax/Percentile, {d['quantizers']} quantizers): {d['seconds']:.0f} s, of "
                     f"which searches {d['rule_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def ordering(cells: dict) -> list[str]:
    """The paper's claims, checked cell by cell: DOBI > MinMax and > Percentile per set; 2DQuant
    > DOBI on the mean over the sets both ran on (only where every compared cell exists)."""
    out = []
    def psnr_at(s, b, m, d):
        c = cells.get((s, b, m, d))
        return None if c is None else c["psnr"]

    for s, b in sorted({(s, b) for (s, b, m, _) in cells if m != "fp"},
                       key=lambda k: (k[0], -k[1])):
        psnr = functools.partial(psnr_at, s, b)

        parts = []
        for rival in ("minmax", "percentile"):
            diffs = [(d, psnr("dobi", d) - psnr(rival, d)) for d in SETS
                     if psnr("dobi", d) is not None and psnr(rival, d) is not None]
            if diffs:
                won = all(v > 0 for _, v in diffs)
                parts.append(f"DOBI {'>' if won else 'not >'} {LABEL[rival]} ("
                             + ", ".join(f"{d} {v:+.3f}" for d, v in diffs) + ")")
        both = [d for d in SETS if psnr("dobi", d) is not None and psnr("2dquant", d) is not None]
        if both:
            gain = sum(psnr("2dquant", d) - psnr("dobi", d) for d in both) / len(both)
            parts.append(f"2DQuant {'>' if gain > 0 else 'not >'} DOBI (mean over "
                         f"{'/'.join(both)} {gain:+.3f})")
        if parts:
            out.append(f"- x{s} W{b}: " + "; ".join(parts) + ".")
    return (["**The paper's ordering, checked** (dB, ours; '>' = holds):", "", *out, ""]
            if out else [])


def write_table() -> None:
    """Replace the generated block of docs/results/accuracy.md (between the markers)."""
    block = f"{START}\n{render(_load_cells(), cpu_model())}{END}"
    doc = FAMILY.doc
    old = doc.read_text() if doc.exists() else f"# Accuracy\n\n{START}\n{END}\n"
    if START in old and END in old:
        text = old[:old.index(START)] + block + old[old.index(END) + len(END):]
    else:
        text = old + "\n" + block + "\n"
    from edge_sr.fileio import atomic_path

    doc.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(doc) as tmp:
        tmp.write_text(text)
    plot_psnr_vs_bits(_load_cells(), FAMILY.out / "psnr_vs_bits.png")


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
        for m in ORDER[1:]:
            pts = sorted((b, c["psnr"]) for (sc, b, mm, d), c in cells.items()
                         if sc == s and mm == m and d == "Set5")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABEL[m])
        fp = cells.get((s, 32, "fp", "Set5"))
        if fp:
            ax.axhline(fp["psnr"], ls="--", color="k", label="FP")
        ax.set(title=f"x{s} {FAMILY.title}, Set5", xlabel="bits (W = A)",
               ylabel="Y-PSNR (dB)", xticks=[2, 3, 4])
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


START, END = "<!-- accuracy-table:start -->", "<!-- accuracy-table:end -->"


if __name__ == "__main__":
    main()
