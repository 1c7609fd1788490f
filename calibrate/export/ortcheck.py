"""What ONNX Runtime makes of an exported graph: sessions, fused node types, integer coverage.

ORT rewrites QDQ patterns when a session is created (ORT_ENABLE_ALL); the optimised graph it would
run is saved with ``SessionOptions.optimized_model_filepath`` and inspected here.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx

# ORT's fused kernels that compute a quantized MatMul/Gemm/Conv on integers (or packed ints).
INTEGER_KERNELS = frozenset({
    "MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearConv",
    "DynamicQuantizeMatMul", "MatMulNBits", "ConvInteger",
})


def session_options(threads: int | None = None, optimized_path: str | os.PathLike | None = None,
                    level: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def _bytes(model: onnx.ModelProto | str | os.PathLike) -> bytes | str:
    return model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)


def make_session(model: onnx.ModelProto | str | os.PathLike, threads: int | None = None,
                 level: str = "all"):
    """A CPU session (ORT_ENABLE_ALL unless ``level`` says) for an exported model or its path."""
    import onnxruntime as ort

    return ort.InferenceSession(_bytes(model), session_options(threads, level=level),
                                providers=["CPUExecutionProvider"])


def optimized_graph(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """The graph ORT runs after ORT_ENABLE_ALL (loaded back from ``optimized_model_filepath``)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "optimized.onnx"
        ort.InferenceSession(_bytes(model), session_options(1, out),
                             providers=["CPUExecutionProvider"])
        return onnx.load(str(out))


def fused_op_types(model: onnx.ModelProto | str | os.PathLike) -> Counter:
    """Node types of the ORT-optimised graph, e.g. ``{"MatMulIntegerToFloat": 192, ...}``."""
    return Counter(n.op_type for n in optimized_graph(model).graph.node)


def integer_coverage(ops: Counter) -> dict:
    """How many matrix products run as integer kernels vs. float MatMul/Gemm."""
    integer = {k: v for k, v in ops.items() if k in INTEGER_KERNELS}
    floating = {k: v for k, v in ops.items() if k in ("MatMul", "Gemm", "FusedMatMul")}
    return {"integer": integer, "float": floating,
            "integer_total": sum(integer.values()), "float_total": sum(floating.values())}
