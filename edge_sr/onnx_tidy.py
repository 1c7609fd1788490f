"""Graph clean-ups that change bytes, not numbers (the FP32 export and the QDQ export).

A fixed-shape trace bakes each shifted block's attention mask in as its own ``Constant``: 1 MB
each at a 64x64 tile, 15 MB each for a 320x180 frame (920 windows x 64 x 64 float32), twelve
of them in SwinIR-light. ``share_constants`` keeps one copy of byte-identical tensors;
``compress_masks`` stores each remaining mask as its tokens' region labels (``nW x 64``) and
rebuilds it in the graph (``Where(Equal(label_i, label_j), 0, -100)``), exactly.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

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


MASK_MIN_BYTES = 1 << 16
MASK_FILL = -100.0  # Swin's shifted-window mask value (edge_sr.models.swinir.shift_attention_mask)


def _region_labels(a: np.ndarray) -> np.ndarray | None:
    """(..., N) labels whose pairwise equality is ``a == 0``, or None when ``a`` (..., N, N) is
    not such a 0 / -100 mask of an equivalence relation."""
    n = a.shape[-1]
    if a.ndim < 3 or a.shape[-2] != n:
        return None
    flat = a.reshape(-1, n, n)
    zero = flat == 0
    if not np.all(zero | (flat == MASK_FILL)):
        return None
    labels = zero.argmax(axis=2)  # the first token in the same region (itself at the latest)
    if not np.array_equal(labels[:, :, None] == labels[:, None, :], zero):
        return None
    return labels.reshape(a.shape[:-1]).astype(np.int32)


def compress_masks(proto: onnx.ModelProto) -> int:
    """Replace each large 0 / -100 attention-mask initializer by its region labels and three
    nodes that rebuild it (bit-exact). Returns the bytes saved; needs opset >= 13."""
    graph = proto.graph
    new_nodes, keep, saved = [], [], 0
    for t in graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or len(t.raw_data) < MASK_MIN_BYTES:
            keep.append(t)
            continue
        labels = _region_labels(numpy_helper.to_array(t))
        if labels is None:
            keep.append(t)
            continue
        p = f"{t.name}/mask"
        keep += [numpy_helper.from_array(labels, f"{p}_labels"),
                 numpy_helper.from_array(np.array([-1], np.int64), f"{p}_ax_m1"),
                 numpy_helper.from_array(np.array([-2], np.int64), f"{p}_ax_m2"),
                 numpy_helper.from_array(np.array(0.0, np.float32), f"{p}_zero"),
                 numpy_helper.from_array(np.array(MASK_FILL, np.float32), f"{p}_fill")]
        new_nodes += [
            helper.make_node("Unsqueeze", [f"{p}_labels", f"{p}_ax_m1"], [f"{p}_col"],
                             name=f"{p}/UnsqueezeCol"),
            helper.make_node("Unsqueeze", [f"{p}_labels", f"{p}_ax_m2"], [f"{p}_row"],
                             name=f"{p}/UnsqueezeRow"),
            helper.make_node("Equal", [f"{p}_col", f"{p}_row"], [f"{p}_same"], name=f"{p}/Equal"),
            helper.make_node("Where", [f"{p}_same", f"{p}_zero", f"{p}_fill"], [t.name],
                             name=f"{p}/Where")]
        saved += len(t.raw_data) - labels.nbytes
    if new_nodes:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = new_nodes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return saved


def tidy(proto: onnx.ModelProto) -> int:
    """``share_constants`` then ``compress_masks``; returns the bytes saved."""
    return share_constants(proto) + compress_masks(proto)
