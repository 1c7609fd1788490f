"""Quantizers before the layout ops, clips on the codes (``edge_sr.onnx_tidy``): the ORT engine's
window partition, shift and heads merge move uint8 codes, with bit for bit the same outputs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edge_sr.onnx_tidy import clip_codes, quantize_before_layout

C = 8
SCALE, ZERO = 0.05, 7  # a 4-bit grid in a uint8 container: codes 0..15, zero point 7
LO, HI = -ZERO * SCALE, (15 - ZERO) * SCALE


def _graph(perm=(0, 2, 1, 3), channel_mul=True, two_quantizers=True) -> onnx.ModelProto:
    """x (2, 4, 4, C) -> cyclic shift (Slice, Slice, Concat) -> Transpose(perm) -> Reshape ->
    Mul (per channel or scalar) -> Clip -> QuantizeLinear -> DequantizeLinear, once or twice."""
    inits = [numpy_helper.from_array(np.asarray(v, dt), n) for n, v, dt in [
        ("s0", [1], np.int64), ("s1", [4], np.int64), ("s2", [0], np.int64), ("ax", [1], np.int64),
        ("shape", [2, 16, -1], np.int64), ("scale", SCALE, np.float32), ("zp", ZERO, np.uint8),
        ("lo", LO, np.float32), ("hi", HI, np.float32)]]
    mul = np.linspace(0.5, 2.0, C).astype(np.float32) if channel_mul else np.float32(1.5)
    inits.append(numpy_helper.from_array(mul, "m"))
    nodes = [helper.make_node("Slice", ["x", "s0", "s1", "ax"], ["a"]),
             helper.make_node("Slice", ["x", "s2", "s0", "ax"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["rolled"], axis=1),
             helper.make_node("Transpose", ["rolled"], ["t"], perm=list(perm)),
             helper.make_node("Reshape", ["t", "shape"], ["u"]),
             helper.make_node("Mul", ["u", "m"], ["v"])]
    outs = []
    for j in range(2 if two_quantizers else 1):
        nodes += [helper.make_node("Clip", ["v", "lo", "hi"], [f"c{j}"], name=f"P{j}/Clip"),
                  helper.make_node("QuantizeLinear", [f"c{j}", "scale", "zp"], [f"q{j}"],
                                   name=f"P{j}/QuantizeLinear"),
                  helper.make_node("DequantizeLinear", [f"q{j}", "scale", "zp"], [f"y{j}"])]
        outs.append(helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT, [2, 16, C]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [2, 4, 4, C])], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _inputs() -> np.ndarray:
    # well beyond [LO, HI] both ways, and exact grid midpoints (ties) inside it
    x = np.random.default_rng(0).normal(0, 0.6, (2, 4, 4, C)).astype(np.float32)
    x[0, 0, 0, :] = (np.arange(C) - 3.5).astype(np.float32) * SCALE
    return x


def test_layout_moves_after_the_quantizers_and_the_clips_onto_the_codes():
    before = _graph()
    after = onnx.ModelProto()
    after.CopyFrom(before)
    assert quantize_before_layout(after) == 1
    assert clip_codes(after) == 2
    onnx.checker.check_model(after, full_check=True)
    producer = {o: n for n in after.graph.node for o in n.output}
    ops = Counter(n.op_type for n in after.graph.node)
    # one copy of the shift / partition per quantizer, each fed by its codes
    assert ops["Transpose"] == 2 and ops["Concat"] == 2 and ops["Slice"] == 4
    for t in (n for n in after.graph.node if n.op_type == "Transpose"):
        chain = producer[t.input[0]]
        while chain.op_type in ("Slice", "Concat"):
            chain = producer[chain.input[0]]
        assert chain.op_type == "Clip" and producer[chain.input[0]].op_type == "QuantizeLinear"
    # the Mul and the quantizers read the unshifted x; the Clips read codes (uint8 bounds)
    assert next(n for n in after.graph.node if n.op_type == "Mul").input[0] == "x"
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    for clip in (n for n in after.graph.node if n.op_type == "Clip"):
        assert [inits[i].dtype for i in clip.input[1:]] == [np.uint8, np.uint8]
        assert [int(inits[i]) for i in clip.input[1:]] == [0, 15]
    x = _inputs()
    ref, out = _run(before, x), _run(after, x)
    assert all(np.array_equal(a, b) for a, b in zip(ref, out))
    assert ref[0].min() == pytest.approx(LO) and ref[0].max() == pytest.approx(HI)  # clipped


def test_a_per_channel_multiply_stays_behind_a_transpose_of_the_last_axis():
    moved = _graph(perm=(0, 1, 3, 2))  # channels leave the last axis: the Mul cannot move
    assert quantize_before_layout(moved) == 0
    scalar = _graph(perm=(0, 1, 3, 2), channel_mul=False)  # a scalar multiply can
    before = onnx.ModelProto()
    before.CopyFrom(scalar)
    assert quantize_before_layout(scalar) == 1
    x = _inputs()
    assert all(np.array_equal(a, b) for a, b in zip(_run(before, x), _run(scalar, x)))


def test_full_range_clip_is_dropped_at_8_bits():
    proto = _graph(two_quantizers=False)
    for t in proto.graph.initializer:  # an 8-bit grid: lo, hi are the container's ends
        if t.name in ("lo", "hi"):
            v = -ZERO * SCALE if t.name == "lo" else (255 - ZERO) * SCALE
            t.CopyFrom(numpy_helper.from_array(np.float32(v), t.name))
    before = onnx.ModelProto()
    before.CopyFrom(proto)
    assert clip_codes(proto) == 1
    assert "Clip" not in {n.op_type for n in proto.graph.node}
    x = _inputs() * 20
    assert np.array_equal(_run(before, x)[0], _run(proto, x)[0])


def test_ort_export_partitions_windows_in_uint8(tiny_swinir):
    """The tiny SwinIR's ORT engine: each block's window partition (and the shifted block's
    roll) reads the qkv quantizers' codes, no float Clip is left, and it stays exact."""
    from calibrate.dobi import init_bounds
    from calibrate.export.ortcheck import make_session
    from calibrate.export_qdq import ExportConfig, build_qdq
    from calibrate.prepare import QuantRecipe, prepare

    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    st = prepare(tiny, QuantRecipe(bits=4, grid="ort"))
    init_bounds(st, calib)
    proto, _ = build_qdq(st, ExportConfig(target="ort", tile=(16, 16)))
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t.data_type for t in graph.initializer}
    clips = [n for n in graph.node if n.op_type == "Clip"]
    assert clips and all(inits[n.input[1]] == TensorProto.UINT8 for n in clips)
    on_codes = [n for n in graph.node if n.op_type in ("Transpose", "Concat")
                and producer.get(n.input[0]) is not None
                and producer[n.input[0]].op_type in ("Clip", "Reshape", "Slice", "Concat")
                and "/codes" in n.name]
    assert len(on_codes) >= 2 * 3  # two blocks x q, k, v (the shifted one's roll as well)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = st(x).numpy()
    out = make_session(proto, threads=1).run(None, {"lr": x.numpy()})[0]
    assert np.abs(out - ref).max() < 1e-4


def test_the_region_stops_where_another_node_reads_the_float_tensor():
    """x -> Transpose -> t -> Reshape -> Clip -> Q, with t also read by an Add: only the Reshape
    moves below the quantizer; the Transpose stays in float32 for both readers."""
    proto = _graph(two_quantizers=False, channel_mul=False)
    g = proto.graph
    g.node.append(helper.make_node("Add", ["t", "t"], ["also"]))
    g.output.append(helper.make_tensor_value_info("also", TensorProto.FLOAT, [2, 4, 4, C]))
    before = onnx.ModelProto()
    before.CopyFrom(proto)
    assert quantize_before_layout(proto) == 1
    producer = {o: n for n in proto.graph.node for o in n.output}
    transpose = next(n for n in proto.graph.node if n.op_type == "Transpose")
    assert producer[transpose.input[0]].op_type == "Concat"  # still on the float shift
    reshape = next(n for n in proto.graph.node if n.op_type == "Reshape")
    assert producer[reshape.input[0]].op_type == "QuantizeLinear"
    x = _inputs()
    assert all(np.array_equal(a, b) for a, b in zip(_run(before, x), _run(proto, x)))
