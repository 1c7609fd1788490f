"""QDQ ONNX export of a calibrated 2DQuant model, exact to its learned grids.

``export_qdq(calibrated, ExportConfig(...), output)`` traces the fake-quant model at a fixed shape
with placeholder nodes (``export/trace.py``), replaces them with Q/DQ subgraphs whose integer codes,
scales and shifts come from the learned bounds (``export/grid.py``, ``export/emit.py``), raises the
opset and writes the file atomically. The fake-quant modules know nothing of ONNX.

Stable names, for runtimes and post-passes (e.g. H7's ``calibrate/export_plugin.py``); ``P`` is
the PyTorch module path such as ``layers.0.residual_group.blocks.1.attn.qkv``:

* activation site ``P``: nodes ``P/Sub``, ``P/Clip``, ``P/QuantizeLinear``, ``P/DequantizeLinear``;
* quantized linear ``P``: input nodes ``P/act{i}/...``; per group j the weight initializer ``P/W{j}``
  (int8 or int4 codes), its ``P/W{j}_scale``/``P/W{j}_zero_point``/``P/W{j}/DequantizeLinear``,
  ``P/MatMul{j}`` and the correction/bias nodes ``P/ReduceSum{j}``, ``P/MulShift{j}``,
  ``P/AddBias{j}``, ``P/Add{j}``; ``P/Concat`` when there are several groups, unless the
  attention takes q, k and v apart right after it (``edge_sr.onnx_tidy.split_qkv``: each group
  then feeds its heads directly);
* in ``build_qdq``'s proto every Q, DQ and quantized MatMul node has ``metadata_props``
  ``edge_sr.site``, ``edge_sr.kind``
  (act, weight, linear), ``edge_sr.bits`` (the true bit width, whatever the container),
  ``edge_sr.qmin``/``edge_sr.qmax``; the model's ``metadata_props["edge_sr.qdq"]`` is a JSON list of
  every site with its encoding: the activation's scale, shift, zero point and container, and a
  per-tensor weight's scale and shift; a per-channel weight (``weight_per_channel``) keeps its
  vectors only in the graph (``P/W{j}_scale``, ``P/W{j}_shift``).
* these names hold in ``build_qdq``'s proto. The file ``export_qdq`` writes is compacted
  (``edge_sr.onnx_tidy.compact``): node, tensor and initializer names are shortened, the
  records' node names follow, and the nodes' own ``metadata_props`` are dropped (the model's
  ``edge_sr.qdq`` record names each site's nodes); ``keep_names`` keeps them all.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from calibrate.calibfile import load_calibrated
from calibrate.export.emit import EmitOptions, fold_matmul_shifts, replace_sites
from calibrate.export.grid import TARGETS
from calibrate.export.trace import TRACE_OPSET, quant_sites, trace_with_sites
from calibrate.export_plugin import apply_lowbit_plugins
from calibrate.prepare import kept_weight_grids, quantizers
from calibrate.vocab import WEIGHT_CONTAINERS, Target, WeightContainer, expected
from edge_sr.errors import EdgeSRError
from edge_sr.fileio import atomic_path, check_writable
from edge_sr.onnx_tidy import (
    ATTENTION_OPSET,
    clip_codes,
    compact,
    drop_shape_expands,
    fuse_attention,
    lp_normalize,
    model_opset,
    position_tables,
    quantize_before_layout,
    split_qkv,
    tidy,
)

log = logging.getLogger(__name__)

# INT4 / UINT4 weight codes and per-axis Q/DQ need opset 21; the FP export needs only 17
# (edge_sr.onnx_export.FP_MIN_OPSET, the opset policy)
QDQ_MIN_OPSET = 21
META_KEY = "edge_sr.qdq"
ORT_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators (MatMulIntegerToFloat)


@dataclass(frozen=True)
class ExportConfig:
    """``weight_container``: "auto" stores weights of <= 4 bits as INT4 (smallest file), "int8"
    stores all weights as INT8 (what ORT 1.32 fuses into integer MatMul kernels).
    ``fuse_attention`` (``ort`` target without the low-bit plugin): each floating-point attention
    becomes ONNX's ``Attention`` operator, opset 23 (``edge_sr.onnx_tidy.fuse_attention``)."""

    target: Target = "ort"
    tile: tuple[int, int] = (64, 64)  # LR (height, width)
    batch: int = 1
    opset: int = 21
    lowbit_plugin: bool = False
    weight_container: WeightContainer = "auto"
    dynamic: bool = False  # symbolic height and width (``tile`` only traces); SwinIR-light
    keep_names: bool = False  # keep the traced node and initializer names (per-module profiles)
    fuse_attention: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise EdgeSRError(expected("--target", TARGETS, self.target))
        if self.weight_container not in WEIGHT_CONTAINERS:
            raise EdgeSRError(expected("--weights", WEIGHT_CONTAINERS, self.weight_container))
        max_opset = onnx.defs.onnx_opset_version()
        if not QDQ_MIN_OPSET <= self.opset <= max_opset:
            raise EdgeSRError(f"--opset: expected {QDQ_MIN_OPSET} to {max_opset} (this onnx "
                              f"{onnx.__version__}), got {self.opset}")
        if self.batch < 1 or min(self.tile) < 1:
            raise EdgeSRError(f"--tile/--batch: expected positive sizes, got tile "
                              f"{self.tile[0]}x{self.tile[1]} and batch {self.batch}")


def _student(calibrated) -> nn.Module:
    """Accept a ``CalibratedModel`` (``.model``), a fake-quant model, or a calibration file path."""
    if isinstance(calibrated, (str, os.PathLike)):
        calibrated = load_calibrated(calibrated)
    model = getattr(calibrated, "model", calibrated)
    if not isinstance(model, nn.Module):
        raise EdgeSRError(f"export: expected a calibrated model, got {type(model).__name__}")
    return model


def _check_model(model: nn.Module, cfg: ExportConfig) -> None:
    linears, acts = quant_sites(model)
    if not linears and not acts:
        raise EdgeSRError("export: the model has no quantizers; calibrate it first "
                          "(edge-sr calibrate)")
    missing = [n for n, q in quantizers(model) if not bool(q.initialized)]
    if missing:
        raise EdgeSRError(f"export: the model is not calibrated: {len(missing)} quantizer(s) "
                          f"never had their bounds set (first: {missing[0]})")
    req = getattr(model, "size_requirements", None)
    if req is not None and (why := req.check_tile(*cfg.tile)):
        raise EdgeSRError(f"--tile: {why} (the model's window); choose e.g. "
                          f"{max(req.multiple, cfg.tile[0] // req.multiple * req.multiple)}x"
                          f"{max(req.multiple, cfg.tile[1] // req.multiple * req.multiple)}")


def _set_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Raise the traced graph (opset 20, plus the placeholder domain) to ``opset``."""
    from onnx import version_converter

    try:
        out = version_converter.convert_version(proto, opset)
    except Exception as e:
        raise EdgeSRError(f"--opset: cannot convert the traced graph to opset {opset} ({e})"
                          ) from None
    return out


def build_qdq(model: nn.Module, cfg: ExportConfig) -> tuple[onnx.ModelProto, list[dict]]:
    """The in-memory QDQ model and its per-site records (no file written)."""
    _check_model(model, cfg)
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()  # tracing and the integer encodings run on the CPU
    linears, acts = quant_sites(model)
    if cfg.dynamic and not getattr(model, "dynamic_export", False):
        raise EdgeSRError(f"--dynamic: {getattr(model, 'arch', type(model).__name__)} has no "
                          "dynamic-shape export (its padding or masks need fixed sizes)")
    proto = trace_with_sites(model, cfg.tile, cfg.batch, cfg.dynamic)
    if cfg.opset != TRACE_OPSET:
        proto = _set_opset(proto, cfg.opset)
    opts = EmitOptions(target=cfg.target, weight_container=cfg.weight_container)
    proto, records, act_outputs = replace_sites(proto, linears, acts, opts)
    del proto.opset_import[:]
    proto.opset_import.extend([onnx.helper.make_opsetid("", cfg.opset)])
    if any(n.domain == ORT_DOMAIN for n in proto.graph.node):  # fused ORT integer linears
        proto.opset_import.extend([onnx.helper.make_opsetid(ORT_DOMAIN, 1)])
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    fold_matmul_shifts(proto, act_outputs)
    # q, k, v straight from their own GEMMs, integer or floating point (tidy finds a kept
    # weight's integer grid in its column blocks too)
    split = split_qkv(proto)
    expands = drop_shape_expands(proto)  # F.normalize's Expand before its Div
    log.debug("qkv: %d Concat -> Split chains replaced by per-head reshapes; %d Expands dropped",
              split, expands)
    if cfg.target == "ort" and not cfg.lowbit_plugin:  # (TensorRT places its own Q/DQ; the
        # low-bit plugin pass reads each linear's float input at its P/Clip)
        # each floating-point attention as one operator (opset 23), its heads' Transposes gone
        fused = fuse_attention(proto) if cfg.fuse_attention else 0
        if fused and cfg.opset < ATTENTION_OPSET:
            log.info("opset %d raised to %d for ONNX's Attention operator (%d attentions fused; "
                     "--unfused-attention keeps opset %d)", cfg.opset, ATTENTION_OPSET, fused,
                     cfg.opset)
        # the window partition / shift / heads merge move uint8 codes, and a < 8-bit grid is
        # clipped on its codes: bit for bit the same outputs
        moved, clips = quantize_before_layout(proto), clip_codes(proto)
        log.debug("%d attentions fused; %d layout regions now after their quantizer; %d float "
                  "Clips moved onto the codes or dropped", fused, moved, clips)
    norms = lp_normalize(proto)  # F.normalize as one LpNormalization (after the fusion's match)
    log.debug("%d L2 normalisations as LpNormalization", norms)
    saved = tidy(proto, position_tables(model), kept_weight_grids(model))
    log.debug("ONNX tidy (shared constants, masks, position tables, FP16): %.1f MB saved", saved / 1e6)
    del proto.graph.value_info[:]
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    meta = dict(version=1, target=cfg.target, config={**asdict(cfg), "tile": list(cfg.tile)},
                sites=records)
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta, separators=(",", ":"))})
    proto.producer_name, proto.doc_string = "edge-sr", "2DQuant QDQ export (calibrate.export_qdq)"
    onnx.checker.check_model(proto, full_check=True)
    return proto, records


DERIVED_KEYS = ("lower", "upper", "qmin", "qmax")  # from bits, scale, zero point and shift


def _rename_meta(proto: onnx.ModelProto, renamed: dict[str, str]) -> None:
    """Follow ``compact``'s renaming in the ``edge_sr.qdq`` records: node names (``q``, ``act_q``,
    ``matmul``) are mapped; ``weight`` (a name other names derive from) and the encodings'
    derived fields (``DERIVED_KEYS``) are dropped."""
    meta = read_qdq_meta(proto)
    for rec in meta["sites"]:
        rec.pop("weight", None)
        for key in ("q", "act_q", "matmul"):
            if key in rec:
                rec[key] = renamed.get(rec[key], rec[key])
        for enc in (rec, rec.get("act", {})):
            for key in DERIVED_KEYS:
                enc.pop(key, None)
            for key, v in enc.items():  # float32 values: the shortest repr that round-trips
                if isinstance(v, float):
                    enc[key] = float(str(np.float32(v)))
    for p in proto.metadata_props:
        if p.key == META_KEY:
            p.value = json.dumps(meta, separators=(",", ":"))


def export_qdq(calibrated, cfg: ExportConfig, output: str | os.PathLike,
               force: bool = True) -> Path:
    """Write the QDQ ONNX of ``calibrated`` to ``output`` atomically; returns the path."""
    output = check_writable(output, "-o")
    if output.exists() and not force:
        raise EdgeSRError(f"{output}: already exists; pass --force to overwrite")
    model = _student(calibrated)
    proto, records = build_qdq(model, cfg)
    if cfg.lowbit_plugin:
        proto = apply_lowbit_plugins(proto)
    # the file is for running: short names, no shape annotations
    renamed: dict[str, str] = {}
    compact(proto, keep_names=cfg.keep_names, renamed=renamed)
    if renamed:
        _rename_meta(proto, renamed)
    with atomic_path(output) as tmp:
        onnx.save(proto, str(tmp))
    n_groups = sum(r["kind"] == "linear" for r in records)
    n_lin = len({r["site"] for r in records if r["kind"] == "linear"})
    log.info("exported %s: %d quantized linears (%d weight groups: q, k and v of each qkv are "
             "one each), %d standalone activation sites (attention products, softmax, the "
             "inputs and outputs of quantized convolutions), target %s, opset %d",
             Path(output).name, n_lin, n_groups, len(records) - n_groups, cfg.target,
             model_opset(proto))
    return output


def read_qdq_meta(path_or_proto) -> dict:
    """The ``edge_sr.qdq`` metadata (config and every site's encoding) of an exported model."""
    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(
        str(path_or_proto), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    raise EdgeSRError(f"{path_or_proto}: not an edge-sr QDQ export (no {META_KEY} metadata)")


__all__ = ["ExportConfig", "export_qdq", "build_qdq", "read_qdq_meta", "QDQ_MIN_OPSET", "META_KEY"]
