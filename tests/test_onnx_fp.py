"""Fixed-shape FP ONNX export: ONNX Runtime reproduces PyTorch within 1e-4 max abs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge_sr.errors import EdgeSRError
from edge_sr.onnx_export import export_fp_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


def _ort_run(path, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["sr"], {"lr": x.numpy()})[0]


@pytest.mark.parametrize("tile", [(16, 24), (13, 20)])  # the second is padded inside the graph
def test_tiny_model_matches_pytorch(tiny_swinir, tmp_path, tile):
    model = tiny_swinir(3, seed=7)
    path = export_fp_onnx(model, tmp_path / "m.onnx", tile=tile, batch=2)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["lr"] and [o.name for o in graph.output] == ["sr"]
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, *tile]
    # Shifted-window masks are constants: no mask-building scatter in the graph.
    assert not {"ScatterND", "Loop"} & {n.op_type for n in graph.node}
    x = torch.rand(2, 3, *tile)
    with torch.no_grad():
        want = model(x).numpy()
    got = _ort_run(path, x)
    assert got.shape == (2, 3, tile[0] * 3, tile[1] * 3)
    assert np.abs(got - want).max() < 1e-4
    assert not model.training


def test_qkv_is_three_products_feeding_their_heads_bit_for_bit(tiny_swinir, tmp_path,
                                                               monkeypatch):
    """``split_qkv``: one MatMul per q, k and v, no Split or Gather of the qkv tensor, and the
    outputs of the graph torch traced in ONNX Runtime."""
    import edge_sr.onnx_tidy as tidy_mod

    model = tiny_swinir(2, depths=(2, 2), num_heads=(2, 2), seed=3)
    split = export_fp_onnx(model, tmp_path / "split.onnx", tile=(16, 16))
    monkeypatch.setattr(tidy_mod, "split_qkv", lambda proto: 0)
    traced = export_fp_onnx(model, tmp_path / "traced.onnx", tile=(16, 16))
    ops = [n.op_type for n in onnx.load(str(split)).graph.node]
    before = [n.op_type for n in onnx.load(str(traced)).graph.node]
    assert ops.count("MatMul") == before.count("MatMul") + 2 * 4  # 4 blocks: 1 qkv GEMM -> 3
    assert before.count("Gather") >= 3 * 4 and ops.count("Gather") == before.count("Gather") - 12
    x = torch.rand(1, 3, 16, 16)
    # the same dot products (bit for bit on the development CPU; another CPU's GEMM kernel may
    # block three narrow products differently from one wide one)
    assert np.abs(_ort_run(split, x) - _ort_run(traced, x)).max() <= 1e-6


def test_shape_expands_before_a_broadcasting_op_are_dropped_exactly():
    """``Div(x, Expand(n, Shape(x)))`` (F.normalize's export) becomes ``Div(x, n)``; an Expand
    whose reader's other operand is another tensor stays (its shape could differ)."""
    from onnx import TensorProto, helper

    from edge_sr.onnx_tidy import drop_shape_expands

    f = TensorProto.FLOAT
    nodes = [helper.make_node("ReduceL2", ["x"], ["n"], keepdims=1, axes=[-1]),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Expand", ["n", "s"], ["ne"]),
             helper.make_node("Div", ["x", "ne"], ["y"]),
             helper.make_node("Expand", ["n", "s"], ["ne2"]),
             helper.make_node("Mul", ["z", "ne2"], ["w"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [2, 3, 4]),
                                           helper.make_tensor_value_info("z", f, [1, 3, 1])],
                              [helper.make_tensor_value_info("y", f, None),
                               helper.make_tensor_value_info("w", f, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    assert drop_shape_expands(model) == 1
    assert [n.op_type for n in model.graph.node].count("Expand") == 1
    x = np.random.default_rng(0).random((2, 3, 4), dtype=np.float32) + 0.1
    z = np.random.default_rng(1).random((1, 3, 1), dtype=np.float32)
    run = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"x": x, "z": z})
           for m in (before, model.SerializeToString())]
    assert all(np.array_equal(a, b) for a, b in zip(*run))


def test_l2_normalisations_become_lp_normalization_bit_for_bit():
    """``Div(x, Clip(ReduceL2(x, last axis), eps))`` (F.normalize's export, Expand dropped) becomes
    one ``LpNormalization``, with the same values in ONNX Runtime; a floor above
    ``LP_NORM_MAX_EPS``, another axis or a Clip with a maximum stays as it is."""
    from onnx import TensorProto, helper, numpy_helper

    from edge_sr.onnx_tidy import LP_NORM_MAX_EPS, lp_normalize

    f = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.array([1], np.int64), "mid"),
             numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
             numpy_helper.from_array(np.array(10 * LP_NORM_MAX_EPS, np.float32), "big"),
             numpy_helper.from_array(np.array(5.0, np.float32), "top")]
    nodes = []
    for out, axes, lo, hi in (("y", "last", "eps", ""), ("y_big", "last", "big", ""),
                              ("y_mid", "mid", "eps", ""), ("y_top", "last", "eps", "top")):
        nodes += [helper.make_node("ReduceL2", ["x", axes], [out + "_n"], keepdims=1),
                  helper.make_node("Clip", [out + "_n", lo] + ([hi] if hi else []), [out + "_c"]),
                  helper.make_node("Div", ["x", out + "_c"], [out])]
    outs = ["y", "y_big", "y_mid", "y_top"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [64, 6, 10])],
                              [helper.make_tensor_value_info(o, f, None) for o in outs], inits)
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    before = model.SerializeToString()
    assert lp_normalize(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LpNormalization") == 1 and ops.count("ReduceL2") == 3
    x = np.random.default_rng(0).standard_normal((64, 6, 10)).astype(np.float32)
    x[0, 0] = 0  # a zero row: 0 both ways
    run = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"x": x})
           for m in (before, model.SerializeToString())]
    assert all(np.array_equal(a, b) for a, b in zip(*run))
    assert not run[1][0][0, 0].any()


def test_export_leaves_no_partial_file(tiny_swinir, tmp_path):
    with pytest.raises(EdgeSRError, match="opset 13"):
        export_fp_onnx(tiny_swinir(2), tmp_path / "m.onnx", tile=(16, 16), opset=13)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_reference_x2_checkpoint_matches_pytorch(data_root, tmp_path):
    from edge_sr.checkpoints import load_model

    model = load_model("swinir-light-x2-ref").model
    path = export_fp_onnx(model, tmp_path / "x2.onnx", tile=(32, 32))
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x).numpy()
    diff = np.abs(_ort_run(path, x) - want).max()
    assert diff < 1e-4, diff


def test_masks_are_stored_as_labels_and_rebuilt_exactly():
    """The shifted-window mask (15 MB per block for a 320x180 frame) is stored as its tokens'
    region labels and rebuilt in the graph bit-exactly; anything else is left alone."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from edge_sr.models.windows import shift_attention_mask
    from edge_sr.onnx_tidy import _region_labels, compress_masks

    mask = shift_attention_mask(32, 48, 8, 4).numpy()[None, :, None]  # (1, nW, 1, 64, 64)
    assert _region_labels(np.random.default_rng(0).random((4, 8, 8))) is None
    graph = helper.make_graph(
        [helper.make_node("Identity", ["m"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, mask.shape)],
        [numpy_helper.from_array(mask.astype(np.float32), "m")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = len(proto.SerializeToString())
    saved = compress_masks(proto)
    assert saved > 0.9 * mask.nbytes and len(proto.SerializeToString()) < before / 10
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {})[0], mask)


def _loop_mask(h, w, ws, shift):
    """Swin's shifted-window mask as the official code builds it (slice assignment)."""
    from edge_sr.models.windows import window_partition

    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws).squeeze(-1)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


@pytest.mark.parametrize("h,w,ws", [(8, 8, 8), (16, 24, 8), (64, 40, 8), (48, 96, 16)])
def test_tensor_op_mask_equals_the_official_loop(h, w, ws):
    from edge_sr.models.windows import shift_attention_mask

    assert torch.equal(shift_attention_mask(h, w, ws, ws // 2), _loop_mask(h, w, ws, ws // 2))


def test_dynamic_export_runs_any_size_like_pytorch(tiny_swinir, tmp_path, one_thread):
    model = tiny_swinir(2)
    path = export_fp_onnx(model, tmp_path / "dyn.onnx", tile=(24, 32), dynamic=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    assert shape[2:] == ["h", "w"], shape
    # the position biases are gathered from their tables here too: the constants are no bigger
    # than a fixed-shape file's (the graph holds more Shape/Gather nodes)
    fixed = export_fp_onnx(model, tmp_path / "fixed.onnx", tile=(24, 32))
    dyn_proto = onnx.load(str(path))

    def const_bytes(proto):
        return sum(len(t.raw_data) for t in proto.graph.initializer)

    assert const_bytes(dyn_proto) <= 1.02 * const_bytes(onnx.load(str(fixed)))
    assert not any(n.op_type in ("If", "Loop") for n in dyn_proto.graph.node)
    g = torch.Generator().manual_seed(0)
    for hw in [(24, 32), (16, 16), (13, 27), (40, 24)]:  # multiples or not, the example or not
        x = torch.rand(1, 3, *hw, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {"lr": x.numpy()})[0]
        assert out.shape == ref.shape == (1, 3, 2 * hw[0], 2 * hw[1])
        assert np.abs(out - ref).max() < 1e-5, hw


def test_dynamic_export_is_refused_where_the_model_needs_fixed_sizes(tiny_swinir, tmp_path):
    model = tiny_swinir(2)
    model.dynamic_export = False  # as NGswin, whose padding and N-gram windows need fixed sizes
    with pytest.raises(EdgeSRError, match="no dynamic-shape export"):
        export_fp_onnx(model, tmp_path / "x.onnx", dynamic=True)
    assert not (tmp_path / "x.onnx").exists()
