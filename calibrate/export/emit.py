"""Replace the traced placeholder nodes with exact Q/DQ subgraphs (see ``grid.py`` for the maths).

Activation site ``P`` (``edge_sr::QAct``)::

    x -> P/Sub (x - m) -> P/Clip -> P/QuantizeLinear -> P/DequantizeLinear -> P/AddShift (+m) -> ...

When the value only flows (through Transpose/Reshape) into a MatMul, ``P/AddShift`` is dropped and
the MatMul gets exact rank-1 corrections, so the MatMul sees the DQ output and ORT can fuse it:
``(a+α)(b+β) = ab + β·rowsum(a) + α·colsum(b) + K·α·β`` (nodes ``<MatMul name>/corr*``).

Quantized linear ``P`` (``edge_sr::QLinear``), for group j (one group, or q/k/v of a fused qkv
whose inputs are quantized separately)::

    P/Rotate: MatMul(x, S^-1 R)                              only for a rotated linear
      (ORT: S^-1 R = Cast(INT4 signs) * per-row scale, folded at load, exact)
    P/Smooth: Mul(x, 1/s)                                    a smoothed linear that is not rotated
    P/act{i}/{Sub,Clip,QuantizeLinear,DequantizeLinear}      the input, as above (shift m_x)
    P/W{j} (int8/int4 initializer) -> P/W{j}/DequantizeLinear (zp 0)
    (ORT's fused linear: P/W{j} int8 codes, or uint8 for W8A8, stored as P/W{j}_4bit ->
    P/W{j}/Cast8bit at <= 4 bits)
    P/MatMul{j}(a, W) + [P/ReduceSum{j}(a)·m_w + (b + m_x·Σ_k ŵ)]   (bias kept out of the MatMul)
    P/Concat (groups > 1; ``edge_sr.onnx_tidy.split_qkv`` then feeds each group to its heads)

Each product is written by one of two handlers, chosen from ``LINEAR_EMITTERS`` by the target's
``TargetRules.fused_linear`` (``grid.TARGETS``): ``_emit_fused`` (ORT, when every grid holds 0:
one ``com.microsoft.MatMulIntegerToFloat`` with its bias) or ``_emit_qdq`` (TensorRT, and the
``real`` grid anywhere: ``DQ(W) -> MatMul -> Add`` plus the rank-1 terms above).
The bias is added as a separate Add of a non-constant tensor so ORT does not fold MatMul+Add into
an FP Gemm (deploy notes §B1). Every Q, DQ and MatMul node carries ``metadata_props``
``edge_sr.site``/``edge_sr.bits``/``edge_sr.kind`` (and ``qmin``/``qmax``) and a JSON doc_string.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibrate.export.grid import (
    TARGETS,
    ActEncoding,
    Target,
    act_encoding,
    fused_weight_container,
    weight_encoding,
)
from calibrate.export.trace import DOMAIN
from calibrate.qmodules import QuantLinear
from calibrate.quantizer import BoundFakeQuantizer
from edge_sr.errors import EdgeSRError
from edge_sr.onnx_tidy import int_initializer

PASS_THROUGH = {"Transpose", "Reshape"}


@dataclass(frozen=True)
class EmitOptions:
    target: Target
    weight_container: str  # "auto" (int4 for <= 4 bits), "int8" or "int4"


def _meta(node: onnx.NodeProto, **kv) -> onnx.NodeProto:
    for k, v in kv.items():
        entry = node.metadata_props.add()
        entry.key, entry.value = f"edge_sr.{k}", str(v)
    node.doc_string = json.dumps(kv, sort_keys=True)
    return node


class _Graph:
    """Collects new nodes and initializers for the rebuilt graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shared: dict[tuple, str] = {}  # content key -> the tensor made for it once

    def const(self, name: str, value, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def int_tensor(self, name: str, codes: np.ndarray, container: str) -> str:
        try:
            self.inits.append(int_initializer(name, codes, container))
        except ValueError as e:  # pragma: no cover - encodings keep codes in range
            raise AssertionError(str(e)) from None
        return name

    def add(self, op: str, inputs: list[str], outputs: list[str], name: str,
            **attrs) -> onnx.NodeProto:
        node = helper.make_node(op, inputs, outputs, name=name, **attrs)
        self.nodes.append(node)
        return node


def _emit_act(g: _Graph, x: str, enc: ActEncoding, prefix: str, site: str, dq_copies: int = 1,
              outputs: list[str] | None = None) -> list[str]:
    """Sub -> Clip -> Q -> DQ; returns the DQ outputs (``x_hat - m``), one per requested copy
    (named ``outputs`` if given). ``dq_copies=0`` stops at the Q and returns its output."""
    cur = x
    if enc.shift != 0.0:
        g.add("Sub", [cur, g.const(f"{prefix}shift", enc.shift)], [f"{prefix}shifted"],
              f"{prefix}Sub")
        cur = f"{prefix}shifted"
    g.add("Clip", [cur, g.const(f"{prefix}clip_lo", enc.clip_lo),
                   g.const(f"{prefix}clip_hi", enc.clip_hi)], [f"{prefix}clipped"], f"{prefix}Clip")
    scale = g.const(f"{prefix}scale", enc.scale)
    zp = g.const(f"{prefix}zero_point", enc.zero_point,
                 np.uint8 if enc.container == "uint8" else np.int8)
    meta = dict(site=site, kind="act", bits=enc.bits, qmin=enc.qmin, qmax=enc.qmax)
    _meta(g.add("QuantizeLinear", [f"{prefix}clipped", scale, zp], [f"{prefix}q"],
                f"{prefix}QuantizeLinear"), **meta)
    if dq_copies == 0:
        return [f"{prefix}q"]
    outs = []
    for c in range(dq_copies):
        sfx = "" if c == 0 else f"_{c}"
        name = outputs[c] if outputs else f"{prefix}dq{sfx}"
        _meta(g.add("DequantizeLinear", [f"{prefix}q", scale, zp], [name],
                    f"{prefix}DequantizeLinear{sfx}"), **meta)
        outs.append(name)
    return outs


@dataclass
class _LinearGroup:
    """One integer product of a quantized linear (one group, or all groups of a shared-input
    qkv), everything its emitter needs: the activation (DQ output, or Q output for the fused op),
    the weight codes ``(K, N)`` and their per-column scale / shift, and the bias (with the
    activation shift already folded in)."""

    site: str
    j: int
    act: str  # the DQ output (or the Q output, for the fused op)
    act_sum: str | None  # a second DQ copy, for the weight-shift rank-1 term
    act_prefix: str  # where the activation's scale / zero point initializers live
    enc: ActEncoding
    codes: np.ndarray  # (K, N) signed codes k - 2^(b-1)
    scales: np.ndarray  # (N,)
    shifts: np.ndarray  # (N,)
    bias: np.ndarray  # (N,) float32
    bits: int
    per_col: bool
    offsets: np.ndarray  # (N,) 2^(b-1) per column: the uint8 form's zero point
    out: str
    meta: dict  # metadata of the product node

    @property
    def w_zero(self) -> bool:
        return not np.any(self.shifts)


def _weight_tensor(g: _Graph, c: _LinearGroup, container: str) -> tuple[str, str, str]:
    """The weight codes as ``container`` ("int8", "int4" or "uint8" with zero point 2^(b-1)),
    with their scale and zero point; returns the three tensor names."""
    p = f"{c.site}/W{c.j}"
    codes = c.codes
    zp_vals = np.zeros(codes.shape[1] if c.per_col else (), np.int64)
    if container == "uint8":  # codes + 2^(b-1) with that zero point: same dequantized values
        codes = codes.astype(np.int64) + c.offsets[None, :]
        zp_vals = c.offsets if c.per_col else np.asarray(c.offsets[0])
    scale = g.const(f"{p}_scale", c.scales if c.per_col else c.scales[0])
    return g.int_tensor(p, codes, container), scale, g.int_tensor(f"{p}_zero_point", zp_vals,
                                                                     container)


def _emit_fused(g: _Graph, c: _LinearGroup, opts: EmitOptions) -> str:
    """ORT: ``com.microsoft.MatMulIntegerToFloat`` (uint8 activation codes x 8-bit weight codes,
    scales, zero points, bias) written directly: a constant bias Add after a DQ'd MatMul would be
    folded into an FP32 Gemm before ORT's QDQ fusion (deploy notes B1). The weight codes are int8
    (zero point 0) where ORT's u8 x s8 kernel is exact on every CPU, else uint8 with zero point
    2^(b-1) (``grid.fused_weight_container``). At <= 4 bits the codes are stored packed (INT4 or
    UINT4) and widened by a Cast that ORT folds at load."""
    p = f"{c.site}/W{c.j}"
    container = fused_weight_container(opts.target, c.enc.bits, c.bits)
    signed = container == "int8"
    codes = c.codes.astype(np.int64) + (0 if signed else c.offsets[None, :])
    if c.bits <= 4 and opts.weight_container == "auto":
        g.int_tensor(f"{p}_4bit", codes, "int4" if signed else "uint4")
        g.add("Cast", [f"{p}_4bit"], [p], f"{p}/Cast8bit",
              to=TensorProto.INT8 if signed else TensorProto.UINT8)
    else:
        g.int_tensor(p, codes, container)
    n = codes.shape[1]
    scale = g.const(f"{p}_scale_c", c.scales if c.per_col else np.full(n, c.scales[0]))
    # one zero point for all columns when they agree (uint8: 2^(b-1) everywhere but in a qkv
    # whose groups differ in bits)
    offsets = np.zeros(1, np.int64) if signed else c.offsets
    offsets = offsets if np.any(offsets != offsets[0]) else np.asarray(offsets[0])
    zp = g.int_tensor(f"{p}_zero_point_c", offsets, container)
    _meta(g.add("MatMulIntegerToFloat",
                [c.act, p, f"{c.act_prefix}scale", scale, f"{c.act_prefix}zero_point", zp,
                 g.const(f"{c.site}/bias{c.j}", c.bias)], [c.out], f"{c.site}/MatMul{c.j}",
                domain="com.microsoft"), **c.meta, weight=p)
    return container


def _emit_qdq(g: _Graph, c: _LinearGroup, opts: EmitOptions) -> str:
    """``DQ(W) -> MatMul -> Add``, which TensorRT fuses (and ORT on the ``real`` grid): the
    weight in the target's container (INT4 at <= 4 bits unless asked otherwise), the bias as a
    plain Add, and for a weight grid with a shift the exact rank-1 term ``rowsum(a) * m_w``."""
    rules = TARGETS[opts.target]
    int4 = opts.weight_container == "int4" or (opts.weight_container == "auto" and c.bits <= 4)
    container = "int4" if int4 else rules.weight_container
    wname, scale, zp = _weight_tensor(g, c, container)
    lo = 0 if container == "uint8" else -(2 ** (c.bits - 1))
    _meta(g.add("DequantizeLinear", [wname, scale, zp], [f"{wname}_dq"],
                f"{wname}/DequantizeLinear", **({"axis": 1} if c.per_col else {})),
          site=c.site, kind="weight", bits=c.bits, qmin=lo, qmax=lo + 2**c.bits - 1,
          container=container)
    mm, site, j = f"{c.site}/MatMul{c.j}", c.site, c.j
    _meta(g.add("MatMul", [c.act, f"{wname}_dq"], [f"{mm}_out"], mm), **c.meta, weight=wname)
    if c.w_zero:  # plain bias (TensorRT fuses it; nothing to correct)
        g.add("Add", [f"{mm}_out", g.const(f"{site}/bias{j}", c.bias)], [c.out], f"{site}/Add{j}")
    else:
        g.add("ReduceSum", [c.act_sum, g.const(f"{site}/axes_last{j}", [-1], np.int64)],
              [f"{site}/rowsum{j}"], f"{site}/ReduceSum{j}", keepdims=1)
        g.add("Mul", [f"{site}/rowsum{j}", g.const(f"{wname}_shift", c.shifts)],
              [f"{site}/wcorr{j}"], f"{site}/MulShift{j}")
        g.add("Add", [f"{site}/wcorr{j}", g.const(f"{site}/bias{j}", c.bias)],
              [f"{site}/corr{j}"], f"{site}/AddBias{j}")
        g.add("Add", [f"{mm}_out", f"{site}/corr{j}"], [c.out], f"{site}/Add{j}")
    return container


# How each target writes a quantized linear whose grids all hold 0 (TargetRules.fused_linear);
# any other linear (the ``real`` grid's shifts, or INT4 containers asked for) is written as Q/DQ
LINEAR_EMITTERS = {True: _emit_fused, False: _emit_qdq}


def _rotation(g: _Graph, name: str, m: np.ndarray, signs: bool) -> str:
    """The (K, K) input transform ``S^-1 R`` as a graph tensor ``name``.

    ``R = diag(±1) H / sqrt(K)`` has one magnitude, and ``S^-1`` scales its rows, so every row of
    ``S^-1 R`` holds one magnitude: with ``signs`` it is stored as INT4 codes ±1 and a float32
    (K, 1) scale, and ``Cast -> Mul`` rebuilds the float32 matrix exactly (±1 × scale), in 1/8 of
    the bytes. The sign matrix depends only on K and the rotation seed, so the sites of one width
    share one INT4 tensor and its Cast; each site keeps its own scale. Both inputs are constants,
    so ORT folds the nodes at load and the rotation's MatMul keeps a constant (prepacked) B; a
    ``DequantizeLinear`` would run on every call. Otherwise (or for a matrix without that form)
    float32.
    """
    mag = np.abs(m)
    if not (signs and m.ndim == 2 and np.all(mag > 0) and np.array_equal(mag, np.repeat(
            mag[:, :1], m.shape[1], axis=1))):
        return g.const(name, m)
    sign = np.sign(m).astype(np.int8)
    key = ("rotation_signs", sign.shape, hashlib.sha1(sign.tobytes()).hexdigest())
    pm1 = g.shared.get(key)
    if pm1 is None:
        base = f"rotation{sign.shape[0]}_{key[2][:8]}"
        g.int_tensor(f"{base}_signs", sign, "int4")
        g.add("Cast", [f"{base}_signs"], [f"{base}_pm1"], f"{base}/Cast", to=TensorProto.FLOAT)
        pm1 = g.shared[key] = f"{base}_pm1"
    g.add("Mul", [pm1, g.const(f"{name}_scale", mag[:, :1])], [name], f"{name}/Mul")
    return name


def _emit_linear(g: _Graph, node: onnx.NodeProto, site: str, lin: QuantLinear,
                 opts: EmitOptions) -> list[dict]:
    """The subgraph of one quantized linear; returns one metadata record per product."""
    x, out = node.input[0], node.output[0]
    if lin.rotation is not None:  # online x S^-1 R (W S R is already folded into the weight)
        rot = _rotation(g, f"{site}/rotation", lin.input_matrix().detach().cpu().float().numpy(),
                        TARGETS[opts.target].sign_rotation)
        g.add("MatMul", [x, rot], [f"{site}/rotated"], f"{site}/Rotate")
        x = f"{site}/rotated"
    elif lin.smooth_inv is not None:  # smoothing alone: one multiply (W S folded)
        inv = g.const(f"{site}/smooth_inv", lin.smooth_inv.detach().cpu().float().numpy())
        g.add("Mul", [x, inv], [f"{site}/smoothed"], f"{site}/Smooth")
        x = f"{site}/smoothed"
    acts = [act_encoding(q, opts.target) for q in lin.act_quantizers]
    wencs = [weight_encoding(q, w) for q, w in zip(lin.weight_quantizers, lin.weight_blocks())]
    # a deployable grid (0 on every grid): no weight-shift term, so no second DQ copy for it
    w_zero = all(not np.any(w.row_shifts()) for w in wencs)
    fused = (TARGETS[opts.target].fused_linear and w_zero and all(e.shift == 0.0 for e in acts)
             and opts.weight_container != "int4")
    emit = LINEAR_EMITTERS[fused]
    copies = 0 if fused else 1 if w_zero else 2
    dqs = [_emit_act(g, x, e, f"{site}/act{i}/", site, dq_copies=copies)
           for i, e in enumerate(acts)]
    biases = [None if b is None else b.detach().double().numpy() for b in lin.bias_blocks()]
    # Shared input: one GEMM over all groups (per-column weight scale); else one per group.
    plan = [(0, list(range(lin.groups)))] if lin.shared_input else [(j, [j]) for j in
                                                                     range(lin.groups)]
    outs, records = [], []
    for j, groups in plan:
        a_idx = j if not lin.shared_input else 0
        enc = acts[a_idx]
        ws = [wencs[k] for k in groups]
        deq = np.concatenate([w.dequant for w in ws], 0).astype(np.float64)  # (N, K)
        bias = np.concatenate([b if b is not None else np.zeros(w.codes.shape[0])
                               for b, w in zip((biases[k] for k in groups), ws)])
        bits = max(w.bits for w in ws)
        yj = out if len(plan) == 1 else f"{site}/out{j}"
        c = _LinearGroup(
            site=site, j=j, act=dqs[a_idx][0], act_sum=(dqs[a_idx] + [None])[1],
            act_prefix=f"{site}/act{a_idx}/", enc=enc,
            codes=np.concatenate([w.codes for w in ws], 0).T,  # (K, N) for MatMul(a, W)
            scales=np.concatenate([w.row_scales() for w in ws]),
            shifts=np.concatenate([w.row_shifts() for w in ws]),
            bias=(bias + enc.shift * deq.sum(1)).astype(np.float32), bits=bits,
            per_col=len(ws) > 1 or any(w.per_channel for w in ws),
            offsets=np.concatenate([np.full(w.codes.shape[0], 2 ** (w.bits - 1)) for w in ws]),
            out=yj, meta=dict(site=site, kind="linear", bits=bits, a_bits=enc.bits, w_bits=bits,
                              group=j, act_q=f"{site}/act{a_idx}/QuantizeLinear"))
        container = emit(g, c, opts)
        outs.append(yj)
        records.append(dict(site=site, kind="linear", matmul=f"{site}/MatMul{j}", group=j,
                            weight=f"{site}/W{j}", weight_container=container, w_bits=bits,
                            a_bits=enc.bits, act=enc.meta(),
                            # per-channel grids: the vectors are the graph's own initializers
                            # (f"{weight}_scale" / ..._shift); the metadata only names the kind
                            weight_per_channel=bool(c.per_col),
                            **({} if c.per_col else dict(weight_scale=float(c.scales[0]),
                                                         weight_shift=float(c.shifts[0]))),
                            in_features=int(c.codes.shape[0]),
                            out_features=int(c.codes.shape[1])))
    if len(plan) > 1:
        g.add("Concat", outs, [out], f"{site}/Concat", axis=-1)
    return records


def replace_sites(proto: onnx.ModelProto, linears: dict[str, QuantLinear],
                  acts: dict[str, BoundFakeQuantizer], opts: EmitOptions
                  ) -> tuple[onnx.ModelProto, list[dict], dict[str, tuple[str, float]]]:
    """Pass 1: every placeholder becomes its exact Q/DQ subgraph (activations with AddShift).

    Returns the model, per-site records and, for each activation site's output tensor, its DQ
    tensor and shift (used by ``fold_matmul_shifts``).
    """
    g = _Graph()
    records: list[dict] = []
    act_outputs: dict[str, tuple[str, float]] = {}
    for node in proto.graph.node:
        if node.domain != DOMAIN:
            g.nodes.append(node)
            continue
        site = helper.get_attribute_value(node.attribute[0]).decode()
        try:
            _emit_site(g, node, site, linears, acts, opts, records, act_outputs)
        except ValueError as e:  # a grid the engine cannot hold (e.g. upper <= lower)
            raise EdgeSRError(f"export: {site}: {e}") from None
    del proto.graph.node[:]
    proto.graph.node.extend(g.nodes)
    proto.graph.initializer.extend(g.inits)
    return proto, records, act_outputs


def _emit_site(g: _Graph, node: onnx.NodeProto, site: str, linears: dict[str, QuantLinear],
               acts: dict[str, BoundFakeQuantizer], opts: EmitOptions, records: list[dict],
               act_outputs: dict[str, tuple[str, float]]) -> None:
    """One placeholder's Q/DQ subgraph (``replace_sites``)."""
    if node.op_type == "QLinear":
        records.extend(_emit_linear(g, node, site, linears[site], opts))
    elif node.op_type == "QAct":
        enc = act_encoding(acts[site], opts.target)
        if enc.shift == 0.0:  # 0 on the grid: the DQ output is the value itself
            _emit_act(g, node.input[0], enc, f"{site}/", site, outputs=[node.output[0]])
        else:
            (dq,) = _emit_act(g, node.input[0], enc, f"{site}/", site)
            g.add("Add", [dq, g.const(f"{site}/shift_back", enc.shift)], [node.output[0]],
                  f"{site}/AddShift")
            act_outputs[node.output[0]] = (dq, enc.shift)
        records.append(dict(site=site, kind="act", q=f"{site}/QuantizeLinear", **enc.meta()))
    else:  # pragma: no cover - trace.py emits only the two kinds
        raise AssertionError(f"unknown placeholder {node.op_type}")


def fold_matmul_shifts(proto: onnx.ModelProto, act_outputs: dict[str, tuple[str, float]]
                       ) -> list[str]:
    """Pass 2: feed MatMuls the DQ outputs directly and add exact rank-1 corrections.

    Needs inferred shapes (K). Returns the names of the MatMuls that were rewritten.
    """
    graph = proto.graph
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def source(t: str) -> tuple[onnx.NodeProto, str, float] | None:
        """Follow single-consumer shape ops back to an activation site's AddShift output."""
        while t not in act_outputs:
            p = producer.get(t)
            if p is None or p.op_type not in PASS_THROUGH or len(consumers.get(t, [])) != 1:
                return None
            t = p.input[0]
        if len(consumers.get(t, [])) != 1:
            return None
        dq, shift = act_outputs[t]
        return consumers[t][0], dq, shift

    extra: dict[str, list[onnx.NodeProto]] = {}
    dead: set[str] = set()
    done = []
    for mm in [n for n in graph.node if n.op_type == "MatMul"]:
        found = [source(t) for t in mm.input[:2]]
        if not any(found):
            continue
        shifts = [0.0, 0.0]
        for k, f in enumerate(found):
            if f is None:
                continue
            head, dq, shifts[k] = f
            old = [i for i, t in enumerate(head.input) if t in act_outputs]
            dead.add(producer[head.input[old[0]]].name)
            head.input[old[0]] = dq
        alpha, beta = shifts
        a, b, c = mm.input[0], mm.input[1], mm.output[0]
        kdim = shapes.get(a, [0])[-1]
        if alpha and beta and not kdim:  # only the K*alpha*beta term needs K
            raise EdgeSRError(f"MatMul {mm.name}: the exact correction needs the static size of "
                              f"{a}'s last axis; export this grid at a fixed shape")
        raw = f"{mm.name}/raw"
        mm.output[0] = raw
        new, terms = [], []
        if beta:
            new += [helper.make_node("ReduceSum", [a, f"{mm.name}/ax_m1"], [f"{mm.name}/rs_a"],
                                     name=f"{mm.name}/corr_ReduceSumA", keepdims=1),
                    helper.make_node("Mul", [f"{mm.name}/rs_a", f"{mm.name}/beta"],
                                     [f"{mm.name}/ta"], name=f"{mm.name}/corr_MulA")]
            terms.append(f"{mm.name}/ta")
        if alpha:
            new += [helper.make_node("ReduceSum", [b, f"{mm.name}/ax_m2"], [f"{mm.name}/rs_b"],
                                     name=f"{mm.name}/corr_ReduceSumB", keepdims=1),
                    helper.make_node("Mul", [f"{mm.name}/rs_b", f"{mm.name}/alpha"],
                                     [f"{mm.name}/tb"], name=f"{mm.name}/corr_MulB")]
            terms.append(f"{mm.name}/tb")
        if alpha and beta:  # K*alpha*beta joins the small row term, not the full product
            new.append(helper.make_node("Add", [f"{mm.name}/ta", f"{mm.name}/kab"],
                                        [f"{mm.name}/ta_k"], name=f"{mm.name}/corr_AddK"))
            terms[0] = f"{mm.name}/ta_k"
        cur = raw
        for i, t in enumerate(terms):
            out = c if i == len(terms) - 1 else f"{mm.name}/acc{i}"
            new.append(helper.make_node("Add", [cur, t], [out], name=f"{mm.name}/corr_Add{i}"))
            cur = out
        graph.initializer.extend([
            numpy_helper.from_array(np.array([-1], np.int64), f"{mm.name}/ax_m1"),
            numpy_helper.from_array(np.array([-2], np.int64), f"{mm.name}/ax_m2"),
            numpy_helper.from_array(np.array(beta, np.float32), f"{mm.name}/beta"),
            numpy_helper.from_array(np.array(alpha, np.float32), f"{mm.name}/alpha"),
            numpy_helper.from_array(np.array(kdim * alpha * beta, np.float32), f"{mm.name}/kab"),
        ])
        extra[mm.name] = new
        done.append(mm.name)
    nodes = []
    for n in graph.node:
        if n.name in dead:
            continue
        nodes.append(n)
        nodes += extra.get(n.name, [])
    del graph.node[:]
    graph.node.extend(nodes)
    return done
