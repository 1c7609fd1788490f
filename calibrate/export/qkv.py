"""Feed the q, k and v heads straight from their own integer GEMMs (no Concat, no Split).

A qkv linear whose q, k and v inputs are quantized separately (the paper's three quantizers)
becomes three integer products (``emit``), which the export joins with ``P/Concat`` so that the
traced attention can take the model's ``(b, n, 3 C)`` tensor apart again::

    Concat(y_q, y_k, y_v, axis=-1) -> Reshape(b, n, 3, h, d) -> Transpose(2, 0, 3, 1, 4)
        -> Gather(0 | 1 | 2, axis=0)                                 (ORT: one Split)

``split_qkv_concats`` rewrites each such chain as ``y_j -> Reshape(b, n, h, d) ->
Transpose(0, 2, 1, 3)``: the same (b, h, n, d) tensors, bit for bit, with two passes over the
whole qkv tensor fewer (the Concat and the Split). A chain that differs in any way (another
consumer, another permutation, a shape that is not a constant) is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

HEADS_FIRST = [2, 0, 3, 1, 4]  # (b, n, 3, h, d) -> (3, b, h, n, d)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _widths(graph: onnx.GraphProto) -> dict[str, int]:
    """The last dimension of every tensor whose shape inference gave one, and of every fused
    integer linear's output (ONNX's shape inference does not know ORT's contrib ops): the
    columns of its weight, an initializer or the Cast of one."""
    out = {}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            out[v.name] = dims[-1].dim_value
    dims = {t.name: list(t.dims) for t in graph.initializer}
    cast = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    for n in graph.node:
        if n.op_type == "MatMulIntegerToFloat" and n.output[0] not in out:
            w = dims.get(n.input[1]) or dims.get(cast.get(n.input[1], ""))
            if w and len(w) == 2:
                out[n.output[0]] = w[1]
    return out


def split_qkv_concats(proto: onnx.ModelProto) -> int:
    """Rewrite every ``Concat -> Reshape -> Transpose -> Gather`` qkv chain (module docstring) in
    place; returns how many were rewritten. Needs the width of the Concat's inputs (``_widths``),
    a constant Reshape shape and constant Gather indices (a fixed-shape export)."""
    graph = proto.graph
    consts, last = _constants(graph), _widths(graph)
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    removed: set[int] = set()
    inserted: dict[int, list[onnx.NodeProto]] = {}
    done = 0
    for cat in graph.node:
        if cat.op_type != "Concat" or len(cat.input) != 3 or cat.output[0] in outputs:
            continue
        rs = users.get(cat.output[0], [])
        if len(rs) != 1 or rs[0].op_type != "Reshape" or rs[0].input[1] not in consts:
            continue
        shape = [int(v) for v in consts[rs[0].input[1]].reshape(-1)]
        width = {last.get(i) for i in cat.input}
        if len(shape) != 5 or shape[2] != 3 or shape[3] <= 0 or len(width) != 1 or None in width:
            continue
        (width,) = width
        if shape[4] == -1 and width % shape[3] == 0:
            shape[4] = width // shape[3]
        if _attr(cat, "axis") not in (-1, 2) or shape[3] * shape[4] != width or \
                0 in shape[:2] or min(shape[:2]) < -1:
            continue
        ts = users.get(rs[0].output[0], [])
        if len(ts) != 1 or ts[0].op_type != "Transpose" or list(_attr(ts[0], "perm", [])) != \
                HEADS_FIRST or rs[0].output[0] in outputs or ts[0].output[0] in outputs:
            continue
        gathers = users.get(ts[0].output[0], [])
        index = [consts.get(g.input[1]) if g.op_type == "Gather" and _attr(g, "axis", 0) == 0
                 else None for g in gathers]
        if sorted(int(i) if i is not None and i.ndim == 0 else -1 for i in index) != [0, 1, 2]:
            continue
        new = []
        for g, j in zip(gathers, (int(i) for i in index)):
            base = f"{cat.name or cat.output[0]}/head{j}"
            sh = helper.make_tensor(f"{base}/shape", onnx.TensorProto.INT64, [4],
                                    [shape[0], shape[1], shape[3], shape[4]])
            graph.initializer.append(sh)
            new.append(helper.make_node("Reshape", [cat.input[j], sh.name], [f"{base}/split"],
                                        name=f"{base}/Reshape"))
            new.append(helper.make_node("Transpose", [f"{base}/split"], [g.output[0]],
                                        name=f"{base}/Transpose", perm=[0, 2, 1, 3]))
        ids = {id(cat), id(rs[0]), id(ts[0]), *(id(g) for g in gathers)}
        removed |= ids
        inserted[id(cat)] = new
        done += 1
    if done:
        nodes = []
        for n in graph.node:
            nodes.extend(inserted.get(id(n), []))
            if id(n) not in removed:
                nodes.append(n)
        del graph.node[:]
        graph.node.extend(nodes)
        used = {i for n in graph.node for i in n.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        # the removed tensors' inferred shapes would be stale
        kept = {o for n in graph.node for o in n.output}
        vi = [v for v in graph.value_info if v.name in kept]
        del graph.value_info[:]
        graph.value_info.extend(vi)
    return done
