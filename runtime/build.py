"""``edge-sr build``: FP checkpoint -> calibrate -> export -> build -> validate -> manifest.

Everything is built in a hidden temporary directory beside ``--out`` and renamed onto it only
when every stage succeeded, so an error or Ctrl-C never leaves a partial engine (an existing
engine is replaced only at that last rename, and only with ``--force``). Calibrations are cached
under ``$EDGE_SR_CACHE/calibrations`` (default ``$XDG_CACHE_HOME/edge-sr`` or ``~/.cache/edge-sr``), keyed by a hash of
everything that determines them, so rebuilding for another backend or tile skips the slow stage.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from calibrate.api import METHODS, RECIPES, CalibrationConfig, calibrate
from edge_sr.checkpoints import cache_dir
from edge_sr.errors import EdgeSRError, MissingDependencyError
from edge_sr.fileio import atomic_path, sha256_file, versions
from edge_sr.logutil import progress_disabled
from runtime.engine import (
    FP32_FILE,
    MODEL_FILE,
    TRT_FILE,
    TRT_FP32_FILE,
    Manifest,
    file_entry,
    write_manifest,
)

log = logging.getLogger(__name__)

# Methods come from calibrate.api (2dquant = DOBI + DQC, the paper; edge-sr = 2DQuant with the
# measured options beyond it; the others are baselines without DQC).
STAGES = ("checkpoint", "calibrate", "export", "build", "validate", "manifest")
CALIB_CACHE_VERSION = 2  # 2: the edge-sr method holds FP weights as FP16
FIDELITY_CAP_DB = 100.0  # identical outputs have infinite PSNR; JSON has no infinity


@dataclass
class BuildConfig:
    """What ``edge-sr build`` builds; every field maps to one CLI option."""

    bits: int
    scale: int
    model: str | None = None  # registry name or checkpoint path; default swinir-light-x{s}-ref
    backend: str = "auto"  # auto | ort | trt
    recipe: str = "cpu"  # a key of calibrate.api.RECIPES
    method: str = "edge-sr"  # calibrate.api.METHODS (docs/results/beyond.md for why)
    tile: tuple[int, int] = (64, 64)
    # a camera's LR frame (width, height): the engine is exported at it, padded up to the model's
    # multiple (and minimum), so a frame runs as one tile; replaces ``tile``
    input_size: tuple[int, int] | None = None
    batch: int = 1
    overlap: int | None = None  # LR pixels shared by neighbouring tiles (default tile/4)
    out: str | Path | None = None  # default engines/<model>-w{b}a{b}
    force: bool = False
    threads: int | None = None  # torch (calibration, validation) and ORT threads; None: defaults
    val_images: int = 4  # held-out BSD200 images for the build-time check
    val_crop: int = 96  # centre LR crop of each (keeps validation to seconds)
    cache_dir: str | Path | None = None
    seed: int = 0
    calib_iterations: int | None = None  # override the recipe's DQC iterations (smoke tests)
    wide_inputs: tuple[str, ...] = ()  # linear roles with 8-bit inputs (QuantRecipe.wide_inputs)
    rotate: tuple[str, ...] | None = None  # CalibrationConfig.rotate (None: the method's)
    weight_grid: str | None = None  # CalibrationConfig.weight_grid (None: the method's)
    fp_weights: str | None = None  # CalibrationConfig.fp_weights (None: the method's)
    fp_sites: tuple[str, ...] = ()  # CalibrationConfig.fp_sites: site kinds kept in FP
    # CalibrationConfig.grid; "auto": the backend's native grid ("ort" on ONNX Runtime, "trt" on
    # TensorRT), measured to cost nothing against "real" and to make the ORT engine faster than
    # FP32 (docs/results/grids.md)
    grid: str = "auto"
    shared_qkv_input: bool = False  # one qkv input quantizer: one integer GEMM (not the paper)
    avg_bits: float | None = None  # CalibrationConfig.avg_bits (mixed precision)
    rounding: str | None = None  # CalibrationConfig.rounding (None: the method's)

    def __post_init__(self) -> None:
        self.tile = tuple(int(t) for t in self.tile)
        if self.input_size is not None:
            self.input_size = tuple(int(v) for v in self.input_size)
            if len(self.input_size) != 2 or min(self.input_size) < 1:
                raise EdgeSRError(f"--input-size: expected WIDTHxHEIGHT in pixels, got "
                                  f"{self.input_size}")
        self.wide_inputs = tuple(self.wide_inputs)
        self.fp_sites = tuple(self.fp_sites)
        if self.rotate is not None:
            self.rotate = tuple(self.rotate)
        if self.backend not in ("auto", "ort", "trt"):
            raise EdgeSRError(f"--backend: expected auto, ort or trt, got {self.backend!r}")
        if self.recipe not in RECIPES:
            raise EdgeSRError(f"--recipe: expected one of {', '.join(RECIPES)}, got "
                              f"{self.recipe!r}")
        if self.method not in METHODS:
            raise EdgeSRError(f"--method: expected one of {', '.join(METHODS)}, got "
                              f"{self.method!r}")
        if self.scale not in (2, 3, 4):
            raise EdgeSRError(f"--scale: expected 2, 3 or 4, got {self.scale}")
        if len(self.tile) != 2 or min(self.tile) < 1 or self.batch < 1:
            raise EdgeSRError(f"--tile/--batch: expected positive sizes, got {self.tile} and "
                              f"{self.batch}")
        if self.val_images < 1 or self.val_crop < 8:
            raise EdgeSRError("validation needs at least one image and a crop of 8 pixels or more")
        self.calibration_config().validate()  # --bits, --wide-inputs, --rotate, ... before any work

    def calibration_config(self, model: str = "-", output: str | Path = "-") -> CalibrationConfig:
        """The ``calibrate.api`` configuration this build calibrates with."""
        return CalibrationConfig(model=model, scale=self.scale, bits=self.bits,
                                 method=self.method, recipe=self.recipe, output=str(output),
                                 seed=self.seed, iterations=self.calib_iterations,
                                 qkv_separation=not self.shared_qkv_input,
                                 wide_inputs=self.wide_inputs, rotate=self.rotate,
                                 weight_grid=self.weight_grid, grid=self.resolved_grid(),
                                 fp_weights=self.fp_weights, fp_sites=self.fp_sites,
                                 avg_bits=self.avg_bits, rounding=self.rounding)

    def resolved_grid(self) -> str:
        """``grid``, with "auto" resolved to the backend's native grid."""
        if self.grid != "auto":
            return self.grid
        return "trt" if resolve_backend(self.backend) == "tensorrt" else "ort"

    @property
    def model_name(self) -> str:
        return self.model or f"swinir-light-x{self.scale}-ref"

    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        stem = Path(self.model_name).stem if os.sep in self.model_name else self.model_name
        return Path("engines") / f"{stem}-w{self.bits}a{self.bits}"


def resolve_backend(choice: str) -> str:
    """``auto`` -> TensorRT when a CUDA GPU and tensorrt are usable, else ONNX Runtime."""
    if choice == "ort":
        return "onnxruntime"
    if choice == "trt":
        return "tensorrt"
    with contextlib.suppress(Exception):
        import importlib.util

        if importlib.util.find_spec("tensorrt") is not None:
            import torch

            if torch.cuda.is_available():
                return "tensorrt"
    return "onnxruntime"


def cache_root(cfg: BuildConfig | None = None) -> Path:
    """Where build keeps calibration files: ``cfg.cache_dir``, else the user cache."""
    if cfg is not None and cfg.cache_dir is not None:
        return Path(cfg.cache_dir)
    return Path(cache_dir()) / "calibrations"


def calibration_key(model_sha256: str, cfg: BuildConfig) -> str:
    """Hash of every input that determines a calibration (not the tile, backend or output)."""
    blob = json.dumps({"v": CALIB_CACHE_VERSION, "model": model_sha256, "scale": cfg.scale,
                       "bits": cfg.bits, "recipe": cfg.recipe, "method": cfg.method,
                       "seed": cfg.seed, "iterations": cfg.calib_iterations}
                      | ({"wide_inputs": list(cfg.wide_inputs)} if cfg.wide_inputs else {})
                      | {k: v for k, v in (("rotate", cfg.rotate and list(cfg.rotate)),
                                           ("weight_grid", cfg.weight_grid),
                                           ("fp_weights", cfg.fp_weights),
                                           ("fp_sites", list(cfg.fp_sites) or None),
                                           ("grid", None if cfg.resolved_grid() == "real"
                                            else cfg.resolved_grid()),
                                           ("shared_qkv", cfg.shared_qkv_input or None),
                                           ("avg_bits", cfg.avg_bits),
                                           ("rounding", cfg.rounding)) if v is not None},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# --- stages ------------------------------------------------------------------------------------

def stage_checkpoint(cfg: BuildConfig):
    from edge_sr.checkpoints import load_model

    lm = load_model(cfg.model_name, scale=cfg.scale)
    if cfg.input_size is not None:
        w, h = cfg.input_size
        cfg.tile = lm.model.size_requirements.fit(h, w)
        log.info("--input-size %dx%d: engine shape %dx%d (H x W, padded to the %s window)",
                 *cfg.input_size, *cfg.tile, lm.arch)
    why = lm.model.size_requirements.check_tile(*cfg.tile)
    if why:
        raise EdgeSRError(f"--tile: {why} (the {lm.arch} window)")
    return lm


def run_calibration(lm, cfg: BuildConfig, output: Path) -> Path:
    """Call the calibration API (``calibrate.api``) and return the calibration file it wrote."""
    cc = cfg.calibration_config(model=str(lm.path), output=output)
    return Path(calibrate(cc, lm=lm))  # the checkpoint is loaded and hashed once


def stage_calibrate(lm, cfg: BuildConfig) -> tuple[Path, dict]:
    key = calibration_key(lm.sha256, cfg)
    path = cache_root(cfg) / f"{lm.arch}-x{cfg.scale}-w{cfg.bits}-{cfg.recipe}-{key}.pt"
    cached = path.is_file()
    if cached:
        log.info("calibration: reusing cached %s", path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".tmp.pt") as tmp:
            written = run_calibration(lm, cfg, tmp)
            if Path(written) != tmp:
                shutil.copyfile(written, tmp)
    return path, {"key": key, "sha256": sha256_file(path), "cached": cached, "file": path.name}


def load_student(calib_path: Path, lm):
    from calibrate.calibfile import load_calibrated

    cal = load_calibrated(calib_path, model=lm.model)
    return getattr(cal, "model", cal).eval()


def stage_export(student, lm, cfg: BuildConfig, backend: str, work: Path) -> None:
    from calibrate.export_qdq import ExportConfig, export_qdq
    from edge_sr.onnx_export import export_fp_onnx

    target = "trt" if backend == "tensorrt" else "ort"
    export_qdq(student, ExportConfig(target=target, tile=cfg.tile, batch=cfg.batch),
               work / MODEL_FILE)
    export_fp_onnx(lm.model, work / FP32_FILE, tile=cfg.tile, batch=cfg.batch)


def stage_build(cfg: BuildConfig, backend: str, work: Path) -> None:
    """ORT: the QDQ graph is the artifact (ORT optimises it at load, per machine); check it loads.

    TensorRT: build the plan from the QDQ graph with ``runtime.backends.tensorrt``.
    """
    if backend == "tensorrt":
        try:
            from runtime.backends.tensorrt import build_engine
        except ImportError as e:
            raise MissingDependencyError(
                f"--backend trt: the TensorRT backend is not usable here ({e}); install TensorRT "
                "(NVIDIA's index or JetPack) on a CUDA machine, or use --backend ort") from None
        build_engine(work / MODEL_FILE, work / TRT_FILE, tile=cfg.tile, batch=cfg.batch)
        build_engine(work / FP32_FILE, work / TRT_FP32_FILE, tile=cfg.tile, batch=cfg.batch)
        return
    from runtime.backends.onnxruntime import OrtBackend

    for name in (MODEL_FILE, FP32_FILE):
        OrtBackend(work / name, threads=cfg.threads, max_batch=cfg.batch).close()


def centre_crop(pair, crop: int, scale: int):
    """The centre ``crop`` x ``crop`` LR window of a pair and its HR."""
    h, w = pair.lr.shape[:2]
    ch, cw = min(crop, h), min(crop, w)
    y, x = (h - ch) // 2, (w - cw) // 2
    return (pair.lr[y:y + ch, x:x + cw],
            pair.hr[y * scale:(y + ch) * scale, x * scale:(x + cw) * scale])


def stage_validate(student, lm, cfg: BuildConfig, backend_name: str, work: Path,
                   manifest: Manifest) -> dict:
    """Score the engine on held-out BSD200 crops (never the test sets).

    ``psnr_y_db``: the engine against HR. ``fidelity_psnr_y_db``: the engine's output against
    the fake-quant model's, both through the same tiles, so it measures export + runtime error
    only. The fake-quant (tiled) and FP (whole-crop) PSNRs against HR put the drop in context.
    """
    import numpy as np
    import torch

    from edge_sr.data import pool_split
    from edge_sr.data.images import to_tensor, to_uint8
    from edge_sr.data.pool import pool_pairs
    from edge_sr.metrics import psnr_y
    from runtime.engine import Engine
    from runtime.predictors import BackendPredictor, TorchBackend

    pairs = pool_pairs(pool_split().val[: cfg.val_images], cfg.scale)
    engine_pred = BackendPredictor(Engine(work, manifest).backend(threads=cfg.threads),
                                   manifest.name, overlap=manifest.overlap)
    fq_pred = BackendPredictor(TorchBackend(student, cfg.scale, cfg.tile, cfg.batch),
                               "fake-quant", overlap=manifest.overlap)
    rows = []
    s = cfg.scale
    for pair in tqdm(pairs, desc="validate", unit="img", leave=False,
                     disable=progress_disabled()):
        lr, hr = centre_crop(pair, cfg.val_crop, s)
        x = to_tensor(lr)
        with torch.no_grad():
            sr_engine, sr_fq = to_uint8(engine_pred(x)), to_uint8(fq_pred(x))
            sr_fp = to_uint8(lm.model(x))
        diff = np.abs(sr_engine.astype(np.int16) - sr_fq.astype(np.int16))
        rows.append({"image": pair.name, "lr_size": list(lr.shape[:2]),
                     "psnr_engine": psnr_y(sr_engine, hr, s),
                     "psnr_fake_quant": psnr_y(sr_fq, hr, s), "psnr_fp": psnr_y(sr_fp, hr, s),
                     "fidelity_psnr": min(psnr_y(sr_engine, sr_fq, 0), FIDELITY_CAP_DB),
                     "max_abs_diff_vs_fake_quant": int(diff.max()),
                     "share_pixels_differing": float((diff > 0).mean())})
    engine_pred.close()

    def mean(k: str) -> float:
        return float(np.mean([r[k] for r in rows]))

    return {"images": "BSD200 held-out validation split (edge_sr.data.pool_split().val), "
                      f"first {len(rows)}, centre {cfg.val_crop}x{cfg.val_crop} LR crops",
            "backend": backend_name,
            "psnr_y_db": mean("psnr_engine"), "psnr_y_fake_quant_db": mean("psnr_fake_quant"),
            "psnr_y_fp_db": mean("psnr_fp"), "fidelity_psnr_y_db": mean("fidelity_psnr"),
            "per_image": rows}


# --- driver ------------------------------------------------------------------------------------

@contextlib.contextmanager
def staging_dir(out: Path, force: bool):
    """A hidden work directory beside ``out``; renamed onto ``out`` only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        yield work
        os.chmod(work, 0o755)  # mkdtemp/mkstemp make 0700/0600; an engine is meant to be shared
        for f in work.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            if not force:
                raise EdgeSRError(f"--out {out}: already exists; pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "engine")
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Treat SIGTERM like Ctrl-C, so ``kill`` also unwinds the staging directory."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    stage_seconds: dict[str, float] = field(default_factory=dict)


def build(cfg: BuildConfig) -> BuildResult:
    """Run every stage and return the engine directory with its manifest."""
    out = cfg.out_dir()
    if out.exists() and not cfg.force:
        raise EdgeSRError(f"--out {out}: already exists; pass --force to replace it")
    backend = resolve_backend(cfg.backend)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)  # on a loaded CPU, fewer OpenMP threads can be faster
    log.info("building %s: %s x%d W%dA%d, recipe %s, backend %s, tile %dx%d", out,
             cfg.model_name, cfg.scale, cfg.bits, cfg.bits, cfg.recipe, backend, *cfg.tile)
    times: dict[str, float] = {}
    bar = tqdm(total=len(STAGES), desc="build", unit="stage", disable=progress_disabled())

    @contextlib.contextmanager
    def stage(name: str):
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        yield
        times[name] = round(time.perf_counter() - t0, 2)
        log.info("stage %s: %.1f s", name, times[name])
        bar.update(1)

    try:
        with sigterm_as_interrupt(), staging_dir(out, cfg.force) as work:
            with stage("checkpoint"):
                lm = stage_checkpoint(cfg)
            with stage("calibrate"):
                calib_path, calib_info = stage_calibrate(lm, cfg)
                student = load_student(calib_path, lm)
                if (qr := getattr(student, "quant_recipe", None)) is not None:
                    # what was calibrated: rotated sites, weight grid, per-site input bits
                    calib_info["quant_recipe"] = qr.to_dict()
            with stage("export"):
                stage_export(student, lm, cfg, backend, work)
            with stage("build"):
                stage_build(cfg, backend, work)
            from runtime.tiling import default_overlap

            files = {"model": file_entry(work, MODEL_FILE), "fp32": file_entry(work, FP32_FILE)}
            if (work / TRT_FILE).exists():
                files["engine"] = file_entry(work, TRT_FILE)
                files["fp32_engine"] = file_entry(work, TRT_FP32_FILE)
            manifest = Manifest(
                name=out.name,
                model={"name": lm.name, "path": str(lm.path), "sha256": lm.sha256,
                       "arch": lm.arch, "config": lm.model.config()},
                scale=cfg.scale, bits=cfg.bits, backend=backend, tile=list(cfg.tile),
                batch=cfg.batch,
                overlap=default_overlap(cfg.tile) if cfg.overlap is None else cfg.overlap,
                precision=f"w{cfg.bits}a{cfg.bits}-qdq", files=files, recipe=cfg.recipe,
                method=cfg.method, calibration=calib_info, versions=versions(),
                build_config=config_dict(cfg))
            with stage("validate"):
                manifest.validation = stage_validate(student, lm, cfg, backend, work, manifest)
            with stage("manifest"):
                manifest.stage_seconds = dict(times)
                manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                write_manifest(work, manifest)
    finally:
        bar.close()
    v = manifest.validation
    log.info("engine %s: PSNR %.3f dB (fake-quant %.3f, FP %.3f), fidelity %.2f dB", out,
             v["psnr_y_db"], v["psnr_y_fake_quant_db"], v["psnr_y_fp_db"],
             v["fidelity_psnr_y_db"])
    return BuildResult(out, manifest, times)


def config_dict(cfg: BuildConfig) -> dict:
    d = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    d["out"] = str(cfg.out_dir())
    d["tile"] = list(cfg.tile)
    return d
