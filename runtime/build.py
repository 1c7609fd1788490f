"""``edge-sr build``: FP checkpoint -> calibrate -> export -> build -> validate -> manifest.

Everything is built in a hidden temporary directory beside ``--out`` and renamed onto it only
when every stage succeeded, so an error or Ctrl-C never leaves a partial engine (an existing
engine is replaced only at that last rename, and only with ``--force``). Calibrations are cached
(``runtime.calib_cache``), so rebuilding for another backend or tile skips the slow stage; the
last stage scores the engine on held-out crops (``runtime.validation``).

``dynamic`` (``--dynamic``) builds an engine whose graphs take any input height and width
(ONNX Runtime only, models with ``SRModel.dynamic_export``): each image then runs whole, in one
call padded to the model's multiple, with no tiles (``runtime.tiling.run_whole``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from calibrate.api import CalibrationConfig
from calibrate.export_qdq import ExportConfig, export_qdq
from calibrate.vocab import BUDGETS, METHODS, expected
from edge_sr.checkpoints import load_model
from edge_sr.errors import EdgeSRError, MissingDependencyError, sigterm_as_interrupt
from edge_sr.fileio import check_writable, versions
from edge_sr.logutil import progress_disabled
from edge_sr.onnx_export import export_fp_onnx
from runtime.backends.onnxruntime import OrtBackend
from runtime.calib_cache import cache_root, cached_calibration, given_calibration, load_student
from runtime.engine import (
    FP32_FILE,
    MODEL_FILE,
    TRT_FILE,
    TRT_FP32_FILE,
    Engine,
    Manifest,
    file_entry,
    write_manifest,
)
from runtime.profile import speed_check
from runtime.tiling import default_overlap
from runtime.validation import validate_engine
from runtime.vocab import BACKEND_CHOICES, ENGINE_BITS

log = logging.getLogger(__name__)

# Methods come from calibrate.api (2dquant = DOBI + DQC, the paper; edge-sr = 2DQuant with the
# measured options beyond it; the others are baselines without DQC).
# The sites an engine keeps in floating point unless --fp-sites says otherwise, by measurement
# (benchmarks.site_speed, docs/results/grids.md "Per-site choices"): on ONNX Runtime's CPU every
# linear's integer GEMM pays (50-120 ms per kind on a 320x180 frame) and the attention products
# do not (q.k^T and p.v quantized together: 0-5% slower, their Q/DQ costing what the integer
# product saves); TensorRT has not been measured, so it keeps the paper's sites.
DEFAULT_FP_SITES = {"onnxruntime": ("qk", "pv"), "tensorrt": ()}
STAGES = ("checkpoint", "calibrate", "export", "build", "validate", "speed", "manifest")
# the engine's LR shape when neither --tile nor --input-size is given: by measurement
# (benchmarks.frame_graphs shapes, docs/results/grids.md "Engine shape"), the cost per pixel falls
# or stays level as the shape grows, and a 320x180 frame takes 2 tiles of 192x192 against 28 of
# 64x64
DEFAULT_TILE = (192, 192)
# the shape a --dynamic export traces at (fitted to the model's window): the graph takes any size,
# so a small trace only makes the export quicker
DYNAMIC_TRACE = (64, 64)


@dataclass
class BuildConfig:
    """What ``edge-sr build`` builds; every field maps to one CLI option."""

    bits: int
    scale: int
    model: str | None = None  # registry name or checkpoint path; default swinir-light-x{s}-ref
    backend: str = "auto"  # auto | ort | trt
    budget: str = "cpu"  # DQC budget (calibrate.vocab.BUDGETS)
    method: str = "edge-sr"  # calibrate.vocab.METHODS (docs/results/beyond.md for why)
    # the engine's LR (height, width) tile; None: DEFAULT_TILE (a --dynamic build: the shape its
    # export traces at, DYNAMIC_TRACE fitted to the model, set by the checkpoint stage; with
    # input_size it stays None until the checkpoint stage fits the frame to the model)
    tile: tuple[int, int] | None = None
    # a camera's LR frame (width, height): the engine is exported at it, padded up to the model's
    # multiple (and minimum), so a frame runs as one tile; replaces ``tile``
    input_size: tuple[int, int] | None = None
    # one engine for any input size (symbolic height and width; ONNX Runtime; models with
    # SRModel.dynamic_export): each image runs whole in one call, no tiles; excludes tile and
    # input_size
    dynamic: bool = False
    batch: int = 1
    overlap: int | None = None  # LR pixels shared by neighbouring tiles (default tile/4)
    out: str | Path | None = None  # default engines/<model>-w{b}a{b}
    force: bool = False
    threads: int | None = None  # torch (calibration, validation) and ORT threads; None: defaults
    val_images: int = 4  # held-out BSD200 images for the build-time check
    val_crop: int = 96  # center LR crop of each (keeps validation to seconds)
    cache_dir: str | Path | None = None
    seed: int = 0
    calib_iterations: int | None = None  # override the budget's DQC iterations (smoke tests)
    wide_inputs: tuple[str, ...] = ()  # linear roles with 8-bit inputs (QuantRecipe.wide_inputs)
    rotate: tuple[str, ...] | None = None  # CalibrationConfig.rotate (None: the method's)
    weight_grid: str | None = None  # CalibrationConfig.weight_grid (None: the method's)
    fp_weights: str | None = None  # CalibrationConfig.fp_weights (None: the method's)
    # CalibrationConfig.fp_sites, the site kinds kept in FP; None: the backend's measured choice
    # (DEFAULT_FP_SITES)
    fp_sites: tuple[str, ...] | None = None
    # CalibrationConfig.grid; "auto": the backend's native grid ("ort" on ONNX Runtime, "trt" on
    # TensorRT), measured to cost nothing against "real" and to make the ORT engine faster than
    # FP32 (docs/results/grids.md)
    grid: str = "auto"
    shared_qkv_input: bool = False  # one qkv input quantizer: one integer GEMM (not the paper)
    quant_conv: bool = False  # CalibrationConfig.quant_conv: body convolutions as QLinearConv
    avg_bits: float | None = None  # CalibrationConfig.avg_bits (mixed precision)
    rounding: str | None = None  # CalibrationConfig.rounding (None: the method's)
    weight_lr: float | None = None  # CalibrationConfig.weight_lr (None: the method's)
    qdrop: float | None = None  # CalibrationConfig.qdrop (None: the method's)
    # build's quick speed check (engine against its FP32 graph, interleaved calls on one tile):
    # this many timed calls of each; 0 skips it
    speed_runs: int = 5
    smooth: float | str | None = None  # CalibrationConfig.smooth (None: the method's)
    # a calibration file (edge-sr calibrate) to build from instead of calibrating (or the cache):
    # its bits, scale and checkpoint must be the build's, and its options replace the build's
    calibration: str | Path | None = None
    # ONNX Runtime engines: each attention as ONNX's Attention operator (opset 23, ORT >= 1.23),
    # in the engine and in its FP32 reference graph alike (edge_sr.onnx_tidy.fuse_attention)
    fuse_attention: bool = True

    def __post_init__(self) -> None:
        if self.bits not in ENGINE_BITS:
            raise EdgeSRError(f"--bits: expected {', '.join(map(str, ENGINE_BITS[:-1]))} or "
                              f"{ENGINE_BITS[-1]} for an engine, got {self.bits!r} (edge-sr "
                              "calibrate takes any width from 2 to 8)")
        if self.dynamic and self.tile is not None:
            raise EdgeSRError("--tile: a --dynamic engine takes any input size, so it has no "
                              "tile; give one of --dynamic and --tile")
        if self.dynamic and self.input_size is not None:
            raise EdgeSRError("--input-size: a --dynamic engine takes any input size; give one "
                              "of --dynamic and --input-size")
        if self.input_size is not None and self.tile is not None:
            raise EdgeSRError("--tile: --input-size sets the engine's shape (the frame, padded "
                              "to the model's window); give one of --tile and --input-size")
        if self.input_size is None:  # else None until stage_checkpoint fits it to the model
            self.tile = tuple(int(t) for t in (self.tile or (DYNAMIC_TRACE if self.dynamic
                                                             else DEFAULT_TILE)))
        if self.input_size is not None:
            self.input_size = tuple(int(v) for v in self.input_size)
            if len(self.input_size) != 2 or min(self.input_size) < 1:
                raise EdgeSRError(f"--input-size: expected WIDTHxHEIGHT in pixels, got "
                                  f"{self.input_size}")
        self.wide_inputs = tuple(self.wide_inputs)
        if self.fp_sites is not None:
            self.fp_sites = tuple(self.fp_sites)
        if self.rotate is not None:
            self.rotate = tuple(self.rotate)
        if self.backend not in BACKEND_CHOICES:
            raise EdgeSRError(expected("--backend", BACKEND_CHOICES, self.backend))
        if self.budget not in BUDGETS:
            raise EdgeSRError(expected("--budget", BUDGETS, self.budget))
        if self.method not in METHODS:
            raise EdgeSRError(expected("--method", METHODS, self.method))
        if self.scale not in (2, 3, 4):
            raise EdgeSRError(f"--scale: expected 2, 3 or 4, got {self.scale}")
        if self.tile is not None and (len(self.tile) != 2 or min(self.tile) < 1) \
                or self.batch < 1:
            raise EdgeSRError(f"--tile/--batch: expected positive sizes, got {self.tile} and "
                              f"{self.batch}")
        if self.calibration is not None:  # its bits and scale, before any work
            from runtime.calib_cache import check_given_calibration

            check_given_calibration(self)
        if self.dynamic and self.batch != 1:
            raise EdgeSRError(f"--batch: a --dynamic engine runs one whole image per call; "
                              f"expected 1, got {self.batch}")
        if self.dynamic and resolve_backend(self.backend) == "tensorrt":
            raise EdgeSRError(
                "--dynamic: expected --backend ort; TensorRT plans are built at fixed shapes here"
                + (" (--backend auto chose TensorRT on this machine)"
                   if self.backend == "auto" else ""))
        if (self.dynamic and self.resolved_grid() == "real"
                and not {"qk", "pv"} <= set(self.resolved_fp_sites())):
            # the real grid's exact corrections of an integer q.k^T or p.v need the head size
            # as a constant (calibrate.export.emit); known before minutes of calibration
            raise EdgeSRError("--dynamic: expected the attention products in floating point "
                              "(--fp-sites qk,pv) or --grid ort; the real grid's exact "
                              "corrections of quantized ones need fixed shapes")
        if self.speed_runs < 0:
            raise EdgeSRError(f"--speed-runs: expected a number of calls >= 0 (0: no speed "
                              f"check), got {self.speed_runs}")
        if self.val_images < 1 or self.val_crop < 8:
            raise EdgeSRError("validation needs at least one image and a crop of 8 pixels or more")
        self.calibration_config().validate()  # --bits, --wide-inputs, --rotate, ... before any work

    def calibration_config(self, model: str = "-", output: str | Path = "-") -> CalibrationConfig:
        """The ``calibrate.api`` configuration this build calibrates with."""
        return CalibrationConfig(model=model, scale=self.scale, bits=self.bits,
                                 method=self.method, budget=self.budget, output=str(output),
                                 seed=self.seed, iterations=self.calib_iterations,
                                 qkv_separation=not self.shared_qkv_input,
                                 wide_inputs=self.wide_inputs, rotate=self.rotate,
                                 weight_grid=self.weight_grid, grid=self.resolved_grid(),
                                 fp_weights=self.fp_weights,
                                 fp_sites=self.resolved_fp_sites(),
                                 avg_bits=self.avg_bits, rounding=self.rounding,
                                 weight_lr=self.weight_lr, qdrop=self.qdrop,
                                 smooth=self.smooth, quant_conv=self.quant_conv)

    def resolved_fp_sites(self) -> tuple[str, ...]:
        """``fp_sites``, with None resolved to the backend's measured choice."""
        if self.fp_sites is not None:
            return self.fp_sites
        return DEFAULT_FP_SITES[resolve_backend(self.backend)]

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


# --- stages ------------------------------------------------------------------------------------

def stage_checkpoint(cfg: BuildConfig):
    lm = load_model(cfg.model_name, scale=cfg.scale)
    if cfg.dynamic:
        if not getattr(lm.model, "dynamic_export", False):
            raise EdgeSRError(f"--dynamic: {lm.arch} has no dynamic-shape export (its padding or "
                              "masks need fixed sizes); build it with --tile or --input-size")
        cfg.tile = lm.model.size_requirements.fit(*DYNAMIC_TRACE)
    if cfg.input_size is not None:
        w, h = cfg.input_size
        cfg.tile = lm.model.size_requirements.fit(h, w)
        log.info("--input-size %dx%d: engine shape %dx%d (padded to the %s window)",
                 *cfg.input_size, *cfg.tile[::-1], lm.arch)
    why = lm.model.size_requirements.check_tile(*cfg.tile)
    if why:
        raise EdgeSRError(f"--tile: {why} (the {lm.arch} window)")
    return lm


def stage_export(student, lm, cfg: BuildConfig, backend: str, work: Path) -> None:
    target = "trt" if backend == "tensorrt" else "ort"
    fuse = cfg.fuse_attention and target == "ort"
    if fuse and cfg.dynamic:
        log.info("--dynamic: the attentions stay unfused (edge-sr matches ONNX's Attention "
                 "operator at fixed shapes only), in the engine and its FP32 graph alike")
    export_qdq(student, ExportConfig(target=target, tile=cfg.tile, batch=cfg.batch,
                                     dynamic=cfg.dynamic, fuse_attention=fuse), work / MODEL_FILE)
    export_fp_onnx(lm.model, work / FP32_FILE, tile=cfg.tile, batch=cfg.batch,
                   dynamic=cfg.dynamic, fuse_attention=fuse)


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

    for name in (MODEL_FILE, FP32_FILE):  # a dynamic graph: loaded with its scale, not probed
        OrtBackend(work / name, threads=cfg.threads, max_batch=cfg.batch,
                   scale=cfg.scale if cfg.dynamic else None).close()


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


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    stage_seconds: dict[str, float] = field(default_factory=dict)


def build(cfg: BuildConfig) -> BuildResult:
    """Run every stage and return the engine directory with its manifest."""
    out = check_writable(cfg.out_dir(), "--out")
    if out.exists() and not cfg.force:
        raise EdgeSRError(f"--out {out}: already exists; pass --force to replace it")
    backend = resolve_backend(cfg.backend)
    if backend == "tensorrt":  # before minutes of calibration, not at the build stage
        from runtime.backends.tensorrt import import_tensorrt

        try:
            import_tensorrt()
        except MissingDependencyError as e:
            raise MissingDependencyError(f"--backend trt: the TensorRT backend is not usable "
                                         f"here: {e}; or use --backend ort") from None
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)  # on a loaded CPU, fewer OpenMP threads can be faster
    times: dict[str, float] = {}
    bar = tqdm(total=len(STAGES) - (cfg.speed_runs <= 0), desc="build", unit="stage",
               disable=progress_disabled())

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
            # after the checkpoint stage, whose checks (scale, --dynamic, the tile) can fail:
            # a bad request stays one error line
            log.info("building %s: %s x%d W%dA%d, %s, backend %s, %s", out,
                     cfg.model_name, cfg.scale, cfg.bits, cfg.bits,
                     f"calibration {cfg.calibration}" if cfg.calibration
                     else f"budget {cfg.budget}", backend,
                     "dynamic shape" if cfg.dynamic else f"LR tile {cfg.tile[1]}x{cfg.tile[0]}")
            with stage("calibrate"):
                calib_path, calib_info = (given_calibration(lm, cfg) if cfg.calibration
                                          else cached_calibration(lm, cfg))
                student = load_student(calib_path, lm)
                qr = getattr(student, "quant_recipe", None)
                if (cfg.calibration and cfg.dynamic and qr is not None and qr.grid == "real"
                        and not {"qk", "pv"} <= set(qr.fp_sites)):
                    raise EdgeSRError(f"--dynamic: --calibration {cfg.calibration} quantizes "
                                      "the attention products on the real grid, whose exact "
                                      "corrections need fixed shapes; build it without "
                                      "--dynamic")
                if qr is not None:
                    # what was calibrated: rotated sites, weight grid, per-site input bits
                    calib_info["quant_recipe"] = qr.to_dict()
            with stage("export"):
                stage_export(student, lm, cfg, backend, work)
            with stage("build"):
                stage_build(cfg, backend, work)

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
                overlap=(0 if cfg.dynamic else default_overlap(cfg.tile) if cfg.overlap is None
                         else cfg.overlap),
                precision=f"w{cfg.bits}a{cfg.bits}-qdq", files=files,
                budget="calibration file" if cfg.calibration else cfg.budget,
                method=calib_info.get("method", cfg.method), calibration=calib_info, versions=versions(),
                build_config=config_dict(cfg), dynamic=cfg.dynamic,
                size_requirements={"multiple": lm.model.size_requirements.multiple,
                                   "minimum": lm.model.size_requirements.minimum})
            with stage("validate"):
                manifest.validation = validate_engine(student, lm, cfg, backend, work, manifest)
            if cfg.speed_runs > 0:
                with stage("speed"):
                    manifest.speed = speed_check(Engine(work, manifest), runs=cfg.speed_runs,
                                                 threads=cfg.threads)
            with stage("manifest"):
                manifest.stage_seconds = dict(times)
                manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                write_manifest(work, manifest)
    finally:
        bar.close()
    v = manifest.validation
    # the summary: at DEBUG, since the CLI prints it (BuildResult carries it for the API)
    log.debug("engine %s: PSNR %.3f dB (fake-quant %.3f, FP %.3f), fidelity %.2f dB", out,
             v["psnr_y_db"], v["psnr_y_fake_quant_db"], v["psnr_y_fp_db"],
             v["fidelity_psnr_y_db"])
    if (sp := manifest.speed) is not None:
        log.debug("engine %s: %.1f ms per %dx%d LR tile against %.1f ms for its FP32 graph on "
                 "%s: %.2fx, median of %d interleaved calls", out, sp["engine_ms"],
                 *sp["input_hw"][::-1], sp["fp32_ms"], sp["device"], sp["speed_vs_fp32"],
                 sp["runs"])
        if sp["speed_vs_fp32"] < 1.0 and sp.get("speed_vs_fp32_rounds", {}).get("clear", True):
            log.warning("the engine ran slower than its FP32 graph here (%.2fx, %d calls): a quick "
                        "check, so measure a frame with 'edge-sr profile --engine %s --compare'; "
                        "docs/results/grids.md says which options are faster on a CPU",
                        sp["speed_vs_fp32"], sp["runs"], out)
    return BuildResult(out, manifest, times)


# the method-dependent calibration options --print-config shows resolved
RESOLVED_OPTIONS = ("rotate", "weight_grid", "fp_weights", "rounding", "smooth", "weight_lr",
                    "qdrop", "bound_lr", "dqc_precision")


def config_dict(cfg: BuildConfig) -> dict:
    d = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    d["out"] = str(cfg.out_dir())
    d["model"] = cfg.model_name  # the default resolved (--scale's reference checkpoint)
    d["cache_dir"] = str(cache_root(cfg))  # EDGE_SR_CACHE or the user cache, resolved
    # with --input-size the model's window decides the shape: stage_checkpoint fits it once the
    # model is loaded
    d["tile"] = ("input_size, padded to the model's window at build" if cfg.tile is None
                 else list(cfg.tile))
    # what "auto" and the method's defaults (None) become on this machine
    cc = cfg.calibration_config()
    d["resolved"] = {"backend": resolve_backend(cfg.backend), "grid": cfg.resolved_grid(),
                     "fp_sites": list(cfg.resolved_fp_sites())} | {
        k: (list(v) if isinstance(v, tuple) else v) for k in RESOLVED_OPTIONS
        if (v := cc.option(k)) is not None}
    return d
