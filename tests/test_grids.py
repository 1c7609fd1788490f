"""Deployable grids (issue 18): 0 on every grid, searched and learned under the constraint, and
exported as plain Q/DQ (ORT: fused integer linears) that stays exact to the fake-quant model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from calibrate.dobi import (
    candidate_bounds,
    candidate_errors,
    constrain_candidates,
    init_bounds,
    search_bounds_multi,
)
from calibrate.export.ortcheck import fused_op_types, integer_coverage, make_session
from calibrate.export_qdq import ExportConfig, build_qdq
from calibrate.prepare import QuantRecipe, prepare, quantizer_grid, quantizers
from calibrate.quantizer import BoundFakeQuantizer, grid_bounds

TILE = (16, 16)


def _zero_level(lo: float, up: float, bits: int) -> float:
    """-l/s: an integer exactly when 0 is a grid level."""
    return -lo / ((up - lo) / (2**bits - 1))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_integer_grid_holds_zero_and_is_idempotent(bits):
    lo, up = grid_bounds(torch.tensor(-0.37), torch.tensor(1.91), bits, "integer")
    z = _zero_level(float(lo), float(up), bits)
    assert abs(z - round(z)) < 1e-4 and 0 <= round(z) <= 2**bits - 1
    lo2, up2 = grid_bounds(lo, up, bits, "integer")
    assert float(lo2) == pytest.approx(float(lo), abs=1e-6)
    assert float(up2) == pytest.approx(float(up), abs=1e-6)
    # a one-sided tensor (l > 0, e.g. a softmax) gets z = 0: its grid starts at 0
    lo3, _ = grid_bounds(torch.tensor(0.02), torch.tensor(0.9), bits, "integer")
    assert float(lo3) == 0.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_grid_has_signed_codes(bits):
    lo, up = grid_bounds(torch.tensor(-0.5), torch.tensor(0.7), bits, "symmetric")
    s = (float(up) - float(lo)) / (2**bits - 1)
    assert float(lo) == pytest.approx(-(2 ** (bits - 1)) * s)
    assert float(up) == pytest.approx((2 ** (bits - 1) - 1) * s)


def test_constrained_grids_pass_gradients_to_both_bounds():
    q = BoundFakeQuantizer(4)
    q.set_bounds(-0.8, 1.3)
    q.grid = "integer"
    x = torch.randn(4096) * 0.7
    (q(x) - x).pow(2).sum().backward()
    assert q.lower.grad is not None and q.upper.grad is not None
    assert float(q.lower.grad) != 0.0 and float(q.upper.grad) != 0.0


@pytest.mark.parametrize("grid,search", [("integer", "two_sided"), ("integer", "one_sided"),
                                         ("symmetric", "two_sided")])
def test_dobi_searches_under_the_constraint(grid, search):
    """The constrained search returns a grid that satisfies the constraint and fits the data at
    least as well as moving the unconstrained optimum onto the constraint afterwards."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(20000, generator=g) * 0.6 + 0.2) if search == "two_sided" else \
        torch.rand(20000, generator=g) ** 3
    bits = 4
    lo, up = search_bounds_multi(x, [bits], search, grid=grid)[bits]
    clo, cup = (float(v) for v in grid_bounds(torch.tensor(lo, dtype=torch.float64),
                                              torch.tensor(up, dtype=torch.float64), bits, grid))
    assert (clo, cup) == pytest.approx((lo, up), abs=1e-9)  # a fixed point: what will run
    z = _zero_level(lo, up, bits)
    assert abs(z - round(z)) < 1e-6
    rlo, rup = search_bounds_multi(x, [bits], search)[bits]
    after = constrain_candidates(torch.tensor([rlo], dtype=torch.float64),
                                 torch.tensor([rup], dtype=torch.float64), bits, grid)
    err = candidate_errors(x, torch.tensor([lo], dtype=torch.float64),
                           torch.tensor([up], dtype=torch.float64), bits)
    err_after = candidate_errors(x, *after, bits)
    assert float(err) <= float(err_after) * (1 + 1e-9)
    cands = candidate_bounds(float(x.min()), float(x.max()), search)
    assert len(cands[0]) == 100


def test_prepare_assigns_each_quantizer_its_kind(tiny_swinir):
    st = prepare(tiny_swinir(2), QuantRecipe(bits=8, grid="trt"))
    kinds = Counter((".weight_quantizers." in n, q.grid) for n, q in quantizers(st))
    assert set(kinds) == {(True, "symmetric"), (False, "symmetric")}  # trt 8-bit: zp 0 acts
    assert quantizer_grid("trt", False, 4) == "integer"
    assert quantizer_grid("ort", False, 8) == "integer"
    assert quantizer_grid("real", True, 4) == "real"


@pytest.mark.parametrize("grid,target,bits", [("ort", "ort", 4), ("ort", "ort", 8),
                                              ("trt", "trt", 4), ("trt", "trt", 8)])
def test_deployable_grid_exports_plain_qdq_and_stays_exact(tiny_swinir, grid, target, bits):
    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(1))
    st = prepare(tiny, QuantRecipe(bits=bits, grid=grid))
    init_bounds(st, calib)
    proto, records = build_qdq(st, ExportConfig(target=target, tile=TILE))
    ops = Counter(n.op_type for n in proto.graph.node)
    # no correction terms: no shift Sub, no rank-1 ReduceSum, no AddShift (the FP graph's own
    # nodes are named "/...", the export's after their site)
    ours = [n for n in proto.graph.node if not n.name.startswith("/")]
    assert not [n.name for n in ours if n.op_type in ("Sub", "ReduceSum", "Mul")
                or n.name.endswith("/AddShift")]
    assert all(r["act"]["shift"] == 0.0 for r in records if r["kind"] == "linear")
    assert all(not any(np.atleast_1d(r.get("weight_shift", 0.0)))
               for r in records if r["kind"] == "linear")
    if target == "ort":
        assert ops["MatMulIntegerToFloat"] == 2 * 6  # every linear (q, k, v, proj, fc1, fc2)
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, fp = st(x).numpy(), tiny(x).numpy()
    # ORT 1.32's extended optimizations fail on int8-activation Q/DQ before MatMul + bias
    # (a Gemm rewrite gives a Q whose zero point is uint8): the trt graph is checked unfused
    level = "basic" if target == "trt" else "all"
    out = make_session(proto, threads=1, level=level).run(None, {"lr": x.numpy()})[0]
    assert np.abs(out - ref).max() < 1e-4  # float noise only
    assert np.abs(ref - fp).max() > (1e-3 if bits < 8 else 1e-4)  # the quantizers act


def test_ort_grid_runs_every_product_as_an_integer_kernel(tiny_swinir):
    """Linears (written fused) and the attention products (fused by ORT): no float MatMul."""
    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(1))
    st = prepare(tiny, QuantRecipe(bits=8, grid="ort"))
    init_bounds(st, calib)
    proto, _ = build_qdq(st, ExportConfig(target="ort", tile=TILE))
    cov = integer_coverage(fused_op_types(proto))
    assert cov["float_total"] == 0 and cov["integer_total"] == 2 * (6 + 2)


def test_ort_grid_with_rotation_and_channel_weights_stays_exact(tiny_swinir):
    """edge-sr's options on the ort grid: a rotated input, per-channel symmetric weights."""
    from calibrate.gptq import apply_gptq

    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(1))
    st = prepare(tiny, QuantRecipe(bits=4, grid="ort", rotate=("fc1",), weight_grid="channel"))
    init_bounds(st, calib)
    apply_gptq(st, calib)
    for n, q in quantizers(st):
        qp = q.qparams()
        z = np.asarray(qp.zero_point, dtype=np.float64)
        assert np.allclose(z, np.round(z), atol=1e-3), n  # 0 on every grid, after GPTQ too
    proto, _ = build_qdq(st, ExportConfig(target="ort", tile=TILE))
    assert {"MatMulIntegerToFloat"} <= {n.op_type for n in proto.graph.node}
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = st(x).numpy()
    out = make_session(proto, threads=1).run(None, {"lr": x.numpy()})[0]
    assert np.abs(out - ref).max() < 1e-4


def test_constant_tensor_keeps_the_reference_range_on_the_real_grid():
    x = torch.full((10,), 0.5)
    assert search_bounds_multi(x, [4], "two_sided")[4] == pytest.approx((0.5, 0.500001))
    lo, up = search_bounds_multi(x, [4], "two_sided", grid="integer")[4]
    assert lo == 0.0 and up == pytest.approx(0.500001)  # 0 on the grid


def test_dynamic_qdq_export_runs_any_size_exactly(tiny_swinir, one_thread):
    """--dynamic: one ort-grid graph (rotation, smoothing, per-channel weights) for any size."""
    from edge_sr.errors import EdgeSRError

    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(1))
    st = prepare(tiny, QuantRecipe(bits=4, grid="ort", rotate=("fc1",), weight_grid="channel"))
    init_bounds(st, calib)
    proto, _ = build_qdq(st, ExportConfig(target="ort", tile=TILE, dynamic=True))
    sess = make_session(proto, threads=1)
    assert sess.get_inputs()[0].shape[2:] == ["h", "w"]
    for hw in [TILE, (24, 40), (13, 21)]:
        x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
        with torch.no_grad():
            ref = st(x).numpy()
        out = sess.run(None, {"lr": x.numpy()})[0]
        assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4, hw
    # the real grid's exact attention corrections need a static head size
    real = prepare(tiny, QuantRecipe(bits=4))
    init_bounds(real, calib)
    with pytest.raises(EdgeSRError, match="export this grid at a fixed shape"):
        build_qdq(real, ExportConfig(target="ort", tile=TILE, dynamic=True))
    st.dynamic_export = False
    with pytest.raises(EdgeSRError, match="--dynamic: swinir-light has no dynamic-shape export"):
        build_qdq(st, ExportConfig(target="ort", tile=TILE, dynamic=True))


def test_signed_weight_codes_only_where_ort_u8s8_cannot_saturate():
    """2 (2^a - 1) 2^(w-1) <= 32767: the int16 pair sum of x86's u8 x s8 kernel without VNNI."""
    from calibrate.export.grid import fused_weight_container, u8s8_is_exact

    assert u8s8_is_exact(8, 4) and u8s8_is_exact(8, 7) and u8s8_is_exact(7, 8)  # 32,512
    assert not u8s8_is_exact(8, 8)  # 2 x 255 x 128 = 65,280
    assert fused_weight_container("ort", 4, 4) == "int8"
    assert fused_weight_container("ort", 8, 8) == "uint8"
    assert fused_weight_container("trt", 8, 8) == "int8"  # TensorRT: int8 weights always


@pytest.mark.parametrize("bits,dtype", [(4, "int8"), (8, "uint8")])
def test_ort_fused_linears_take_int8_codes_where_exact_and_stay_exact_at_the_extremes(bits, dtype):
    """The worst case of the rule, in ORT itself: every activation code 255 against the most
    negative weight code (-8 at W4) gives the exact integer product (no int16 saturation)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from calibrate.export.emit import EmitOptions, _emit_fused, _Graph, _LinearGroup
    from calibrate.export.grid import ActEncoding

    k_in, n_out = 64, 8
    lo = -(2 ** (bits - 1))
    codes = np.full((k_in, n_out), lo, np.int64)
    codes[:, 1] = 2 ** (bits - 1) - 1
    enc = ActEncoding(bits=8, lower=0.0, upper=255.0, scale=1.0, shift=0.0, container="uint8",
                      zero_point=0, clip_lo=0.0, clip_hi=255.0, qmin=0, qmax=255)
    g = _Graph()
    g.const("a/scale", 1.0)
    g.int_tensor("a/zero_point", np.asarray(0), "uint8")
    c = _LinearGroup(site="s", j=0, act="a", act_sum=None, act_prefix="a/", enc=enc, codes=codes,
                     scales=np.ones(n_out, np.float32), shifts=np.zeros(n_out, np.float32),
                     bias=np.zeros(n_out, np.float32), bits=bits, per_col=False,
                     offsets=np.full(n_out, 2 ** (bits - 1)), out="y", meta={})
    container = _emit_fused(g, c, EmitOptions(target="ort", weight_container="auto"))
    assert container == dtype
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("a", TensorProto.UINT8,
                                                                          [4, k_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n_out])],
                              g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    w = {t.name: t for t in g.inits}
    stored = [t for n, t in w.items() if n.startswith("s/W0") and len(t.dims) == 2][0]
    assert stored.data_type == (TensorProto.INT4 if bits == 4 else TensorProto.UINT8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.full((4, k_in), 255, np.uint8)
    out = sess.run(None, {"a": a})[0]
    assert np.array_equal(out, (a.astype(np.int64) @ codes).astype(np.float32))
    assert numpy_helper.to_array(w["s/W0_zero_point_c"]).dtype == np.dtype(dtype)


@pytest.mark.parametrize("target,bits", [("ort", 4), ("trt", 8)])
def test_qkv_groups_feed_their_heads_directly_and_nothing_changes(tiny_swinir, monkeypatch,
                                                                  target, bits):
    """Three qkv input quantizers: no Concat -> Reshape -> Transpose -> Split left, and the
    outputs are bit for bit those of the graph that keeps it."""
    import calibrate.export_qdq as eq

    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(1))
    st = prepare(tiny, QuantRecipe(bits=bits, grid=target))
    init_bounds(st, calib)
    split, _ = build_qdq(st, ExportConfig(target=target, tile=TILE))
    with monkeypatch.context() as m:
        m.setattr(eq, "split_qkv", lambda proto, **kw: 0)
        joined, _ = build_qdq(st, ExportConfig(target=target, tile=TILE))
    concats = [n.name for n in joined.graph.node if n.name.endswith("qkv/Concat")]
    assert len(concats) == 2  # one per block's qkv
    assert not [n.name for n in split.graph.node if n.name.endswith("qkv/Concat")]
    # (on ort, those feeding an attention product's quantizer now move its uint8 codes:
    # quantize_before_layout renames them ".../Transpose/codes0")
    assert sum(n.op_type == "Transpose" and "/head" in n.name for n in split.graph.node) == 6
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(2)).numpy()
    level = "basic" if target == "trt" else "all"
    a = make_session(split, threads=1, level=level).run(None, {"lr": x})[0]
    b = make_session(joined, threads=1, level=level).run(None, {"lr": x})[0]
    assert np.array_equal(a, b)
    with torch.no_grad():
        assert np.abs(a - st(torch.from_numpy(x)).numpy()).max() < 1e-4
