"""PyTorch-CUDA backend: the quantized model with the esr_lowbit kernels, and FP16/FP32 baselines.

It measures real quantized latency on a GPU without TensorRT: every calibrated ``QuantLinear``
becomes a ``runtime.lowbit.LowBitLinearCUDA`` (packed weights, integer GEMM, FP16 output); the
attention's activation quantizers stay PyTorch fake-quant. Precisions:

* ``fp32`` / ``fp16``: the full-precision model in that dtype;
* ``lowbit``: a calibrated student with the kernels (``compute_dtype`` for everything else).

``profile_cuda`` times them side by side (a Python API, run by scripts/gpu_check.sh and
scripts/gpu_session.sh; ``edge-sr profile`` has no CUDA backend yet). Nothing imports
CUDA at module import; a machine without a GPU gets ``EdgeSRError`` ("no CUDA GPU").
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from edge_sr.errors import EdgeSRError
from runtime.backends.base import Backend, BackendInfo

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "lowbit")


def require_cuda():
    """torch with a visible CUDA GPU, else an ``EdgeSRError`` that says what to use instead."""
    import torch

    if not torch.cuda.is_available():
        raise EdgeSRError("--backend cuda: no CUDA GPU is visible to PyTorch; use --backend ort "
                          "on this machine")
    return torch


def latency_student(fp_model, bits: int, seed: int = 0, grid: str = "real"):
    """A student whose bounds come from weight min/max and fixed activation ranges.

    For latency only (the kernels' speed does not depend on the bounds): its accuracy means
    nothing. Use a real calibration (``edge-sr calibrate``) for quality figures. ``grid``:
    ``QuantRecipe.grid`` ("trt" gives the plain Q/DQ graph TensorRT runs natively).
    """
    import torch

    from calibrate.prepare import QuantRecipe, prepare, quantizers
    from calibrate.qmodules import QuantLinear

    torch.manual_seed(seed)
    student = prepare(fp_model, QuantRecipe(bits=bits, qkv_separation=False, grid=grid))
    for _, m in student.named_modules():
        if isinstance(m, QuantLinear):
            for q, w in zip(m.weight_quantizers, m.weight_blocks()):
                q.set_bounds(float(w.min()), float(w.max()))
    for _, q in quantizers(student):
        if not bool(q.initialized):
            q.set_bounds(-2.0, 2.0)
    return student.eval()


def prepare_cuda_model(fp_model=None, student=None, precision: str = "fp16",
                       compute_dtype: str = "fp16", device: str = "cuda"):
    """The ``torch.nn.Module`` the backend runs, moved to ``device`` in the right dtype."""
    torch = require_cuda()
    if precision not in PRECISIONS:
        raise EdgeSRError(f"--precision: expected one of {', '.join(PRECISIONS)}, got "
                          f"{precision!r}")
    if precision == "lowbit":
        if student is None:
            raise EdgeSRError("--precision lowbit: needs a calibrated model (edge-sr calibrate)")
        from runtime.lowbit import convert_to_lowbit_cuda, load_library

        load_library()  # a clear MissingDependencyError when `make kernels` was not run
        model = copy.deepcopy(student).eval()
        n = convert_to_lowbit_cuda(model, device)
        log.info("low-bit kernels in %d linears", n)
        dtype = torch.float16 if compute_dtype == "fp16" else torch.float32
    else:
        if fp_model is None:
            raise EdgeSRError(f"--precision {precision}: needs the full-precision model")
        model = copy.deepcopy(fp_model).eval()
        dtype = torch.float16 if precision == "fp16" else torch.float32
    return model.to(device=device, dtype=dtype), dtype


class CudaBackend(Backend):
    """Runs a PyTorch SR model on CUDA tiles (float32 NCHW in, float32 out)."""

    def __init__(self, model, scale: int, tile: tuple[int, int], max_batch: int = 1,
                 precision: str = "fp16", dtype=None, device: str = "cuda") -> None:
        torch = require_cuda()
        self.torch, self.model, self.scale = torch, model.eval(), int(scale)
        self.tile, self.max_batch, self.precision, self.device = tuple(tile), max_batch, \
            precision, device
        self.dtype = dtype or next(model.parameters()).dtype

    @classmethod
    def create(cls, fp_model=None, student=None, precision: str = "fp16",
               tile: tuple[int, int] = (64, 64), max_batch: int = 1,
               compute_dtype: str = "fp16") -> CudaBackend:
        model, dtype = prepare_cuda_model(fp_model, student, precision, compute_dtype)
        scale = getattr(fp_model if fp_model is not None else student, "scale", None)
        if scale is None:
            raise EdgeSRError("--backend cuda: the model does not say its scale")
        name = precision if precision != "lowbit" else _lowbit_name(student)
        return cls(model, scale, tile, max_batch, name, dtype)

    def run(self, tiles: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(tiles, np.float32)).to(self.device,
                                                                              self.dtype)
            y = self.model(x)
            return y.float().cpu().numpy()

    def info(self) -> BackendInfo:
        return BackendInfo("cuda", self.torch.cuda.get_device_name(0), self.precision)

    def close(self) -> None:
        self.model = None
        self.torch.cuda.empty_cache()


def _lowbit_name(student) -> str:
    recipe = getattr(student, "quant_recipe", None)
    bits = getattr(recipe, "bits", None)
    return f"w{bits}a{bits}-kernels" if bits else "lowbit-kernels"


@dataclass
class CudaProfile:
    precision: str
    device: str
    input_size: list[int]  # LR (height, width)
    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_fps: float
    peak_mem_mib: float

    def to_dict(self) -> dict:
        return asdict(self)


def time_model(model, x, runs: int = 50, warmup: int = 10) -> CudaProfile:
    """CUDA-event timing of ``model(x)`` after warm-up; peak memory of the timed runs."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    t = np.asarray(times)
    p50 = float(np.percentile(t, 50))
    return CudaProfile(
        precision="", device=torch.cuda.get_device_name(0), input_size=list(x.shape[-2:]),
        batch=int(x.shape[0]), runs=runs, p50_ms=p50, p90_ms=float(np.percentile(t, 90)),
        p99_ms=float(np.percentile(t, 99)), mean_ms=float(t.mean()),
        throughput_fps=float(x.shape[0] * 1000.0 / p50),
        peak_mem_mib=torch.cuda.max_memory_allocated() / 2**20)


def profile_cuda(fp_model=None, students: dict | None = None, input_size: tuple[int, int] = (256, 256),
                 batch: int = 1, runs: int = 50, warmup: int = 10, compare: bool = True,
                 compute_dtype: str = "fp16", seed: int = 0) -> list[dict]:
    """Latency of each low-bit student (``{"w4a4": student, ...}``) with the kernels and, with
    ``compare``, of the FP model in FP16 and FP32 on the same GPU and input. Returns one dict per
    row (p50/p90/p99 ms, frames/s, peak MiB), plus ``ratio_vs_fp16``/``ratio_vs_fp32`` (p50 of
    the baseline divided by the row's p50: > 1 means faster than the baseline)."""
    torch = require_cuda()
    g = torch.Generator().manual_seed(seed)
    x32 = torch.rand(batch, 3, *input_size, generator=g)
    rows: list[dict] = []
    jobs = [(name, None, st, "lowbit") for name, st in (students or {}).items()]
    if compare or not jobs:
        if fp_model is None:
            raise EdgeSRError("--compare: needs the full-precision model")
        jobs += [("fp16", fp_model, None, "fp16"), ("fp32", fp_model, None, "fp32")]
    t0 = time.perf_counter()
    for name, fp, st, precision in jobs:
        model, dtype = prepare_cuda_model(fp, st, precision, compute_dtype)
        prof = time_model(model, x32.to("cuda", dtype), runs, warmup)
        prof.precision = name
        rows.append(prof.to_dict())
        log.info("%s: p50 %.2f ms, p99 %.2f ms, %.1f frames/s", name, prof.p50_ms, prof.p99_ms,
                 prof.throughput_fps)
        del model
        torch.cuda.empty_cache()
    base = {r["precision"]: r["p50_ms"] for r in rows if r["precision"] in ("fp16", "fp32")}
    for r in rows:
        for b, ms in base.items():
            r[f"ratio_vs_{b}"] = ms / r["p50_ms"]
    log.info("profiled %d configurations in %.1f s", len(rows), time.perf_counter() - t0)
    return rows


def models_for_engine(engine_dir, calibration=None):
    """The FP model and the calibrated student behind an engine directory.

    The FP checkpoint comes from ``manifest.model.path``; the calibration from ``calibration``
    (a file), else the build cache (``runtime.calib_cache.cache_root()/<manifest.calibration.file>``).
    A full-precision engine (``bits`` null) has no student.
    """
    from pathlib import Path

    from edge_sr.checkpoints import load_model
    from runtime.engine import read_manifest

    m = read_manifest(engine_dir)
    lm = load_model(m.model["path"], scale=m.scale)
    if m.bits is None:
        return lm.model, None
    if calibration is None:
        name = (m.calibration or {}).get("file")
        from runtime.calib_cache import cache_root

        calibration = cache_root() / name if name else None
    if calibration is None or not Path(calibration).is_file():
        raise EdgeSRError(f"--engine {engine_dir}: its calibration file ({calibration}) is not "
                          "here; pass it with --calibration (edge-sr calibrate writes one)")
    from calibrate.calibfile import load_calibrated

    cal = load_calibrated(calibration, model=lm.model)
    return lm.model, getattr(cal, "model", cal).eval()


def profile_engine_cuda(engine_dir, input_size: tuple[int, int] = (180, 320), runs: int = 20,
                        warmup: int = 3, compare: bool = True, calibration=None,
                        compute_dtype: str = "fp16") -> list[dict]:
    """``edge-sr profile --engine DIR --backend cuda [--compare]``: the engine's calibrated
    model with the low-bit kernels (and FP16/FP32 baselines) on this GPU; ``input_size`` is
    (height, width) of the LR frame, as ``edge_sr.cli.options.parse_size`` returns it."""
    require_cuda()
    fp, student = models_for_engine(engine_dir, calibration)
    students = {} if student is None else {_lowbit_name(student): student}
    return profile_cuda(fp, students, input_size=input_size, runs=runs, warmup=warmup,
                        compare=compare or student is None, compute_dtype=compute_dtype)
