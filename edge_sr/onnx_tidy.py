"""Graph clean-ups that change bytes, not numbers (the FP32 export and the QDQ export).

A fixed-shape trace bakes each shifted block's attention mask in as its own ``Constant``: 1 MB
each at a 64x64 tile, 15 MB each for a 320x180 frame (920 windows x 64 x 64 float32), twelve
of them in SwinIR-light. ``share_constants`` keeps one copy of byte-identical tensors;
``compress_masks`` stores each remaining mask as its tokens' region labels (``nW x 64``) and
rebuilds it in the graph (``Where(Equal(label_i, label_j), 0, -100)``), exactly.

Rewrites that change the work, not the numbers: ``split_qkv``, ``drop_shape_expands`` and
``lp_normalize`` (both graphs), and, for the ORT engine, ``quantize_before_layout`` and
``clip_codes`` (layout ops and clips on the quantizers' uint8 codes instead of float32).
``fuse_attention`` (both ONNX Runtime graphs) changes the numbers by float rounding only: each
window attention becomes ONNX's ``Attention`` operator (opset 23).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

MIN_SHARED_BYTES = 1024
INT4_MIN_OPSET = 21  # Cast and Q/DQ take (u)int4 from opset 21


def drop_unused_initializers(proto: onnx.ModelProto) -> None:
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def drop_dead_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads (the graph's ``outputs`` aside), until
    none is left: e.g. the ``Identity`` of a weight whose only MatMul a rewrite replaced, which
    ONNX Runtime would otherwise prune itself, warning once per initializer."""
    nodes = list(nodes)
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            return nodes
        nodes = live


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
    # only tokens of one window are compared: number its regions 0, 1, ... (a few, so 4 bits)
    labels = np.stack([np.unique(row, return_inverse=True)[1].reshape(-1) for row in labels])
    return labels.reshape(a.shape[:-1]).astype(np.int32)


def compress_masks(proto: onnx.ModelProto) -> int:
    """Replace each large 0 / -100 attention-mask initializer by its region labels and three
    nodes that rebuild it (bit-exact). Labels below 16 are stored as UINT4 where the opset has
    it (>= 21), else as uint8. Returns the bytes saved; needs opset >= 13."""
    graph = proto.graph
    int4_ok = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                   0) >= INT4_MIN_OPSET
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
        labels_in = f"{p}_labels"
        if labels.max(initial=0) < 256:  # a nibble or a byte per token, widened in the graph
            small = "uint4" if labels.max(initial=0) < 16 and int4_ok else "uint8"
            new_nodes.append(helper.make_node("Cast", [f"{p}_labels_{small}"], [labels_in],
                                              name=f"{p}/CastLabels", to=onnx.TensorProto.INT32))
            packed = int_initializer(f"{p}_labels_{small}", labels, small)
        else:
            packed = numpy_helper.from_array(labels, labels_in)
        keep += [packed,
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
        saved += len(t.raw_data) - len(packed.raw_data)
    if new_nodes:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = new_nodes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return saved


def int_initializer(name: str, codes: np.ndarray, container: str) -> onnx.TensorProto:
    """Integer codes as an initializer of ``container`` (int8, uint8, int4, uint4); 4-bit
    containers hold two codes per byte, low nibble first (ONNX's packing)."""
    codes = np.asarray(codes)
    if container in ("int4", "uint4"):
        flat = (codes.astype(np.int64).reshape(-1) & 0x0F).astype(np.uint8)
        if flat.size % 2:
            flat = np.append(flat, np.uint8(0))
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
        kind = onnx.TensorProto.INT4 if container == "int4" else onnx.TensorProto.UINT4
        return helper.make_tensor(name, kind, codes.shape, packed, raw=True)
    dtype = np.uint8 if container == "uint8" else np.int8
    if codes.min(initial=0) < np.iinfo(dtype).min or codes.max(initial=0) > np.iinfo(dtype).max:
        raise ValueError(f"{name}: codes do not fit {container}")
    return numpy_helper.from_array(codes.astype(dtype), name)


def store_int_weights(proto: onnx.ModelProto, grids: list[tuple]) -> int:
    """Store weights that are exactly ``codes * scale`` as their codes (INT8, or INT4 for
    ``bits <= 4``) with ``Cast -> Mul(scale)``, which rebuilds the same float32 values (one
    float32 product, as the student computed them) and which ORT folds at load. A scale of FP16
    values is stored as FP16 (and a Cast).

    ``grids``: ``(weight, codes, scale, bits[, dq])`` per weight, ``weight`` float32
    ``(out, ...)``, ``codes`` integer of the same shape, ``scale`` ``(out,)`` (``calibrate.prepare.
    kept_weight_grids``). With ``dq`` true the weight is written as ``DequantizeLinear`` of INT8
    codes (per output channel, zero point 0; the same float32 product) instead: the form ONNX
    Runtime fuses into an integer kernel (``QLinearConv``) when the layer's input and output are
    Q/DQ too, where a float weight would be quantized again by ORT's own rule. A float32 initializer matches a weight when it holds the same bytes,
    as is (a convolution's ``(out, in, kh, kw)``), transposed (a linear's ``(in, out)`` MatMul
    operand), or as a third of that operand's columns (a qkv weight's q, k or v block, which
    ``split_qkv`` makes). Returns the bytes saved; a weight that matches nothing stays float32.
    """
    wanted: dict[bytes, tuple[np.ndarray, np.ndarray, int, int]] = {}
    dq_form = {i for i, g in enumerate(grids) if len(g) > 4 and g[4]}

    def want(a: np.ndarray, codes: np.ndarray, scale: np.ndarray, bits: int, i: int) -> None:
        a = np.ascontiguousarray(a)
        wanted[hashlib.sha256(a.tobytes()).digest() + bytes(str(a.shape), "ascii")] = (
            codes, scale, bits, i)

    for i, (w, codes, scale, bits, *_) in enumerate(grids):
        w, scale = np.asarray(w, np.float32), np.asarray(scale, np.float32)
        want(w, codes, scale.reshape((-1,) + (1,) * (w.ndim - 1)), bits, i)
        if w.ndim == 2:  # a linear's weight traced as MatMul(x, W^T)
            want(w.T, codes.T, scale.reshape(1, -1), bits, i)
            c = w.shape[0] // 3
            for j in range(3 if w.shape[0] % 3 == 0 else 0):  # split_qkv's column blocks
                rows = slice(j * c, (j + 1) * c)
                want(w[rows].T, codes[rows].T, scale[rows].reshape(1, -1), bits, i)
    graph = proto.graph
    new_nodes, keep, saved, found = [], [], 0, set()
    for t in graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or not wanted:
            keep.append(t)
            continue
        a = numpy_helper.to_array(t)
        hit = wanted.get(hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest()
                         + bytes(str(a.shape), "ascii"))
        if hit is None:
            keep.append(t)
            continue
        codes, scale, bits, i = hit
        found.add(i)
        if not np.array_equal(codes.astype(np.float32) * scale, a):  # pragma: no cover
            keep.append(t)
            continue
        if i in dq_form:  # DequantizeLinear(codes, scale, 0) along the output channels
            keep += [numpy_helper.from_array(codes.astype(np.int8), f"{t.name}/codes"),
                     numpy_helper.from_array(scale.reshape(-1).astype(np.float32),
                                             f"{t.name}/scale"),
                     numpy_helper.from_array(np.zeros(codes.shape[0], np.int8),
                                             f"{t.name}/zero_point")]
            new_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{t.name}/codes", f"{t.name}/scale", f"{t.name}/zero_point"],
                [t.name], name=f"{t.name}/DequantizeLinear", axis=0))
            saved += a.nbytes - codes.size - scale.nbytes - codes.shape[0]
            continue
        container = "int4" if bits <= 4 else "int8"
        keep.append(int_initializer(f"{t.name}/codes", codes, container))
        new_nodes.append(helper.make_node("Cast", [f"{t.name}/codes"], [f"{t.name}/float"],
                                          name=f"{t.name}/Cast", to=onnx.TensorProto.FLOAT))
        sname = f"{t.name}/scale"
        if np.array_equal(scale.astype(np.float16).astype(np.float32), scale):
            keep.append(numpy_helper.from_array(scale.astype(np.float16), f"{sname}_fp16"))
            new_nodes.append(helper.make_node("Cast", [f"{sname}_fp16"], [sname],
                                              name=f"{sname}/Cast", to=onnx.TensorProto.FLOAT))
        else:
            keep.append(numpy_helper.from_array(scale, sname))
        new_nodes.append(helper.make_node("Mul", [f"{t.name}/float", sname], [t.name],
                                          name=f"{t.name}/MulScale"))
        saved += a.nbytes - (codes.size * bits + 7) // 8 - scale.nbytes
    if len(found) < len(grids):  # e.g. a weight the trace folded into another constant
        log.warning("%d of %d integer-grid weights were not found in the graph and stay float32",
                    len(grids) - len(found), len(grids))
    if new_nodes:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        _prepend(proto, new_nodes)
    return saved


def _prepend(proto: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    if nodes:
        rest = list(proto.graph.node)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes + rest)


def gather_position_biases(proto: onnx.ModelProto,
                           tables: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """Replace each float constant equal to a relative-position bias by its table and a gather.

    ``tables``: ``(table, index)`` pairs, ``table`` ``(R, nh)`` float32 and ``index`` ``(n, n)``
    integer, as Swin computes the bias: ``table[index].permute(2, 0, 1)`` (``nh x n x n``,
    leading unit axes allowed). Each matching initializer becomes ``Gather(table, index) ->
    Transpose -> Reshape``, bit-exact. A dynamic-shape trace folds only the gather,
    ``table[index.view(-1)]`` (``n*n x nh``): that form becomes ``Gather -> Reshape``. Returns the
    bytes saved.
    """
    graph = proto.graph
    wanted: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, bool]] = {}
    for table, index in tables:
        table = np.ascontiguousarray(table, np.float32)
        n = index.shape[-1]
        flat = np.ascontiguousarray(table[index.reshape(-1)])
        bias = np.ascontiguousarray(flat.reshape(n, n, -1).transpose(2, 0, 1))
        for value, heads_first in ((bias, True), (flat, False)):
            wanted.setdefault((value.nbytes, hashlib.sha256(value.tobytes()).hexdigest()),
                              (table, index, heads_first))
    if not wanted:
        return 0
    indices: dict[bytes, str] = {}
    new_nodes, keep, saved = [], [], 0
    for t in graph.initializer:
        hit = (t.data_type == onnx.TensorProto.FLOAT and t.raw_data
               and wanted.get((len(t.raw_data), hashlib.sha256(t.raw_data).hexdigest())))
        if not hit:
            keep.append(t)
            continue
        table, index, heads_first = hit
        idx = np.ascontiguousarray(index if heads_first else index.reshape(-1), np.int32)
        iname = indices.get(idx.tobytes())
        if iname is None:
            iname = indices[idx.tobytes()] = f"position_index_{len(indices)}"
            if idx.max(initial=0) < 256:  # one byte per index, widened once in the graph
                keep.append(numpy_helper.from_array(idx.astype(np.uint8), f"{iname}_u8"))
                new_nodes.append(helper.make_node("Cast", [f"{iname}_u8"], [iname],
                                                  name=f"{iname}/Cast", to=onnx.TensorProto.INT32))
            else:
                keep.append(numpy_helper.from_array(idx, iname))
        p = f"{t.name}/position"
        keep += [numpy_helper.from_array(table, f"{p}_table"),
                 numpy_helper.from_array(np.array(t.dims, np.int64), f"{p}_shape")]
        new_nodes.append(helper.make_node("Gather", [f"{p}_table", iname], [f"{p}_gathered"],
                                          name=f"{p}/Gather", axis=0))
        if heads_first:
            new_nodes.append(helper.make_node("Transpose", [f"{p}_gathered"], [f"{p}_heads"],
                                              name=f"{p}/Transpose", perm=[2, 0, 1]))
        new_nodes.append(helper.make_node(
            "Reshape", [f"{p}_heads" if heads_first else f"{p}_gathered", f"{p}_shape"], [t.name],
            name=f"{p}/Reshape"))
        saved += len(t.raw_data) - table.nbytes
    if new_nodes:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        _prepend(proto, new_nodes)
    return saved


FP16_MIN_BYTES = 1024
# consumers that see the folded FP32 constant; quantization scales stay plain initializers,
# which ORT's QDQ fusions require before constant folding runs
FP16_CONSUMERS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "Add", "Mul", "Identity"}


def store_fp16(proto: onnx.ModelProto) -> int:
    """Store each large float32 initializer whose values are all exactly FP16 as FP16 plus a
    ``Cast`` back to float32 (exact). Returns the bytes saved."""
    graph = proto.graph
    consumers: dict[str, set[str]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, set()).add(n.op_type)
    outputs = {o.name for o in graph.output}
    new_nodes, keep, saved = [], [], 0
    for t in graph.initializer:
        ops = consumers.get(t.name, set())
        if (t.data_type != onnx.TensorProto.FLOAT or len(t.raw_data) < FP16_MIN_BYTES
                or not ops or not ops <= FP16_CONSUMERS or t.name in outputs):
            keep.append(t)
            continue
        a = numpy_helper.to_array(t)
        half = a.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), a):
            keep.append(t)
            continue
        keep.append(numpy_helper.from_array(half, f"{t.name}/fp16"))
        new_nodes.append(helper.make_node("Cast", [f"{t.name}/fp16"], [t.name],
                                          name=f"{t.name}/CastFP32", to=onnx.TensorProto.FLOAT))
        saved += half.nbytes
    if new_nodes:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        _prepend(proto, new_nodes)
    return saved


def drop_default_attributes(proto: onnx.ModelProto) -> int:
    """Remove node attributes that equal their operator schema's default (``allowzero=0`` on
    every Reshape, ``axis=0`` on Gather, ...): the same graph in fewer bytes. Returns how many."""
    opsets = {o.domain or "": o.version for o in proto.opset_import}
    defaults: dict[tuple[str, str], dict] = {}
    n_dropped = 0
    for n in proto.graph.node:
        key = (n.domain or "", n.op_type)
        if key not in defaults:
            try:
                schema = onnx.defs.get_schema(n.op_type, opsets.get(key[0], 1), key[0])
            except onnx.defs.SchemaError:
                schema = None
            defaults[key] = {} if schema is None else {
                a.name: helper.get_attribute_value(a.default_value)
                for a in schema.attributes.values()
                if a.default_value.type != onnx.AttributeProto.UNDEFINED}
        dflt = defaults[key]
        keep = [a for a in n.attribute
                if a.name not in dflt or helper.get_attribute_value(a) != dflt[a.name]]
        if len(keep) < len(n.attribute):
            n_dropped += len(n.attribute) - len(keep)
            del n.attribute[:]
            n.attribute.extend(keep)
    return n_dropped


def compact(proto: onnx.ModelProto, keep_names: bool = False,
            renamed: dict[str, str] | None = None) -> int:
    """Smaller bytes for a file that will only be run: drop ``value_info``, node doc strings and
    attributes at their defaults (``drop_default_attributes``), keep one ``Constant`` node per
    distinct small constant, and give every intermediate tensor a short name. Graph inputs and
    outputs keep theirs.

    Node and initializer names are shortened too (``n<k>``, ``w<k>``: unique, so ORT's profiles
    and its own quantizer still work), and nodes lose their ``metadata_props`` (descriptions
    for readers, which no runtime reads; an exporter that needs them keeps its own copy in the
    model's ``metadata_props``), unless ``keep_names`` (``edge-sr export --keep-names``, for
    per-module profiles and reading). ``renamed``, when given, receives old -> new for every
    node and initializer renamed. Returns the bytes saved."""
    graph = proto.graph
    before = proto.ByteSize()
    del graph.value_info[:]
    for n in graph.node:
        n.doc_string = ""
    drop_default_attributes(proto)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in graph.node for a in n.attribute):
        # subgraphs (If, Loop) read outer names that the renaming below does not follow
        return before - proto.ByteSize()
    first: dict[bytes, str] = {}
    rename: dict[str, str] = {}
    nodes = []
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
        if n.op_type == "Constant" and n.domain == "" and len(n.output) == 1:
            key = b"".join(a.SerializeToString() for a in n.attribute)
            if key in first:
                rename[n.output[0]] = first[key]
                continue
            first[key] = n.output[0]
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    io = {i.name for i in graph.input} | {o.name for o in graph.output}
    inits = {t.name for t in graph.initializer}
    short: dict[str, str] = {}
    renamed = {} if renamed is None else renamed
    if not keep_names:
        for t in graph.initializer:
            if t.name not in io:
                short[t.name] = renamed[t.name] = t.name = f"w{np.base_repr(len(short), 36)}"
        for k, n in enumerate(graph.node):
            renamed[n.name] = n.name = f"n{np.base_repr(k, 36)}"
            del n.metadata_props[:]
    n_inits = len(short)
    for n in graph.node:
        for i, name in enumerate(n.output):
            if name and name not in io and name not in inits:
                short[name] = n.output[i] = f"t{np.base_repr(len(short) - n_inits, 36)}"
        for i, name in enumerate(n.input):
            if name in short:
                n.input[i] = short[name]
    return before - proto.ByteSize()


HEADS_FIRST = [2, 0, 3, 1, 4]  # (b, n, 3, h, d) -> (3, b, h, n, d): a window attention's q, k, v


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node outputs by name, as arrays."""
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


def _wiring(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto],
                                             dict[str, list[onnx.NodeProto]], set[str]]:
    """Each tensor's producing node, each tensor's reading nodes, and the graph's output names."""
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return producer, users, {o.name for o in graph.output}


def split_qkv(proto: onnx.ModelProto) -> int:
    """Give a window attention's q, k and v each its own product, feeding its heads directly.

    The traced attention computes ``(b, n, 3 C)`` and takes it apart again::

        S -> Reshape(b, n, 3, h, d) -> Transpose(2, 0, 3, 1, 4) -> Gather(0 | 1 | 2, axis=0)

    (ONNX Runtime: one Split), where ``S`` is the FP graph's ``Add(MatMul(x, W), b)`` with
    constant ``W`` (K, 3C) and ``b`` (3C,), or the QDQ export's ``Concat`` of the three integer
    products of separately quantized q, k and v inputs. Each such chain becomes, for j = q, k,
    v, ``Add(MatMul(x, W_j), b_j)`` (the column block of ``W`` and ``b``) or the Concat's input
    j, then ``Reshape(b, n, h, d) -> Transpose(0, 2, 1, 3)``: the same (b, h, n, d) tensors
    without the Concat or the Split, two passes over the whole qkv tensor (docs/results/
    grids.md). The QDQ rewrite moves data only; the FP one computes the same dot products (bit
    for bit in ONNX Runtime on the development CPU). A chain that differs in any way (another consumer, another
    permutation, a shape that is not a constant, as in a dynamic-shape export) is left as it is.
    Run it before ``tidy``: it adds float32 weight blocks, which ``store_int_weights`` stores as
    integer codes where the weight was kept on an integer grid (the QDQ export's floating-point
    qkv products, such as NGswin's N-gram context). A weight that several MatMuls share
    (NGswin's) is split once. Returns how many chains it rewrote.
    """
    graph = proto.graph
    consts = _constants(graph)
    width_of = {k: v[-1] for k, v in _shapes(proto).items() if v and v[-1] is not None}
    inits = {t.name for t in graph.initializer}
    producer, users, outputs = _wiring(graph)

    def only_user(name: str, op: str) -> onnx.NodeProto | None:
        us = users.get(name, [])
        return us[0] if len(us) == 1 and us[0].op_type == op and name not in outputs else None

    def weight(name: str) -> str | None:
        while name not in inits and name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return name if name in inits else None

    blocks: dict[tuple[str, str], list[str]] = {}  # (weight, bias) -> its q, k, v blocks' names

    removed: set[int] = set()
    inserted: dict[int, list[onnx.NodeProto]] = {}
    done = 0
    for rs in graph.node:
        if rs.op_type != "Reshape" or rs.input[1] not in consts:
            continue
        shape = [int(v) for v in consts[rs.input[1]].reshape(-1)]
        src = producer.get(rs.input[0])
        ts = only_user(rs.output[0], "Transpose")
        if (len(shape) != 5 or shape[2] != 3 or shape[3] <= 0 or src is None or ts is None
                or list(_attr(ts, "perm", [])) != HEADS_FIRST or ts.output[0] in outputs
                or 0 in shape[:2] or min(shape[:2]) < -1 or not only_user(rs.input[0], "Reshape")):
            continue
        gathers = users.get(ts.output[0], [])
        index = [consts.get(g.input[1]) if g.op_type == "Gather" and _attr(g, "axis", 0) == 0
                 else None for g in gathers]
        if sorted(int(i) if i is not None and i.ndim == 0 else -1 for i in index) != [0, 1, 2]:
            continue
        base = src.name or src.output[0]
        new: list[onnx.NodeProto] = []
        gone = [src]
        if src.op_type == "Concat" and len(src.input) == 3 and _attr(src, "axis") in (-1, 2):
            widths = {width_of.get(i) for i in src.input}
            parts = list(src.input)
        elif src.op_type == "Add":
            mm = next((producer.get(i) for i in src.input if i not in consts), None)
            bname = next((i for i in src.input if i in consts), None)
            wname = weight(mm.input[1]) if mm is not None and mm.op_type == "MatMul" else None
            if wname is None or bname is None:
                continue
            w, b = consts[wname], consts[bname]
            if (w.ndim != 2 or b.shape != (w.shape[1],) or w.shape[1] % 3
                    or not only_user(mm.output[0], "Add")):
                continue
            c = w.shape[1] // 3
            if (wname, bname) not in blocks:
                blocks[(wname, bname)] = [f"{base}/qkv{j}" for j in range(3)]
                for j, p in enumerate(blocks[(wname, bname)]):
                    graph.initializer.extend([
                        numpy_helper.from_array(np.ascontiguousarray(w[:, j * c:(j + 1) * c]),
                                                f"{p}_W"),
                        numpy_helper.from_array(np.ascontiguousarray(b[j * c:(j + 1) * c]),
                                                f"{p}_b")])
            widths, parts = {c}, []
            for j, blk in enumerate(blocks[(wname, bname)]):
                p = f"{base}/qkv{j}"
                new += [helper.make_node("MatMul", [mm.input[0], f"{blk}_W"], [f"{p}_mm"],
                                         name=f"{p}/MatMul"),
                        helper.make_node("Add", [f"{p}_mm", f"{blk}_b"], [f"{p}_out"],
                                         name=f"{p}/Add")]
                parts.append(f"{p}_out")
            gone.append(mm)
        else:
            continue
        if len(widths) != 1 or None in widths:
            continue
        (width,) = widths
        if shape[4] == -1 and width % shape[3] == 0:
            shape[4] = width // shape[3]
        if shape[3] * shape[4] != width:
            continue
        sh = f"{base}/head_shape"
        graph.initializer.append(numpy_helper.from_array(
            np.array([shape[0], shape[1], shape[3], shape[4]], np.int64), sh))
        for g, j in zip(gathers, (int(i) for i in index)):
            p = f"{base}/head{j}"
            new += [helper.make_node("Reshape", [parts[j], sh], [f"{p}_split"],
                                     name=f"{p}/Reshape"),
                    helper.make_node("Transpose", [f"{p}_split"], [g.output[0]],
                                     name=f"{p}/Transpose", perm=[0, 2, 1, 3])]
        removed |= {id(n) for n in (*gone, rs, ts, *gathers)}
        inserted[id(gone[-1])] = new  # where the first removed node stood: inputs are ready
        done += 1
    if done:
        nodes = []
        for n in graph.node:
            nodes.extend(inserted.get(id(n), []))
            if id(n) not in removed:
                nodes.append(n)
        del graph.node[:]
        graph.node.extend(drop_dead_nodes(nodes, {o.name for o in graph.output}))
        drop_unused_initializers(proto)
        kept = {o for n in graph.node for o in n.output}  # the removed tensors' shapes go too
        vi = [v for v in graph.value_info if v.name in kept]
        del graph.value_info[:]
        graph.value_info.extend(vi)
    elif blocks:  # weight blocks made for a chain that failed a later check
        drop_unused_initializers(proto)
    return done


BROADCASTING = {"Add", "Sub", "Mul", "Div"}  # ONNX's multidirectional-broadcasting binaries


def drop_shape_expands(proto: onnx.ModelProto) -> int:
    """Remove ``Expand(a, Shape(y))`` where every reader is a broadcasting binary op (Add, Sub,
    Mul, Div) whose other operand is ``y`` itself: ``op(y, Expand(a, Shape(y)))`` and
    ``op(y, a)`` have the same shape (both broadcast ``a`` against ``y``) and the same values,
    without writing ``a`` out at ``y``'s size first. ``F.normalize`` exports as
    ``Div(x, Expand(Clip(ReduceL2(x)), Shape(x)))``: NGswin's cosine attention has 120 of them at
    a 320x180 frame, ~8% of the frame in ONNX Runtime (docs/results/grids.md). Returns how many
    were removed."""
    graph = proto.graph
    producer, users, outputs = _wiring(graph)
    done = 0
    for ex in graph.node:
        shape = producer.get(ex.input[1]) if ex.op_type == "Expand" else None
        if shape is None or shape.op_type != "Shape" or len(shape.attribute) or \
                ex.output[0] in outputs:
            continue
        y, readers = shape.input[0], users.get(ex.output[0], [])
        if not readers or not all(r.op_type in BROADCASTING and len(r.input) == 2
                                  and list(r.input).count(ex.output[0]) == 1
                                  and y in r.input for r in readers):
            continue
        for r in readers:
            r.input[list(r.input).index(ex.output[0])] = ex.input[0]
        done += 1
    if done:
        nodes = drop_dead_nodes(list(graph.node), outputs)
        del graph.node[:]
        graph.node.extend(nodes)
        drop_unused_initializers(proto)
    return done


LP_NORM_MAX_EPS = 1e-6  # F.normalize's eps is 1e-12; a larger floor would change more vectors


def lp_normalize(proto: onnx.ModelProto) -> int:
    """Replace ``Div(x, Clip(ReduceL2(x, axes=[last], keepdims=1), min=eps))`` (``F.normalize``
    over the last axis, once ``drop_shape_expands`` has run) by ONNX's
    ``LpNormalization(x, axis=-1, p=2)``: one pass over ``x`` instead of three, about half the
    time in ONNX Runtime 1.32 on the CPU (NGswin's cosine attention normalises q and k in every
    block: docs/results/grids.md). The values are the same wherever ``‖x‖ ≥ eps`` (bit for bit
    in ONNX Runtime on the development CPU: the same square root of the same sum, then the same
    division). Rows of smaller norm, numerically zero vectors, become 0 instead of ``x / eps``;
    so only an ``eps`` of at most ``LP_NORM_MAX_EPS`` is replaced. Returns how many were."""
    graph = proto.graph
    producer, users, outputs = _wiring(graph)
    consts = _constants(graph)
    shapes = _shapes(proto)
    gone: set[str] = set()
    plans: dict[str, onnx.NodeProto] = {}
    for div in graph.node:
        if div.op_type != "Div":
            continue
        x, c_name = div.input
        clip = producer.get(c_name)
        red = producer.get(clip.input[0]) if clip is not None and clip.op_type == "Clip" else None
        if red is None or red.op_type != "ReduceL2" or red.input[0] != x \
                or _attr(red, "keepdims", 1) != 1:
            continue
        axes = _attr(red, "axes") if len(red.input) < 2 else consts.get(red.input[1])
        rank = len(shapes.get(x) or [])
        bounds = list(clip.input[1:]) + [""] * (3 - len(clip.input))
        eps = consts.get(bounds[0]) if bounds[0] else None
        if axes is None or not rank or [int(a) % rank for a in np.ravel(axes)] != [rank - 1] \
                or eps is None or np.size(eps) != 1 or not 0 <= float(eps) <= LP_NORM_MAX_EPS \
                or bounds[1] or len(users.get(c_name, [])) != 1 \
                or len(users.get(red.output[0], [])) != 1 or {c_name, red.output[0]} & outputs:
            continue
        plans[div.output[0]] = helper.make_node("LpNormalization", [x], [div.output[0]],
                                                name=(div.name or div.output[0]) + "/lp",
                                                axis=-1, p=2)
        gone |= {clip.output[0], red.output[0]}
    if not plans:
        return 0
    nodes = [plans.get(n.output[0], n) for n in graph.node if n.output[0] not in gone]
    del graph.node[:]
    graph.node.extend(drop_dead_nodes(nodes, outputs))
    return len(plans)


def position_tables(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """``model.position_bias_tables()`` as arrays (none for a model without the method)."""
    tables = getattr(model, "position_bias_tables", None)
    return [(t.numpy(), i.numpy()) for t, i in tables()] if tables is not None else []


def tidy(proto: onnx.ModelProto, position_tables: list[tuple[np.ndarray, np.ndarray]] = (),
         int_weights: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = ()) -> int:
    """``share_constants``, ``compress_masks``, ``gather_position_biases`` (with the model's
    ``position_tables``, ``SRModel.position_bias_tables``), ``store_int_weights`` (with
    ``int_weights``) and ``store_fp16``; returns the bytes saved."""
    return (share_constants(proto) + compress_masks(proto)
            + gather_position_biases(proto, list(position_tables))
            + store_int_weights(proto, list(int_weights)) + store_fp16(proto))


LAYOUT_OPS = {"Reshape", "Transpose", "Slice", "Concat", "Squeeze", "Unsqueeze"}  # move, not compute
RESHAPES = {"Reshape", "Squeeze", "Unsqueeze"}
CODE_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}
ELEMENTWISE_CONST = {"Mul", "Div", "Add", "Sub", "MatMul", "Clip"}  # x op constant(s)


def _derived_constants(graph: onnx.GraphProto) -> set[str]:
    """Names of initializers, ``Constant`` outputs, and outputs of nodes that read only those
    (e.g. a Cast of INT4 codes and its scale Mul): values ONNX Runtime folds at load."""
    out = {t.name for t in graph.initializer}
    for n in graph.node:  # nodes are topologically sorted
        if n.op_type == "Constant" or (n.input and all(i == "" or i in out for i in n.input)):
            out.update(n.output)
    return out


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every tensor's shape as ONNX shape inference gives it (None for an unknown dimension).
    ONNX does not know ORT's ``MatMulIntegerToFloat``; it is read as ``MatMulInteger`` (the same
    output shape) for the inference only."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    nodes = []
    for n in p.graph.node:
        if n.op_type == "MatMulIntegerToFloat":
            nodes += [helper.make_node("MatMulInteger", list(n.input[:2]), [n.output[0] + "/i32"]),
                      helper.make_node("Cast", [n.output[0] + "/i32"], [n.output[0]],
                                       to=onnx.TensorProto.FLOAT)]
        else:
            nodes.append(n)
    del p.graph.node[:]
    p.graph.node.extend(nodes)
    del p.graph.value_info[:]
    p = onnx.shape_inference.infer_shapes(p)
    out = {}
    for v in list(p.graph.value_info) + list(p.graph.input) + list(p.graph.output):
        out[v.name] = [d.dim_value if d.HasField("dim_value") else None
                       for d in v.type.tensor_type.shape.dim]
    return out


def _keeps_last_axis(node: onnx.NodeProto, shapes: dict, consts: dict) -> bool:
    """Whether a layout op maps every element's last-axis index to itself (so a per-channel
    multiply or a ``(C, C)`` MatMul on the last axis commutes with it)."""
    shape_in, shape_out = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not shape_in or not shape_out or shape_in[-1] is None or shape_in[-1] != shape_out[-1]:
        return False
    rank = len(shape_out)
    if node.op_type in RESHAPES:
        return True  # row-major: the flat index modulo the (same) last dimension is kept
    if node.op_type == "Transpose":
        perm = _attr(node, "perm")
        return perm is not None and perm[-1] == rank - 1
    if node.op_type == "Concat":
        return _attr(node, "axis") % rank != rank - 1
    if node.op_type == "Slice":
        axes = consts.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        return axes is not None and all(int(a) % rank != rank - 1 for a in np.ravel(axes))
    return False


def _last_axis_operands(node: onnx.NodeProto, shapes: dict, consts: dict,
                        shape: list[int | None] | None) -> bool:
    """Whether an element-wise node's constant operands act on the last axis of a tensor of
    ``shape`` only: scalars, ``(..., 1, C)`` broadcasts, or a ``(C, C)`` MatMul."""
    if node.op_type == "QuantizeLinear":
        return True
    if not shape or shape[-1] is None:
        return False
    width = shape[-1]
    for i in node.input[1:]:
        if not i:
            continue
        dims = list(np.shape(consts[i])) if i in consts else shapes.get(i)
        if dims is None:
            return False
        if node.op_type == "MatMul":
            if dims != [width, width]:
                return False
        elif any(d != 1 for d in dims[:-1]) or (dims and dims[-1] not in (1, width)):
            return False
    return True


def quantize_before_layout(proto: onnx.ModelProto) -> int:
    """Move per-tensor ``QuantizeLinear`` nodes above the pure layout ops that feed them (Reshape,
    Transpose, Slice, Concat: a window partition, a cyclic shift, a heads merge), so those ops
    move 1-byte codes instead of float32. Exact: a per-tensor quantizer is element-wise, and the
    element-wise ops between the layout ops and the quantizer (a Clip, a per-channel smoothing
    Mul, an online rotation's MatMul on the last axis) commute with layout ops that keep the
    last axis, which is checked from the inferred shapes. A layout region feeding several
    quantizers (q, k and v's own input grids) is repeated once per quantizer, in uint8. The
    trace's order is ``x -> layout -> [Mul/MatMul] -> Clip -> Q``; afterwards
    ``x -> [Mul/MatMul] -> Clip -> Q -> layout``. Returns how many regions moved."""
    graph = proto.graph
    producer, users, outputs = _wiring(graph)
    consts = _constants(graph)
    derived = _derived_constants(graph)
    shapes = None
    moved: list[tuple[list[onnx.NodeProto], list[onnx.NodeProto], str, str]] = []
    seen_u: set[str] = set()
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or np.size(consts.get(q.input[1], [0, 0])) != 1:
            continue
        top, t = q, q.input[0]
        while t in producer and producer[t].op_type in ELEMENTWISE_CONST and \
                all(i == "" or i in derived for i in producer[t].input[1:]):
            top = producer[t]
            t = top.input[0]
        u = top.input[0]
        if u in seen_u or u in outputs or producer.get(u) is None or \
                producer[u].op_type not in LAYOUT_OPS:
            continue
        seen_u.add(u)
        # the element-wise nodes reading u, down to the quantizers they all end in
        ew, quants, stack, ok = [], [], [u], True
        while stack and ok:
            for r in users.get(stack.pop(), []):
                if any(r is n for n in ew):
                    continue
                if r.op_type == "QuantizeLinear" and np.size(consts.get(r.input[1], [0, 0])) == 1:
                    ew.append(r)
                    quants.append(r)
                elif r.op_type in ELEMENTWISE_CONST and r.output[0] not in outputs and \
                        all(i == "" or i in derived for i in r.input[1:]):
                    ew.append(r)
                    stack.append(r.output[0])
                else:
                    ok = False
        if not ok:
            continue
        # the layout region above u, up to the tensors something else reads too
        stops: set[str] = set()
        while True:
            region, roots, stack = [], set(), [u]
            while stack:
                t = stack.pop()
                p = producer.get(t)
                data = list(p.input) if p is not None and p.op_type == "Concat" else \
                    list(p.input[:1]) if p is not None else []
                if t in stops or p is None or p.op_type not in LAYOUT_OPS or \
                        any(i and i not in derived for i in p.input if i not in data):
                    roots.add(t)
                elif not any(p is n for n in region):
                    region.append(p)
                    stack.extend(data)
            escaping = {o for p in region for o in p.output if o != u and
                        (o in outputs or any(all(r is not n for n in region)
                                                   for r in users.get(o, [])))}
            if not escaping:
                break
            stops |= escaping
        if not region or len(roots) != 1:
            continue
        root = roots.pop()
        if any(np.size(consts.get(i, [0, 0])) != 1 for n in ew if n.op_type != "QuantizeLinear"
               for i in n.input[1:] if i):  # a per-channel operand: the last axis must stay
            shapes = shapes if shapes is not None else _shapes(proto)
            if not (all(_last_axis_operands(n, shapes, consts, shapes.get(u)) for n in ew)
                    and all(_keeps_last_axis(p, shapes, consts) for p in region)):
                continue
        moved.append((region, ew, root, u))
    if not moved:
        return 0
    position = {id(n): k for k, n in enumerate(graph.node)}
    after: dict[int, list[onnx.NodeProto]] = {}
    gone: set[int] = set()
    retyped: set[str] = set()
    for region, ew, root, u in moved:
        inner = {o for p in region for o in p.output}
        for n in ew:
            n.input[:] = [root if i == u else i for i in n.input]
        for j, q in enumerate(n for n in ew if n.op_type == "QuantizeLinear"):
            codes, q.output[0] = q.output[0], f"{q.output[0]}/before_layout"
            clones = []
            for p in sorted(region, key=lambda n: position[id(n)]):  # the graph's order
                c = onnx.NodeProto()
                c.CopyFrom(p)
                c.name = f"{p.name or p.output[0]}/codes{j}"
                c.input[:] = [q.output[0] if i == root else f"{i}/codes{j}" if i in inner else i
                              for i in c.input]
                c.output[:] = [codes if o == u else f"{o}/codes{j}" for o in c.output]
                clones.append(c)
            after[id(q)] = clones
            retyped |= {codes}
        gone |= {id(p) for p in region}
        retyped |= inner
    nodes = []
    for n in graph.node:
        if id(n) not in gone:
            nodes.append(n)
            nodes.extend(after.get(id(n), []))
    del graph.node[:]
    graph.node.extend(nodes)
    vi = [v for v in graph.value_info if v.name not in retyped]
    del graph.value_info[:]
    graph.value_info.extend(vi)
    return len(moved)


def clip_codes(proto: onnx.ModelProto) -> int:
    """``Clip(x, lo, hi) -> QuantizeLinear(s, z)`` becomes ``QuantizeLinear -> Clip`` on the 1-byte
    codes, or just the quantizer when the codes' range is the container's (an 8-bit grid). Only
    where ``lo`` and ``hi`` are grid points (``lo/s + z`` and ``hi/s + z`` integers ``k_lo, k_hi``
    within 1e-3), as the QDQ export writes them: the quantizer is monotone and maps ``lo`` to
    ``k_lo`` and ``hi`` to ``k_hi``, so clipping before or after it gives the same codes. A
    ``b``-bit grid in a uint8 container (``b < 8``) needs the clip; it then reads and writes 1
    byte per element instead of 4. Returns how many clips moved or went."""
    graph = proto.graph
    producer, users, outputs = _wiring(graph)
    consts = _constants(graph)
    after: dict[int, onnx.NodeProto] = {}
    gone: set[int] = set()
    for q in graph.node:
        clip = producer.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if clip is None or clip.op_type != "Clip" or len(clip.input) != 3 or \
                len(users.get(clip.output[0], [])) != 1 or clip.output[0] in outputs:
            continue
        scale, zero = consts.get(q.input[1]), consts.get(q.input[2]) if len(q.input) > 2 else None
        lo, hi = consts.get(clip.input[1]), consts.get(clip.input[2])
        if any(v is None or np.size(v) != 1 for v in (scale, zero, lo, hi)) or \
                zero.dtype not in CODE_RANGES:
            continue
        ends = [float(v) / float(scale) + int(zero) for v in (lo, hi)]
        k_lo, k_hi = (int(np.round(e)) for e in ends)
        c_lo, c_hi = CODE_RANGES[zero.dtype]
        if any(abs(e - k) > 1e-3 for e, k in zip(ends, (k_lo, k_hi))) or not c_lo <= k_lo < k_hi <= c_hi:
            continue
        q.input[0] = clip.input[0]
        gone.add(id(clip))
        if (k_lo, k_hi) != (c_lo, c_hi):
            codes, q.output[0] = q.output[0], f"{q.output[0]}/unclipped"
            lo_name, hi_name = f"{q.name}/code_lo", f"{q.name}/code_hi"
            graph.initializer.extend([numpy_helper.from_array(np.array(k_lo, zero.dtype), lo_name),
                                      numpy_helper.from_array(np.array(k_hi, zero.dtype), hi_name)])
            after[id(q)] = helper.make_node("Clip", [q.output[0], lo_name, hi_name], [codes],
                                            name=f"{q.name}/ClipCodes")
    if gone:
        nodes = []
        for n in graph.node:
            if id(n) not in gone:
                nodes += [n] + ([after[id(n)]] if id(n) in after else [])
        del graph.node[:]
        graph.node.extend(nodes)
        drop_unused_initializers(proto)
    return len(gone)


ATTENTION_OPSET = 23  # ONNX's fused Attention operator
HEADS_SPLIT = [0, 2, 1, 3]  # (B, N, heads, d) <-> (B, heads, N, d)


def _strip_ones(dims: list[int | None] | None) -> list[int | None] | None:
    """``dims`` without its leading 1s (broadcasting treats them as absent)."""
    if dims is None:
        return None
    k = 0
    while k < len(dims) - 1 and dims[k] == 1:
        k += 1
    return dims[k:]


def _const_values(proto: onnx.ModelProto, names: list[str]) -> list[np.ndarray]:
    """The values of constant-derived tensors ``names`` (``_derived_constants``), computed by
    ONNX's reference runtime on the part of the graph that makes them."""
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    needed, used, stack = set(), set(), list(names)
    while stack:
        t = stack.pop()
        if t in inits:
            used.add(t)
        elif t in producer and id(producer[t]) not in needed:
            needed.add(id(producer[t]))
            stack.extend(i for i in producer[t].input if i)
    nodes = [n for n in graph.node if id(n) in needed]  # in the graph's (topological) order
    sub = helper.make_model(
        helper.make_graph(nodes, "constants", [], [helper.make_value_info(n, onnx.TypeProto())
                                                   for n in names],
                          [inits[t] for t in sorted(used)]),
        opset_imports=list(proto.opset_import))
    return ReferenceEvaluator(sub).run(None, {})


def fuse_attention(proto: onnx.ModelProto, max_bias_bytes: int = 16 << 20) -> int:
    """Replace each attention ``Softmax(q·kᵀ · s + b₁ [+ b₂]) · v`` by ONNX's ``Attention``
    (opset 23; the model's default-domain opset is raised to it). Returns how many were fused.

    - Matched where everything is static: q, k and v of shape ``(B, heads, N, d)``, ``kᵀ`` a
      ``Transpose(perm=[0, 1, 3, 2])`` of k, the bias terms computed from constants only (a
      window attention's relative-position bias ``(1, heads, N, N)``, a shifted window's mask
      ``(windows, 1, N, N)``), the Reshapes on the way adding or removing leading 1s only, and
      the probabilities read by ``p · v`` alone.
    - A scalar logit scale (SwinIR's ``q · d^-½``) becomes the operator's ``scale``; a per-head
      one (NGswin's cosine attention, ``(heads, 1, 1)``) multiplies q.
    - Where q, k and v come from ``Reshape`` + ``Transpose`` of ``(B, N, heads·d)`` tensors and
      the output goes back the same way, the operator takes and gives the 3-D tensors: those
      four Transposes go.
    - A bias that depends on the window (the shifted windows' mask) is not added to every
      head's logits in advance: ONNX Runtime folds constant sums at load, 90 MB per block for
      SwinIR-light at 320×184. Where the sum would exceed ``max_bias_bytes``, every window is
      computed with the window-independent bias, and the windows whose mask is not all zero (the
      last row and column of windows: 62 of 920) are computed again with their mask (a
      ``Gather`` of q, k, v, a second ``Attention``, a ``ScatterND`` into the output).

    ONNX Runtime's CPU kernel (1.32) computes each (window, head) slice's product, bias,
    softmax and ``· v`` while it is in cache; the unfused graph writes and reads the
    ``(B, heads, N, N)`` logits four times. The result is the same but for rounding: the scale
    and the bias terms are applied in another order.
    """
    if not any(n.op_type == "Softmax" for n in proto.graph.node):
        return 0
    original, proto = proto, onnx.ModelProto()
    proto.CopyFrom(original)  # the model is changed only when an attention is fused
    try:
        _raise_opset(proto, ATTENTION_OPSET)  # first: the new nodes are written for opset 23
    except Exception as e:  # the fusion is a speed-up: without opset 23 the graph stays as it is
        log.warning("attention not fused: ONNX's version converter cannot take this graph to "
                    "opset %d (%s)", ATTENTION_OPSET, str(e).splitlines()[0][:200] if str(e) else e)
        return 0
    graph = proto.graph
    producer, users, outputs = _wiring(graph)
    shapes = _shapes(proto)
    const = _derived_constants(graph)
    consts = _constants(graph)
    plans: dict[str, list[onnx.NodeProto]] = {}  # new nodes, placed where the named node was
    drop: set[str] = set()  # nodes that go, by their first output
    shared: dict[tuple, str] = {}  # bias sums and window lists already made
    fused = 0

    def dims(t):
        return shapes.get(t) or (list(np.shape(consts[t])) if t in consts else None)

    def static4(t):
        s = shapes.get(t)
        return s if s and len(s) == 4 and all(isinstance(d, int) and d > 0 for d in s) else None

    def single(t):
        return t not in outputs and len(users.get(t, [])) == 1

    def heads_first(x, s4, tag):
        """``x`` (B, heads, N, d) as ``Transpose(Reshape(x3))`` of x3 (B, N, heads·d), or as the
        L2 normalisation over d of such a Transpose (NGswin's cosine attention). Returns
        ``(y, x3, gone, new)``: y (B, N, heads, d) is x without the Transpose (new nodes
        ``new`` recompute the normalisation in that layout), x3 the 3-D tensor when y is just
        the Reshape's output, and ``gone`` the nodes that go. None when x is not of that form."""
        if not single(x):
            return None
        norm, t_name = None, x
        n = producer.get(x)
        if n is not None and n.op_type == "Div":
            t_name, c_name = n.input
            clip = producer.get(c_name)
            red = producer.get(clip.input[0]) if clip is not None and clip.op_type == "Clip" \
                else None
            axes = None
            if red is not None and red.op_type == "ReduceL2":
                axes = _attr(red, "axes") if len(red.input) < 2 else consts.get(red.input[1])
            if axes is None or [int(a) % 4 for a in np.ravel(axes)] != [3] \
                    or _attr(red, "keepdims", 1) != 1 or red.input[0] != t_name \
                    or not single(c_name) or not single(red.output[0]) \
                    or len(users.get(t_name, [])) != 2 or t_name in outputs:
                return None
            norm = n, clip, red
        t = producer.get(t_name)
        if t is None or t.op_type != "Transpose" or list(_attr(t, "perm", [])) != HEADS_SPLIT:
            return None
        r = producer.get(t.input[0])
        if r is None or r.op_type != "Reshape" or not single(t.input[0]) \
                or shapes.get(r.input[0]) != [s4[0], s4[2], s4[1] * s4[3]]:
            return None
        y = r.output[0]
        if norm is None:
            return y, r.input[0], [t], []
        div, clip, red = norm
        new = [helper.make_node("ReduceL2", [y] + list(red.input[1:]), [f"{tag}/norm"],
                                keepdims=1, **({} if len(red.input) > 1 else {"axes": [-1]})),
               helper.make_node("Clip", [f"{tag}/norm"] + list(clip.input[1:]),
                                [f"{tag}/norm_clipped"]),
               helper.make_node("Div", [y, f"{tag}/norm_clipped"], [f"{tag}/normalized"])]
        return new[-1].output[0], None, [t, red, clip, div], new

    def heads_last(y, s4):
        """(y3, [Transpose, Reshape]) where ``y`` (B, heads, N, d) goes back to (B, N, heads·d)."""
        if not single(y) or users[y][0].op_type != "Transpose" \
                or list(_attr(users[y][0], "perm", [])) != HEADS_SPLIT:
            return None
        t = users[y][0]
        if not single(t.output[0]) or users[t.output[0]][0].op_type != "Reshape":
            return None
        r = users[t.output[0]][0]
        if shapes.get(r.output[0]) != [s4[0], s4[2], s4[1] * s4[3]]:
            return None
        return r.output[0], [t, r]

    def bias_sum(terms, tag, new):
        """One tensor of the sum of ``terms`` (rank 4), shared between attentions; the nodes
        that make it are appended to ``new``."""
        key = ("sum", *sorted(terms))
        if key not in shared:
            nodes, total = [], terms[0]
            for j, b in enumerate(terms[1:]):
                nodes.append(helper.make_node("Add", [total, b], [f"{tag}/bias{j}"]))
                total = nodes[-1].output[0]
            full = np.broadcast_shapes(*[tuple(_strip_ones(dims(b))) for b in terms])
            if max(len(dims(b)) for b in terms) != 4:  # the operator wants a rank-4 mask
                shape = f"{tag}/bias_shape"
                nodes += [_constant(shape, np.array([1] * (4 - len(full)) + list(full), np.int64)),
                          helper.make_node("Reshape", [total, shape], [f"{tag}/bias4"])]
                total = nodes[-1].output[0]
            shared[key] = total
            new.extend(nodes)
        return shared[key]

    for sm in list(graph.node):
        if sm.op_type != "Softmax":
            continue
        probs = sm.output[0]
        if not single(probs) or users[probs][0].op_type != "MatMul" \
                or users[probs][0].input[0] != probs:
            continue
        pv = users[probs][0]
        logits = static4(sm.input[0])
        if logits is None or _attr(sm, "axis", -1) % 4 != 3:
            continue
        gone, biases, scale, t, ok = [sm, pv], [], None, sm.input[0], True
        while ok:
            n = producer.get(t)
            if n is None or not single(t):
                ok = False
            elif n.op_type == "MatMul":
                break
            elif n.op_type == "Reshape":
                ok = _strip_ones(shapes.get(n.input[0])) == _strip_ones(logits)
                t = n.input[0]
            elif n.op_type in ("Add", "Mul"):
                a, b = n.input
                if a in const:
                    a, b = b, a
                d = _strip_ones(dims(b))
                if a in const or b not in const or d is None:
                    ok = False
                elif n.op_type == "Add":
                    ok = len(d) <= 4
                    biases.append(b)
                else:  # a logit scale, a scalar or (heads, 1, 1), on q·kᵀ itself
                    ok = (scale is None and len(d) <= 3 and all(x == 1 for x in d[-2:])
                          and (len(d) < 3 or d[0] in (1, logits[1]))
                          and getattr(producer.get(a), "op_type", "") == "MatMul")
                    scale = b
                t = a
            else:
                ok = False
            if ok:
                gone.append(n)
        qk = producer.get(t) if ok else None
        if qk is None or qk.op_type != "MatMul":
            continue
        tr = producer.get(qk.input[1])
        if tr is None or tr.op_type != "Transpose" or list(_attr(tr, "perm", [])) != [0, 1, 3, 2] \
                or not single(qk.input[1]):
            continue
        gone += [qk, tr]
        q, k, v, out = qk.input[0], tr.input[0], pv.input[1], pv.output[0]
        s4 = static4(q)
        if shapes.get(qk.output[0]) != logits or not s4 or static4(k) != s4 or static4(v) != s4:
            continue
        # a scalar scale: SwinIR's q · d^-½ before the product, or a scalar on the logits
        value = None
        mul = producer.get(q)
        if scale is None and mul is not None and mul.op_type == "Mul" and single(q):
            a, b = mul.input
            if a in consts:
                a, b = b, a
            if b in consts and np.size(consts[b]) == 1:
                value, q = float(np.ravel(consts[b])[0]), a
                gone.append(mul)
        elif scale is not None and scale in consts and np.size(consts[scale]) == 1:
            value, scale = float(np.ravel(consts[scale])[0]), None
        new: list[onnx.NodeProto] = []
        tag = out
        # window-dependent bias terms (the shifted windows' mask) and the rest
        windows = logits[0]
        per_window = [b for b in biases if len(_strip_ones(dims(b))) == 4
                      and _strip_ones(dims(b))[0] == windows > 1]
        common = [b for b in biases if b not in per_window]
        full = np.broadcast_shapes(*[tuple(_strip_ones(dims(b))) for b in biases]) if biases else ()
        boundary = None
        if per_window and int(np.prod(full)) * 4 > max_bias_bytes:
            key = ("windows", *sorted(per_window))
            if key not in shared:
                total = sum(_const_values(proto, per_window))
                shared[key] = np.flatnonzero(np.any(total.reshape(windows, -1) != 0, axis=1))
            boundary = shared[key]
            if len(boundary) == windows or \
                    len(boundary) * logits[1] * logits[2] * logits[3] * 4 > max_bias_bytes:
                continue
        # 3-D operands where the heads' Transposes can go
        attrs = dict(scale=1.0 if value is None else value)
        ins = [heads_first(x, s4, f"{tag}/{name}") for x, name in ((q, "q"), (k, "k"), (v, "v"))]
        outl = heads_last(out, s4)
        if all(ins) and outl:
            x3s = []
            for j, (y, x3, gone_j, new_j) in enumerate(ins):
                gone += gone_j
                new += new_j
                if j == 0 and scale is not None:  # (heads, 1, 1) -> (heads, d) in this layout:
                    # a constant ORT folds at load; it multiplies a (.., heads, d) tensor 2.6x
                    # faster than a (heads, 1) one, which it broadcasts element by element
                    new += [_constant(f"{tag}/scale_shape", np.array([-1, 1], np.int64)),
                            helper.make_node("Reshape", [scale, f"{tag}/scale_shape"],
                                             [f"{tag}/scale_h1"]),
                            _constant(f"{tag}/scale_hd", np.array(s4[1::2], np.int64)),
                            helper.make_node("Expand", [f"{tag}/scale_h1", f"{tag}/scale_hd"],
                                             [f"{tag}/scale_nhd"]),
                            helper.make_node("Mul", [y, f"{tag}/scale_nhd"], [f"{tag}/q_scaled"])]
                    y, x3, scale = new[-1].output[0], None, None
                if x3 is None:
                    new += [_constant(f"{tag}/{j}/shape3",
                                      np.array([s4[0], s4[2], s4[1] * s4[3]], np.int64)),
                            helper.make_node("Reshape", [y, f"{tag}/{j}/shape3"],
                                             [f"{tag}/{j}/x3"])]
                    x3 = new[-1].output[0]
                x3s.append(x3)
            (q, k, v), out = x3s, outl[0]
            gone += outl[1]
            attrs.update(q_num_heads=s4[1], kv_num_heads=s4[1])
        if scale is not None:
            new.append(helper.make_node("Mul", [q, scale], [f"{tag}/q_scaled"]))
            q = new[-1].output[0]
        terms = common if boundary is not None else biases
        mask = bias_sum(terms, tag, new) if terms else ""
        if boundary is None:
            new.append(helper.make_node("Attention", [q, k, v] + ([mask] if mask else []),
                                        [out], name=f"{tag}/attention", **attrs))
        else:
            idx = f"{tag}/windows"
            new += [_constant(idx, boundary.astype(np.int64)),
                    _constant(idx + "_nd", boundary.astype(np.int64)[:, None])]
            sub = [helper.make_node("Gather", [x, idx], [f"{tag}/{name}_masked"], axis=0)
                   for x, name in ((q, "q"), (k, "k"), (v, "v"))]
            win = bias_sum(per_window, tag + "/window", new)
            new += sub + [helper.make_node("Gather", [win, idx], [f"{tag}/mask_masked"], axis=0)]
            mask_m = new[-1].output[0]
            if mask:
                new.append(helper.make_node("Add", [mask, mask_m], [f"{tag}/bias_masked"]))
                mask_m = new[-1].output[0]
            new += [helper.make_node("Attention", [q, k, v] + ([mask] if mask else []),
                                     [f"{tag}/all_windows"], name=f"{tag}/attention", **attrs),
                    helper.make_node("Attention", [n.output[0] for n in sub] + [mask_m],
                                     [f"{tag}/masked_windows"], name=f"{tag}/attention_masked",
                                     **attrs),
                    helper.make_node("ScatterND", [f"{tag}/all_windows", idx + "_nd",
                                                   f"{tag}/masked_windows"], [out])]
        plans[_last(gone, graph)] = new  # where every input of the new nodes exists
        drop.update(n.output[0] for n in gone)
        fused += 1
    if not fused:
        return 0
    nodes = []
    for n in proto.graph.node:
        if n.output[0] in plans:
            nodes.extend(plans[n.output[0]])
        if n.output[0] not in drop:
            nodes.append(n)
    del proto.graph.node[:]
    proto.graph.node.extend(drop_dead_nodes(nodes, outputs))  # Reshapes the 3-D form bypasses
    original.CopyFrom(proto)
    return fused


def _last(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> str:
    """The first output of whichever of ``nodes`` comes last in ``graph``."""
    names = {n.output[0] for n in nodes}
    return [n.output[0] for n in graph.node if n.output[0] in names][-1]


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))


def model_opset(proto: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset; 0 when it imports none."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _raise_opset(proto: onnx.ModelProto, opset: int) -> None:
    """Raise the default-domain opset to at least ``opset`` with ONNX's version converter (in
    place; the other domains are kept)."""
    if model_opset(proto) < opset:
        from onnx import version_converter

        # the converter drops the nodes' metadata (export --keep-names' edge_sr.* records)
        meta = {n.output[0]: list(n.metadata_props) for n in proto.graph.node if n.metadata_props}
        proto.CopyFrom(version_converter.convert_version(proto, opset))
        for n in proto.graph.node:
            if n.output and n.output[0] in meta:
                n.metadata_props.extend(meta[n.output[0]])
