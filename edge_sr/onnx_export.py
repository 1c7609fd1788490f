"""Full-precision ONNX export at a fixed input shape (input ``lr``, output ``sr``), or with a
dynamic height and width where the model allows it (``SRModel.dynamic_export``).

torch 2.13's default (dynamo) exporter needs ``onnxscript``, which edge-sr does not depend on; the
TorchScript-based exporter (``dynamo=False``) handles SwinIR-light and gives a plain graph. The
shape is fixed so window partitioning, padding and the shifted-window masks are baked in as
constants, which is what ONNX Runtime's and TensorRT's graph optimisers and the QDQ export expect.
``dynamic=True`` traces inside ``edge_sr.models.base.dynamic_shapes()`` instead: the padding, the
window partitions and the shifted-window masks are computed in the graph from the input's size,
so one file runs any size of at least the model's minimum (docs/results/grids.md measures it).
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from edge_sr.errors import EdgeSRError
from edge_sr.fileio import atomic_path
from edge_sr.models.base import dynamic_shapes

log = logging.getLogger(__name__)

INPUT_NAME = "lr"
OUTPUT_NAME = "sr"
# The opset policy: the FP graph needs opset 17 (LayerNormalization) and is exported at it, so
# older runtimes load it; the QDQ export (calibrate.export_qdq.QDQ_MIN_OPSET) needs 21 for INT4 /
# UINT4 weight codes and per-axis Q/DQ.
FP_MIN_OPSET = 17


def export_fp_onnx(model: nn.Module, path: str | os.PathLike, tile: tuple[int, int] = (64, 64),
                   batch: int = 1, opset: int = FP_MIN_OPSET, dynamic: bool = False,
                   fuse_attention: bool = False) -> Path:
    """Export ``model`` for a ``(batch, 3, *tile)`` input in [0, 1]; written atomically.

    The model pads a tile that is not a multiple of its window itself (the padding is baked into
    the graph), so any tile works; multiples of ``size_requirements.multiple`` waste no compute.
    ``dynamic``: the input's height and width (and the output's) are symbolic ``h``/``w``
    (``tile`` is only the tracing example); raises EdgeSRError for a model without
    ``dynamic_export``. ``fuse_attention``: each attention becomes ONNX's ``Attention`` operator
    and the file's opset 23 (``edge_sr.onnx_tidy.fuse_attention``; for ONNX Runtime, whose CPU
    kernel it speeds up; TensorRT 10.3 does not parse it).
    """
    h, w = tile
    if dynamic and not getattr(model, "dynamic_export", False):
        raise EdgeSRError(f"ONNX export: {getattr(model, 'arch', type(model).__name__)} has no "
                          "dynamic-shape export (its padding or masks need fixed sizes); give "
                          "a fixed tile")
    if h <= 0 or w <= 0 or batch <= 0:
        raise EdgeSRError(f"ONNX export: tile {h}x{w} and batch {batch} must be positive")
    if opset < FP_MIN_OPSET:
        raise EdgeSRError(f"ONNX export: opset {opset} requested, at least {FP_MIN_OPSET} is needed "
                          "(LayerNormalization)")
    path = Path(path)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.rand(batch, 3, h, w, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)  # warm the per-shape caches (attention masks) so they export as constants
            with atomic_path(path) as tmp, warnings.catch_warnings():
                # The tracer warns that shapes become constants: that is the point here.
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX")
                warnings.filterwarnings("ignore", message=".*will be removed")
                axes = ({INPUT_NAME: {2: "h", 3: "w"}, OUTPUT_NAME: {2: "H", 3: "W"}}
                        if dynamic else None)
                with dynamic_shapes() if dynamic else nullcontext():
                    torch.onnx.export(model, (x,), str(tmp), input_names=[INPUT_NAME],
                                      output_names=[OUTPUT_NAME], opset_version=opset,
                                      do_constant_folding=True, dynamo=False,
                                      dynamic_axes=axes)
                opset = _tidy(tmp, model, fuse_attention) or opset
                _check(tmp)
    finally:
        model.train(was_training)
    # the file's name only: callers export into temporary or staging folders (build renames
    # its folder at the end) and name the final place themselves
    log.info("exported %s (%dx%dx%sx%s, opset %d)", Path(path).name, batch, 3,
             "h" if dynamic else h, "w" if dynamic else w, opset)
    return path


def _tidy(path: Path, model: nn.Module, fuse: bool = False) -> int | None:
    """Split each attention's qkv product into q, k and v, share identical constants, store
    attention masks as labels and position biases as their tables (``edge_sr.onnx_tidy``);
    with ``fuse``, fuse each attention into one operator. Returns the file's opset when the
    fusion raised it, else None."""
    import onnx

    from edge_sr.onnx_tidy import (
        compact,
        drop_shape_expands,
        fuse_attention,
        lp_normalize,
        model_opset,
        position_tables,
        split_qkv,
        tidy,
    )

    proto = onnx.load(str(path))
    split = split_qkv(proto)  # q, k and v each from its own GEMM: no Split of the qkv tensor
    expands = drop_shape_expands(proto)  # F.normalize's Expand before its Div
    fused = fuse_attention(proto) if fuse else 0
    norms = lp_normalize(proto)  # F.normalize as one LpNormalization (after the fusion's match)
    saved = tidy(proto, position_tables(model)) + compact(proto)
    if saved or split or expands or fused or norms:
        onnx.save(proto, str(path))
        log.debug("ONNX tidy: %.1f MB saved, %d qkv products split, %d Expands dropped, %d "
                  "attentions fused, %d L2 normalisations as LpNormalization", saved / 1e6, split,
                  expands, fused, norms)
    if fused:
        return model_opset(proto)
    return None


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))
