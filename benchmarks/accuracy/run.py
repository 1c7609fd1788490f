"""Running the accuracy bench: calibrate (cached, claimed), score each cell image by image
(resumable), and work through a plan beside other workers."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import socket
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.accuracy.claims import Busy, claim, release
from benchmarks.accuracy.plan import (
    DQC_METHODS,
    PAPER_CUT,
    PAPER_RECIPE,
    SETTINGS,
    SHARED,
    WIDE,
    calib_path,
    cell_path,
    parts_dir,
)
from benchmarks.accuracy.report import write_table
from calibrate.api import (
    DQC_BUDGETS,
    CalibrationConfig,
    calibrate_model,
    clear_dqc_state,
    dqc_state_path,
    pool_data,
)
from calibrate.baselines import baseline_rule
from calibrate.calibfile import load_calibrated, save_calibration
from calibrate.dobi import collect, search_bounds_multi
from edge_sr.fileio import sha256_file, versions, write_json
from edge_sr.hardware import cpu_model
from edge_sr.logutil import progress_disabled

log = logging.getLogger("benchmarks.accuracy")


def device_name() -> str:
    if SETTINGS.device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(SETTINGS.device))
    return cpu_model()


class ScaleRun:
    """Everything one scale needs, built lazily: FP model, pool data, bound statistics."""

    def __init__(self, scale: int, bits_list: list[int]) -> None:
        from edge_sr.checkpoints import load_model

        self.scale, self.bits_list = scale, bits_list
        self.lm = load_model(SETTINGS.family.checkpoint.format(scale=scale), device=SETTINGS.device)
        self._data = self._stats = None
        self._budget_data: dict = {}

    @property
    def data(self):
        if self._data is None:
            self._data = pool_data(self.scale, "fast", seed=0)
        return self._data

    def budget_data(self, budget: str, lr_patch: int | None = None):
        """The DQC budget's pool data (DQC patches of ``lr_patch``, else the budget's): the same
        32 DOBI patches, its own DQC and validation patches."""
        if budget == "fast" and lr_patch in (None, DQC_BUDGETS["fast"]["dqc"].lr_patch):
            return self.data
        if (budget, lr_patch) not in self._budget_data:
            self._budget_data[budget, lr_patch] = pool_data(self.scale, budget, seed=0,
                                                            lr_patch=lr_patch)
        return self._budget_data[budget, lr_patch]

    def stats(self, student):
        """One FP pass: DOBI for every bit width + MinMax/Percentile bounds, per quantizer."""
        cache = SETTINGS.family.out / f"x{self.scale}_stats.pt"
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
            write_json(SETTINGS.family.out / f"x{self.scale}_stats_time.json",
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
        cfg = CalibrationConfig(model=self.lm.name, bits=bits, output=str(path),
                                method="2dquant" if method in DQC_METHODS else method,
                                budget="paper" if method == PAPER_RECIPE else "fast",
                                qkv_separation=method != SHARED,
                                wide_inputs=("fc1",) if method == WIDE else (),
                                device=SETTINGS.device)
        # the same API as `edge-sr calibrate`; an interrupted DQC resumes from its state
        state = dqc_state_path(path)
        cfg = dataclasses.replace(cfg, resume=state.exists())
        data = self.budget_data(cfg.budget, cfg.dqc_config(self.lm.model).lr_patch)
        cal = calibrate_model(self.lm, data, cfg, state_path=state)
        meta = dataclasses.replace(cal.meta, stats=cal.meta.stats | {
            "device": device_name(), "device_type": torch.device(SETTINGS.device).type})
        save_calibration(path, cal.model, meta)
        clear_dqc_state(state)


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
    from runtime.predictors import TorchPredictor

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
           "device": device_name(), "device_type": torch.device(SETTINGS.device).type,
           "versions": versions()}
    write_json(path, out)
    shutil.rmtree(parts_dir(path), ignore_errors=True)
    log.info("x%d W%d %s %s: %.3f dB (%.0f s)", run.scale, bits, method, dataset, out["psnr"],
             time.perf_counter() - t0)


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
