"""TensorRT 10 backend: build an explicit-quantization engine from the ``trt``-target QDQ ONNX, run it.

Everything TensorRT/CUDA is imported inside functions (``import runtime.backends.tensorrt`` works
on a machine without them). Host<->device copies use ``cuda-python`` (``cuda.bindings.runtime``,
pip wheels, same vendor as TensorRT) and fall back to PyTorch's CUDA tensors; pycuda is not needed.

Precision: the Q/DQ nodes fix what is INT8 (and INT4 weight-only); no calibrator is ever used.
``typing="strong"`` builds a strongly typed network (TensorRT's recommended mode, the only one in
TRT 11); its FP parts keep the ONNX types (FP32 for our exports). ``typing="weak"`` (TRT 10 only,
the JetPack 6 default here) lets the FP parts run in FP16 via the FP16 builder flag. ``auto``
picks weak on TRT 10 when ``fp16`` is asked for, else strong.

Each plan gets a sidecar ``<engine>.json`` (TensorRT version, GPU name, compute capability, build
settings); ``TensorRTBackend`` refuses a plan built by another TensorRT version or for another GPU.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from edge_sr.errors import EdgeSRError, MissingDependencyError
from edge_sr.fileio import write_bytes, write_json
from runtime.backends.base import Backend, BackendInfo

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install TensorRT >= 10: on a Jetson (JetPack 6.x ships TensorRT 10.3) `sudo apt install "
    "python3-libnvinfer python3-libnvinfer-dev`; on x86 with a CUDA GPU `pip install tensorrt` "
    "(its libraries come from NVIDIA's index, pypi.nvidia.com); plus `pip install cuda-python`. "
    "Without a GPU use --backend ort"
)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependencyError(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from None
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise MissingDependencyError(
            f"TensorRT {trt.__version__} is too old: edge-sr needs the TensorRT 10 API; "
            f"{INSTALL_HINT}")
    return trt


@dataclass(frozen=True)
class PlanOptions:
    """How a TensorRT plan is built (the engine-level options are ``runtime.build.BuildConfig``).
    ``plugin_lib``: the LowBitLinear plugin (``make kernels`` on the
    device: build/kernels/libesr_lowbit_plugin.so) for graphs from ``--lowbit-plugin``."""

    fp16: bool = True
    timing_cache: str | None = None  # path; created or reused
    plugin_lib: str | None = None
    typing: Literal["auto", "strong", "weak"] = "auto"
    workspace_mib: int = 1024
    optimization_level: int = 3  # TensorRT builder_optimization_level 0..5

    def __post_init__(self) -> None:
        if self.typing not in ("auto", "strong", "weak"):
            raise EdgeSRError(f"typing: expected auto, strong or weak, got {self.typing!r}")
        if self.workspace_mib < 1 or not 0 <= self.optimization_level <= 5:
            raise EdgeSRError("workspace_mib must be positive and optimization_level in 0..5, got "
                              f"{self.workspace_mib} and {self.optimization_level}")


def resolve_typing(cfg: PlanOptions, trt_major: int) -> str:
    """``strong`` or ``weak`` (weak typing and the FP16 flag exist only up to TensorRT 10)."""
    if cfg.typing == "weak" and trt_major >= 11:
        raise EdgeSRError(f"typing=weak: TensorRT {trt_major}.x removed weak typing; use strong")
    if cfg.typing != "auto":
        return cfg.typing
    return "weak" if cfg.fp16 and trt_major < 11 else "strong"


# ---------------------------------------------------------------------------------------------
# device facts


def gpu_facts() -> dict:
    """Name and compute capability of CUDA device 0 (cuda-python, else torch)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = None
    if cudart is not None:
        err, prop = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            return {"gpu": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}"}
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    raise EdgeSRError("no CUDA GPU is visible (cuda-python and torch.cuda found none); TensorRT "
                      "needs one: use --backend ort on this machine")


def check_engine_compat(built: dict, current: dict, engine: str | os.PathLike) -> None:
    """Refuse a plan whose TensorRT version or GPU differ from this machine's (plans are not
    portable: TensorRT rejects them, or worse, runs tactics tuned for another chip)."""
    if built.get("tensorrt") != current.get("tensorrt"):
        raise EdgeSRError(
            f"engine {engine}: built with TensorRT {built.get('tensorrt')}, this machine has "
            f"TensorRT {current.get('tensorrt')}; rebuild it here (edge-sr build --backend trt)")
    if built.get("gpu") != current.get("gpu") or built.get(
            "compute_capability") != current.get("compute_capability"):
        raise EdgeSRError(
            f"engine {engine}: built for {built.get('gpu')} (sm {built.get('compute_capability')}),"
            f" this machine has {current.get('gpu')} (sm {current.get('compute_capability')}); "
            "TensorRT plans are GPU-specific: rebuild it on this device")


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + ".json")


# ---------------------------------------------------------------------------------------------
# build


def _load_plugin(trt, lib: str | None) -> None:
    trt.init_libnvinfer_plugins(None, "")
    if lib:
        if not Path(lib).is_file():
            raise EdgeSRError(f"plugin_lib {lib}: not found; run `make kernels` on the device "
                              "(it builds libesr_lowbit_plugin.so where TensorRT's headers exist)")
        trt.get_plugin_registry().load_library(str(lib))


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 config: PlanOptions | None = None, **_ignored) -> dict:
    """Parse the ONNX, build and serialize the plan atomically; returns the manifest fields.

    Extra keywords (``tile``, ``batch``) are accepted for the build pipeline's convenience: the
    exported ONNX already has a fixed input shape.
    """
    cfg = config or PlanOptions()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise EdgeSRError(f"ONNX model {onnx_path}: file not found")
    trt = import_tensorrt()
    major = int(trt.__version__.split(".")[0])
    typing = resolve_typing(cfg, major)
    logger = trt.Logger(trt.Logger.WARNING)
    _load_plugin(trt, cfg.plugin_lib)
    builder = trt.Builder(logger)
    flags = 0
    if typing == "strong":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        hint = (" (a LowBitLinear node needs plugin_lib)"
                if "LowBitLinear" in errors and not cfg.plugin_lib else "")
        raise EdgeSRError(f"ONNX model {onnx_path}: TensorRT's parser failed: {errors}{hint}")
    bc = builder.create_builder_config()
    bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    bc.builder_optimization_level = cfg.optimization_level
    if typing == "weak":
        if cfg.fp16:
            bc.set_flag(trt.BuilderFlag.FP16)
        layer_types = {network.get_layer(i).type for i in range(network.num_layers)}
        if trt.LayerType.QUANTIZE in layer_types or trt.LayerType.DEQUANTIZE in layer_types:
            bc.set_flag(trt.BuilderFlag.INT8)  # weak typing: lets the explicit Q/DQ run in INT8
            if hasattr(trt.BuilderFlag, "INT4"):
                bc.set_flag(trt.BuilderFlag.INT4)  # INT4 weight-only DQ (TRT 10.x)
    cache_bytes = b""
    if cfg.timing_cache and Path(cfg.timing_cache).is_file():
        cache_bytes = Path(cfg.timing_cache).read_bytes()
    cache = bc.create_timing_cache(cache_bytes)
    bc.set_timing_cache(cache, ignore_mismatch=True)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, bc)
    if plan is None:
        raise EdgeSRError(f"ONNX model {onnx_path}: TensorRT could not build an engine (see the "
                          "TensorRT log above)")
    seconds = time.perf_counter() - t0
    write_bytes(engine_path, bytes(plan))
    if cfg.timing_cache:
        write_bytes(cfg.timing_cache, bytes(bc.get_timing_cache().serialize()))
    fields = {"tensorrt": trt.__version__, **gpu_facts(), "typing": typing,
              "build_seconds": round(seconds, 2), "onnx": onnx_path.name,
              "build_config": asdict(cfg)}
    write_json(sidecar_path(engine_path), fields)
    log.info("built %s in %.1f s (TensorRT %s, %s, %s typing)", engine_path, seconds,
             trt.__version__, fields["gpu"], typing)
    return fields


# ---------------------------------------------------------------------------------------------
# run


class _Device:
    """Minimal CUDA memory and stream helpers over cuda-python, or torch when it is absent."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            cudart = None
        self.rt = cudart
        if cudart is None:
            import torch

            if not torch.cuda.is_available():
                raise MissingDependencyError(f"neither cuda-python nor torch.cuda is usable; "
                                             f"{INSTALL_HINT}")
            self.torch, self._stream = torch, torch.cuda.Stream()
            self.stream = self._stream.cuda_stream
        else:
            self._stream = self._ok(cudart.cudaStreamCreate())
            self.stream = int(self._stream)  # the handle TensorRT's execute_async_v3 takes
        self._buffers: dict[int, object] = {}

    def _ok(self, res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA runtime error {err}")
        return rest[0] if len(rest) == 1 else rest

    def alloc(self, nbytes: int) -> int:
        if self.rt is not None:
            ptr = int(self._ok(self.rt.cudaMalloc(nbytes)))
            self._buffers[ptr] = None
            return ptr
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
        self._buffers[t.data_ptr()] = t
        return t.data_ptr()

    def h2d(self, dst: int, src: np.ndarray) -> None:
        if self.rt is not None:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self._stream))
        else:
            self._buffers[dst][: src.nbytes].copy_(self.torch.from_numpy(src.view(np.uint8).ravel()))

    def d2h(self, dst: np.ndarray, src: int) -> None:
        if self.rt is not None:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self._stream))
        else:
            dst.view(np.uint8).ravel()[:] = self._buffers[src][: dst.nbytes].cpu().numpy()

    def sync(self) -> None:
        if self.rt is not None:
            self._ok(self.rt.cudaStreamSynchronize(self._stream))
        else:
            self._stream.synchronize()

    def free(self) -> None:
        if self.rt is not None:
            for ptr in list(self._buffers):
                self.rt.cudaFree(ptr)
        self._buffers.clear()


class TensorRTBackend(Backend):
    """Runs a serialized plan (fixed NCHW input) on CUDA device 0."""

    def __init__(self, engine_path: str | os.PathLike, plugin_lib: str | None = None,
                 check: bool = True) -> None:
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise EdgeSRError(f"engine {self.path}: file not found")
        trt = import_tensorrt()
        side = sidecar_path(self.path)
        built = json.loads(side.read_text()) if side.is_file() else {}
        self.facts = {"tensorrt": trt.__version__, **gpu_facts()}
        if check and built:
            check_engine_compat(built, self.facts, self.path)
        plugin_lib = plugin_lib or (built.get("build_config") or {}).get("plugin_lib")
        _load_plugin(trt, plugin_lib)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EdgeSRError(f"engine {self.path}: TensorRT {trt.__version__} could not "
                              "deserialize it (corrupt, or built elsewhere); rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        ins = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        outs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        if len(ins) != 1 or len(outs) != 1:
            raise EdgeSRError(f"engine {self.path}: expected one input and one output, found "
                              f"{ins} and {outs}")
        self.input_name, self.output_name = ins[0], outs[0]
        self.in_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.out_shape = tuple(self.engine.get_tensor_shape(self.output_name))
        if len(self.in_shape) != 4 or min(self.in_shape) < 1:
            raise EdgeSRError(f"engine {self.path}: expected a fixed NCHW input, found "
                              f"{self.in_shape}")
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.max_batch, self.tile = self.in_shape[0], (self.in_shape[2], self.in_shape[3])
        self.scale = self.out_shape[2] // self.in_shape[2]
        self.precision = f"trt-{built.get('typing', 'unknown')}-typed"
        self.dev = _Device()
        self._in = self.dev.alloc(int(np.prod(self.in_shape)) * self.in_dtype.itemsize)
        self._out = self.dev.alloc(int(np.prod(self.out_shape)) * self.out_dtype.itemsize)
        self.context.set_tensor_address(self.input_name, self._in)
        self.context.set_tensor_address(self.output_name, self._out)

    def run(self, tiles: np.ndarray) -> np.ndarray:
        k = tiles.shape[0]
        if tiles.shape[1:] != self.in_shape[1:]:
            raise ValueError(f"expected tiles {self.in_shape}, got {tiles.shape}")
        if k > self.max_batch:
            return np.concatenate([self.run(tiles[i:i + self.max_batch])
                                   for i in range(0, k, self.max_batch)])
        x = np.zeros(self.in_shape, self.in_dtype)
        x[:k] = tiles
        y = np.empty(self.out_shape, self.out_dtype)
        self.dev.h2d(self._in, x)
        if not self.context.execute_async_v3(self.dev.stream):
            raise RuntimeError(f"engine {self.path}: execute_async_v3 failed")
        self.dev.d2h(y, self._out)
        self.dev.sync()
        return y[:k].astype(np.float32)

    def info(self) -> BackendInfo:
        return BackendInfo("tensorrt", f"{self.facts['gpu']} (TensorRT {self.facts['tensorrt']})",
                           self.precision)

    def close(self) -> None:
        if getattr(self, "dev", None) is not None:
            self.dev.free()
        self.context = self.engine = None
