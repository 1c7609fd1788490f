"""Post-pass over a QDQ export: each quantized linear becomes one ``edge_sr::LowBitLinear`` node.

TensorRT has no 2/3-bit or asymmetric GEMM, so ``--target trt --lowbit-plugin`` swaps every
quantized linear of ``calibrate.export_qdq`` (its activation Sub/Clip/Q/DQ, the weight DQ, the
MatMul and the shift/bias corrections, all named ``P/...`` after the module path ``P``) for one
custom node that TensorRT's ONNX parser hands to the ``LowBitLinear`` IPluginV3
(``runtime/plugins``) through its fallback plugin importer:

* ``op_type="LowBitLinear"``, ``domain="edge_sr"``, attributes ``plugin_version="1"`` and
  ``plugin_namespace="edge_sr"`` (TRT < 10.10 reads the namespace from the attribute, later
  versions also from the domain; both say the same);
* inputs: ``x`` (the float input of the linear), the packed weight codes ``P/W{j}_packed`` (int32
  words, layout of ``runtime/kernels/esr_lowbit.h``), the true bias ``P/W{j}_bias`` (float32);
* attributes: ``act_bits``, ``w_bits``, ``in_features``, ``out_features``, ``act_groups`` (1),
  ``has_bias``, ``act_lower``/``act_upper`` (the learned activation bounds) and ``w_lower``/
  ``w_scale`` (one weight grid per output row).

The node's maths is ``calibrate.export.packing.lowbit_linear_reference``. ONNX Runtime cannot run the node;
``decompose_lowbit_plugins`` rewrites it back into plain ONNX ops (fake-quant input, float weights)
so the plugin graph can be checked on a CPU.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from calibrate.export.packing import LowBitLinearParams, pack_weights
from edge_sr.errors import EdgeSRError

log = logging.getLogger(__name__)

OP_TYPE, DOMAIN, PLUGIN_VERSION, PLUGIN_NAMESPACE = "LowBitLinear", "edge_sr", "1", "edge_sr"
META_KEY = "edge_sr.lowbit_plugin"
QDQ_META_KEY = "edge_sr.qdq"


def _meta(proto: onnx.ModelProto, key: str) -> dict | None:
    for p in proto.metadata_props:
        if p.key == key:
            return json.loads(p.value)
    return None


def _set_meta(proto: onnx.ModelProto, key: str, value) -> None:
    for p in proto.metadata_props:
        if p.key == key:
            p.value = json.dumps(value)
            return
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, json.dumps(value)


def _per_column(value, n: int) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64).reshape(-1)
    return np.full(n, a[0]) if a.size == 1 else a


def _linear_params(rec: dict, inits: dict[str, np.ndarray]) -> LowBitLinearParams:
    """Recover the learned grids and the true bias of one exported group from its initializers.

    The export stores signed codes c (weights ``c*s + m_w``) and a bias folded with the activation
    shift ``m_x`` (``b + m_x * sum_k w_hat``); the plugin wants unsigned codes ``c + 2^(b-1)`` on
    the grid ``(m_w - 2^(b-1) s) + s*q`` and the true bias ``b``.
    """
    site, j = rec["site"], rec["group"]
    w_bits, a_bits, act = int(rec["w_bits"]), int(rec["a_bits"]), rec["act"]
    stored = inits[rec["weight"]].astype(np.int64)  # (K, N)
    zp = inits.get(f"{rec['weight']}_zero_point", np.zeros(()))
    k, n = stored.shape
    signed = stored - np.asarray(zp, np.int64).reshape(1, -1)
    half = 2 ** (w_bits - 1)
    codes = (signed + half).T  # (N, K) unsigned
    if codes.min() < 0 or codes.max() >= 2**w_bits:
        raise EdgeSRError(f"{rec['weight']}: weight codes leave the {w_bits}-bit range")
    scale = _per_column(inits[f"{rec['weight']}_scale"], n)
    shift = _per_column(inits[f"{rec['weight']}_shift"], n)
    w_graph = signed.T * scale[:, None] + shift[:, None]  # what the QDQ graph multiplies by
    bias = inits[f"{site}/bias{j}"].astype(np.float64) - float(act["shift"]) * w_graph.sum(1)
    return LowBitLinearParams(
        act_bits=a_bits, w_bits=w_bits, in_features=k, out_features=n,
        act_lower=torch.tensor([act["lower"]], dtype=torch.float32),
        act_upper=torch.tensor([act["upper"]], dtype=torch.float32),
        w_lower=torch.from_numpy((shift - half * scale).astype(np.float32)),
        w_scale=torch.from_numpy(scale.astype(np.float32)),
        packed=pack_weights(torch.from_numpy(codes.astype(np.uint8)), w_bits),
        bias=torch.from_numpy(bias.astype(np.float32)))


def _act_input(prefix: str, producer: dict[str, onnx.NodeProto], q_node: onnx.NodeProto) -> str:
    """The float tensor entering ``P/act{i}/Sub`` (or ``Clip`` when the shift is 0)."""
    clip = producer[q_node.input[0]]
    if clip.name != f"{prefix}Clip":
        raise EdgeSRError(f"{q_node.name}: expected {prefix}Clip before it, found {clip.name}")
    head = producer.get(clip.input[0])
    if head is not None and head.name == f"{prefix}Sub":
        return head.input[0]
    return clip.input[0]


def lowbit_node(name: str, x: str, packed: str, bias: str | None, out: str,
                p: LowBitLinearParams) -> onnx.NodeProto:
    """The ``edge_sr::LowBitLinear`` node for parameters ``p`` (attributes = plugin fields)."""
    inputs = [x, packed] + ([bias] if bias else [])
    return helper.make_node(
        OP_TYPE, inputs, [out], name=name, domain=DOMAIN, plugin_version=PLUGIN_VERSION,
        plugin_namespace=PLUGIN_NAMESPACE, act_bits=p.act_bits, w_bits=p.w_bits,
        in_features=p.in_features, out_features=p.out_features, act_groups=p.act_groups,
        has_bias=int(bias is not None), act_lower=p.act_lower.tolist(),
        act_upper=p.act_upper.tolist(), w_lower=p.w_lower.tolist(), w_scale=p.w_scale.tolist())


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads, then unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    keep_init = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_init)


def apply_lowbit_plugins(proto: onnx.ModelProto, max_bits: int = 8) -> onnx.ModelProto:
    """Replace every exported quantized linear with ``max(w_bits, a_bits) <= max_bits``.

    Works on both export targets (it reads the ``edge_sr.qdq`` site records and the stable node
    names, not the container). Returns the model (modified in place); raises ``EdgeSRError`` when
    the model is not an edge-sr QDQ export.
    """
    meta = _meta(proto, QDQ_META_KEY)
    if meta is None:
        raise EdgeSRError("--lowbit-plugin: the model is not an edge-sr QDQ export "
                          f"(no {QDQ_META_KEY} metadata)")
    if any(r["kind"] == "linear" and "weight" not in r for r in meta["sites"]):
        raise EdgeSRError("--lowbit-plugin: the model's names were shortened when it was written; "
                          "export it again with --lowbit-plugin (or --keep-names)")
    graph = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    replaced, drop = [], set()
    new_inits, new_nodes = [], {}
    for rec in meta["sites"]:
        if rec["kind"] != "linear" or max(rec["w_bits"], rec["a_bits"]) > max_bits:
            continue
        site, j = rec["site"], rec["group"]
        mm = nodes[rec["matmul"]]
        act_dq = producer[mm.input[0]]
        q_node = producer[act_dq.input[0]]
        prefix = q_node.name[: -len("QuantizeLinear")]
        p = _linear_params(rec, inits)
        x = _act_input(prefix, producer, q_node)
        add = nodes[f"{site}/Add{j}"]
        packed_name, bias_name = f"{site}/W{j}_packed", f"{site}/W{j}_bias"
        new_inits += [numpy_helper.from_array(p.packed.numpy(), packed_name),
                      numpy_helper.from_array(p.bias.numpy(), bias_name)]
        new_nodes[add.name] = lowbit_node(f"{site}/LowBitLinear{j}", x, packed_name, bias_name,
                                          add.output[0], p)
        drop |= {mm.name, f"{site}/ReduceSum{j}", f"{site}/MulShift{j}", f"{site}/AddBias{j}",
                 f"{site}/W{j}/DequantizeLinear"}
        replaced.append(dict(site=site, group=j, node=f"{site}/LowBitLinear{j}",
                             w_bits=p.w_bits, a_bits=p.act_bits))
    rebuilt = [new_nodes.get(n.name, n) for n in graph.node if n.name not in drop]
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_inits)
    _prune(graph)
    if replaced and not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    _set_meta(proto, META_KEY, dict(op_type=OP_TYPE, domain=DOMAIN, plugin_version=PLUGIN_VERSION,
                                    plugin_namespace=PLUGIN_NAMESPACE, nodes=replaced))
    onnx.checker.check_model(proto)
    log.info("LowBitLinear: replaced %d quantized linear group(s)", len(replaced))
    return proto


def params_from_node(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> LowBitLinearParams:
    """Read a ``LowBitLinear`` node (attributes + initializers) back into parameters."""
    a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
    bias = torch.from_numpy(inits[node.input[2]].astype(np.float32)) if a["has_bias"] else None
    return LowBitLinearParams(
        act_bits=a["act_bits"], w_bits=a["w_bits"], in_features=a["in_features"],
        out_features=a["out_features"],
        act_lower=torch.tensor(a["act_lower"], dtype=torch.float32),
        act_upper=torch.tensor(a["act_upper"], dtype=torch.float32),
        w_lower=torch.tensor(a["w_lower"], dtype=torch.float32),
        w_scale=torch.tensor(a["w_scale"], dtype=torch.float32),
        packed=torch.from_numpy(inits[node.input[1]].astype(np.int32)), bias=bias)


def decompose_lowbit_plugins(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with each LowBitLinear as plain ONNX: fake-quant input, float weight, MatMul, bias.

    For checking a plugin graph with ONNX Runtime on a machine without TensorRT (act_groups 1).
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes, extra = [], []
    for n in graph.node:
        if n.op_type != OP_TYPE or n.domain != DOMAIN:
            nodes.append(n)
            continue
        p = params_from_node(n, inits)
        if p.act_groups != 1:
            raise EdgeSRError(f"{n.name}: decomposition supports act_groups=1 only")
        s = f"{n.name}/ref"
        lo, up = float(p.act_lower[0]), float(p.act_upper[0])
        step = float((p.act_upper[0] - p.act_lower[0]) / (2**p.act_bits - 1))
        extra += [numpy_helper.from_array(np.float32(v), f"{s}/{k}") for k, v in
                  (("lo", lo), ("up", up), ("step", step))]
        extra.append(numpy_helper.from_array(p.dequantized_weight().T.contiguous().numpy(),
                                             f"{s}/W"))
        nodes += [helper.make_node("Clip", [n.input[0], f"{s}/lo", f"{s}/up"], [f"{s}/c"]),
                  helper.make_node("Sub", [f"{s}/c", f"{s}/lo"], [f"{s}/d"]),
                  helper.make_node("Div", [f"{s}/d", f"{s}/step"], [f"{s}/r"]),
                  helper.make_node("Round", [f"{s}/r"], [f"{s}/q"]),
                  helper.make_node("Mul", [f"{s}/q", f"{s}/step"], [f"{s}/sq"]),
                  helper.make_node("Add", [f"{s}/sq", f"{s}/lo"], [f"{s}/xh"]),
                  helper.make_node("MatMul", [f"{s}/xh", f"{s}/W"],
                                   [f"{s}/y" if len(n.input) > 2 else n.output[0]])]
        if len(n.input) > 2:
            nodes.append(helper.make_node("Add", [f"{s}/y", n.input[2]], [n.output[0]]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(extra)
    _prune(graph)
    keep = [o for o in out.opset_import if o.domain != DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out
