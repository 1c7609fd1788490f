"""Graph clean-ups that change bytes, not numbers.

A fixed-shape trace bakes each shifted block's attention mask in as its own ``Constant`` (1 MB
each at a 64x64 tile, twelve of them in SwinIR-light): sharing identical tensors is most of the
difference between an 18 MB and a 6 MB file. Applied to the QDQ export and, for fair size
comparisons, to the FP32 reference graph.
"""

from __future__ import annotations

import hashlib

import onnx
from onnx import helper

MIN_SHARED_BYTES = 1024


def drop_unused_initializers(proto: onnx.ModelProto) -> None:
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _key(t: onnx.TensorProto) -> str | None:
    if not t.raw_data or len(t.raw_data) < MIN_SHARED_BYTES:
        return None
    h = hashlib.sha256(t.raw_data).hexdigest()
    return f"{t.data_type}:{tuple(t.dims)}:{h}"


def share_constants(proto: onnx.ModelProto) -> int:
    """Turn large ``Constant`` nodes into initializers and share the byte-identical ones.

    Returns the number of bytes saved.
    """
    graph = proto.graph
    nodes, moved = [], []
    for n in graph.node:
        if (n.op_type == "Constant" and n.domain == "" and len(n.attribute) == 1
                and n.attribute[0].name == "value"):
            t = helper.get_attribute_value(n.attribute[0])
            if len(t.raw_data) >= MIN_SHARED_BYTES:
                t.name = n.output[0]
                moved.append(t)
                continue
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(moved)
    first: dict[str, str] = {}
    rename: dict[str, str] = {}
    saved = 0
    outputs = {o.name for o in graph.output}
    for t in moved:  # only traced constants: named initializers (weights, scales) stay apart
        k = _key(t)
        if k is None or t.name in outputs:
            continue
        if k in first:
            rename[t.name] = first[k]
            saved += len(t.raw_data)
        else:
            first[k] = t.name
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    drop_unused_initializers(proto)
    return saved
