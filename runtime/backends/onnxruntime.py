"""ONNX Runtime on the CPU execution provider: the embedded default backend.

The graph has a fixed (N, 3, th, tw) input; a dynamic batch dimension is allowed (then
``max_batch`` sets how many tiles go in one call). A fixed batch larger than the tiles at hand is
filled by repeating the last tile and the extra outputs are dropped. A graph with a symbolic
height and width (``edge-sr build --dynamic``) runs either at one given ``tile`` or, with no
``tile``, at any size (``tile`` is then None and ``runtime.tiling.run_tiled`` runs a whole image
in one call, padded to ``pad_multiple``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from edge_sr.errors import EdgeSRError
from edge_sr.hardware import cpu_model  # noqa: F401  (runtime callers import it from here)
from runtime.backends.base import Backend, BackendInfo

log = logging.getLogger(__name__)


def default_threads() -> int:
    """All cores this process may use (ORT's own default would ignore CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def graph_precision(path: str | os.PathLike) -> str:
    """"qdq" when the graph holds QuantizeLinear/DequantizeLinear nodes, else "fp32"."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    return "qdq" if ops & {"QuantizeLinear", "DequantizeLinear"} else "fp32"


class OrtBackend(Backend):
    """Runs an SR ONNX graph with onnxruntime's CPU EP.

    ``threads``: intra-op threads (None: the cores available to this process). ``tile`` fixes the
    shape a graph with symbolic spatial dimensions runs at; without it such a graph runs any size
    (``self.tile`` None), padded by the caller to ``pad_multiple`` and ``min_side`` (the model's
    ``size_requirements``, from the engine's manifest). ``scale``, when known, saves the probe
    run that finds it. ``exact_low_bit`` asks ORT's MatMulNBits kernels to keep float
    activations (accuracy level 0), so a low-bit graph matches its fake-quant model rather than
    re-quantizing activations to int8 inside the kernel.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 tile: tuple[int, int] | None = None, max_batch: int = 4,
                 precision: str | None = None, exact_low_bit: bool = True,
                 scale: int | None = None, pad_multiple: int = 1, min_side: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeSRError(f"ONNX model {self.path}: file not found")
        if threads is not None and threads < 1:
            raise EdgeSRError(f"--threads: expected a positive number of threads, got {threads}")
        self.threads = threads or default_threads()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if exact_low_bit:
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), so,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            hint = (f"; an engine with ONNX's Attention operator (opset 23) needs onnxruntime >= "
                    f"1.23 (this is {ort.__version__}), or a rebuild with --unfused-attention"
                    if "opset" in msg.lower() or "Attention" in msg else "")
            raise EdgeSRError(
                f"ONNX model {self.path}: onnxruntime could not load it "
                f"({type(e).__name__}: {msg}){hint}"
            ) from None
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        n, c, h, w = self._shape(inp.shape, "input")
        if c not in (3, None):
            raise EdgeSRError(f"ONNX model {self.path}: expected 3 input channels, found {c}")
        self.pad_multiple, self.min_side = max(1, int(pad_multiple)), max(1, int(min_side))
        if h is None or w is None:
            self.tile = None if tile is None else tuple(tile)  # None: any size, one call each
        elif tile is not None and tuple(tile) != (h, w):
            raise EdgeSRError(f"ONNX model {self.path}: input is {h}x{w} but tile {tile[0]}x"
                              f"{tile[1]} was asked for")
        else:
            self.tile = (h, w)
        self.fixed_batch = n
        self.max_batch = n if n is not None else max(1, max_batch)
        self.scale = int(scale) if scale is not None else self._infer_scale(out.shape)
        self.precision = precision or graph_precision(self.path)

    def _shape(self, shape: list, what: str) -> tuple[int | None, ...]:
        if len(shape) != 4:
            raise EdgeSRError(f"ONNX model {self.path}: expected a 4-D NCHW {what}, got {shape}")
        return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)

    def _infer_scale(self, out_shape: list) -> int:
        _, _, oh, ow = self._shape(out_shape, "output")
        ih = self.tile[0] if self.tile is not None else None
        if oh is None:
            if ih is None:  # any size: probe at a small valid one
                ih = max(16, self.min_side)
                ih += (-ih) % self.pad_multiple
            probe = np.zeros((1 if self.fixed_batch is None else self.max_batch, 3, ih, ih),
                             dtype=np.float32)
            oh = self.run(probe).shape[2]
        if oh % ih:
            raise EdgeSRError(f"ONNX model {self.path}: output height {oh} is not a multiple of "
                              f"the input height {ih}")
        return oh // ih

    def run(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.ascontiguousarray(tiles, dtype=np.float32)
        k = tiles.shape[0]
        if self.tile is None:
            if tiles.ndim != 4 or tiles.shape[1] != 3:
                raise ValueError(f"expected tiles (N, 3, H, W), got {tiles.shape}")
        elif tiles.shape[1:] != (3, *self.tile):
            raise ValueError(f"expected tiles (N, 3, {self.tile[0]}, {self.tile[1]}), "
                             f"got {tiles.shape}")
        if k > self.max_batch:
            return np.concatenate([self.run(tiles[i:i + self.max_batch])
                                   for i in range(0, k, self.max_batch)])
        if self.fixed_batch is not None and k < self.fixed_batch:
            fill = np.repeat(tiles[-1:], self.fixed_batch - k, axis=0)
            tiles = np.concatenate([tiles, fill])
        out = self.session.run([self.output_name], {self.input_name: tiles})[0]
        return out[:k]

    def info(self) -> BackendInfo:
        return BackendInfo("onnxruntime", f"CPU ({cpu_model()}, {self.threads} threads)",
                           self.precision)

    def close(self) -> None:
        self.session = None
