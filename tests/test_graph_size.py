"""What makes the exported files small, and that none of it changes a number.

Position-bias tables instead of expanded biases, FP16 storage of a student's FP16-rounded
weights, packed 4-bit weight codes for ORT's integer kernel, and compact files (short tensor
names, no shape annotations): each is exact, so ORT still reproduces PyTorch.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from calibrate.dobi import init_bounds
from calibrate.export.ortcheck import fused_op_types, integer_coverage
from calibrate.export_qdq import ExportConfig, export_qdq, read_qdq_meta
from calibrate.prepare import QuantRecipe, prepare
from calibrate.qmodules import QuantLinear
from edge_sr.onnx_export import export_fp_onnx
from edge_sr.onnx_tidy import compact, gather_position_biases, position_tables, store_fp16

pytestmark = pytest.mark.usefixtures("one_thread")
TILE = (16, 16)


def _run(path_or_proto, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    src = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(
        None, {"lr": x.numpy()})[0]


def test_fp32_export_keeps_position_tables_not_expanded_biases(tiny_swinir, tmp_path):
    model = tiny_swinir(2)
    path = export_fp_onnx(model, tmp_path / "m.onnx", tile=TILE)
    proto = onnx.load(str(path))
    tables = position_tables(model)
    assert len(tables) == 4  # one per block
    biases = {table[index.reshape(-1)].reshape(64, 64, -1).transpose(2, 0, 1).tobytes()
              for table, index in tables}
    raw = [t.raw_data for t in proto.graph.initializer]
    assert not biases & set(raw)  # no expanded (heads, 64, 64) bias left
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    assert sum(n.op_type == "Gather" and shapes.get(n.input[0]) == tables[0][0].shape
               for n in proto.graph.node) == 4  # each block gathers from its own table
    assert not proto.graph.value_info  # compact: no shape annotations
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(_run(str(path), x) - want).max() < 1e-4


def test_gather_position_biases_is_exact_and_smaller():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((49, 3)).astype(np.float32)
    from edge_sr.models.windows import relative_position_index

    index = relative_position_index(4).numpy()
    bias = table[index.reshape(-1)].reshape(16, 16, 3).transpose(2, 0, 1)[None]
    node = onnx.helper.make_node("Add", ["x", "b"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])],
        [numpy_helper.from_array(np.ascontiguousarray(bias), "b")])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    saved = gather_position_biases(proto, [(table, index)])
    assert saved == bias.nbytes - table.nbytes
    onnx.checker.check_model(proto)
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": x})[0], x + bias)


def test_store_fp16_only_takes_exact_values():
    exact = np.arange(512, dtype=np.float32) / 8  # all FP16 numbers
    inexact = exact + np.float32(1e-4)
    nodes = [onnx.helper.make_node("Add", ["x", "a"], ["y0"]),
             onnx.helper.make_node("Add", ["y0", "b"], ["y"])]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])],
        [numpy_helper.from_array(exact, "a"), numpy_helper.from_array(inexact, "b")])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert store_fp16(proto) == exact.nbytes // 2
    kinds = {t.name: t.data_type for t in proto.graph.initializer}
    assert kinds == {"a/fp16": TensorProto.FLOAT16, "b": TensorProto.FLOAT}
    x = np.linspace(-1, 1, 512, dtype=np.float32)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": x})[0], x + exact + inexact)


def test_fp16_weights_round_only_the_unquantized_weights(tiny_swinir):
    tiny = tiny_swinir(2)
    st = prepare(tiny, QuantRecipe(bits=4, grid="ort", fp_weights="fp16"))
    fp = dict(tiny.named_parameters())
    for name, p in st.named_parameters():
        if ".weight_quantizers." in name or name.endswith((".lower", ".upper")):
            continue
        owner = st.get_submodule(name.rpartition(".")[0]) if "." in name else st
        if isinstance(owner, QuantLinear):
            assert torch.equal(p, fp[name]), name  # quantized weights keep their FP values
        elif p.dim() >= 2 and p.numel() >= 256:
            assert torch.equal(p, p.half().float()), name
            assert not torch.equal(p, fp[name]), name
    assert not QuantRecipe(fp_weights="fp16").faithful
    with pytest.raises(ValueError, match="--fp-weights"):
        QuantRecipe(fp_weights="bf16")


def test_w4_ort_file_stores_packed_codes_and_fp16_weights_exactly(tiny_swinir, tmp_path):
    tiny = tiny_swinir(2)
    calib = torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(1))
    st = prepare(tiny, QuantRecipe(bits=4, grid="ort", fp_weights="fp16"))
    init_bounds(st, calib)
    path = export_qdq(st, ExportConfig(target="ort", tile=TILE), tmp_path / "q.onnx")
    proto = onnx.load(str(path))
    kinds = [t.data_type for t in proto.graph.initializer]
    # every linear's codes, signed (ORT's u8 x s8 kernel is exact at W4), and the mask labels
    assert kinds.count(TensorProto.INT4) == 4 * 6 and kinds.count(TensorProto.UINT4) == 1
    assert TensorProto.FLOAT16 in kinds  # the convolutions and position tables
    assert not proto.graph.value_info
    inner = [o for n in proto.graph.node for o in n.output if o != "sr"]
    assert max(map(len, inner)) <= 4  # compact tensor names
    # the sites' descriptions live once, in the model's record, not on every node
    assert not [n.name for n in proto.graph.node if n.metadata_props]
    sites = read_qdq_meta(proto)["sites"]
    names = {n.name for n in proto.graph.node}
    named = [r[k] for r in sites for k in ("q", "act_q", "matmul") if k in r]
    assert len(named) >= 4 * 6 and set(named) <= names  # every quantized linear's MatMul, at least
    kept = export_qdq(st, ExportConfig(target="ort", tile=TILE, keep_names=True),
                      tmp_path / "k.onnx")
    assert sum(bool(n.metadata_props) for n in onnx.load(str(kept)).graph.node) >= 3 * 4 * 6
    cov = integer_coverage(fused_op_types(proto))  # ORT folds the Casts and still fuses
    assert cov["float_total"] == 0
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = st(x).numpy()
    assert np.abs(_run(str(path), x) - ref).max() < 1e-4


def test_compact_changes_no_output(tiny_swinir, tmp_path):
    model = tiny_swinir(2)
    path = export_fp_onnx(model, tmp_path / "m.onnx", tile=TILE)
    proto = onnx.load(str(path))
    for n in proto.graph.node:  # long names again, as the tracer writes them
        for i, o in enumerate(n.output):
            if o != "sr":
                n.output[i] = "/a/very/long/traced/name/" + o
        for i, t in enumerate(n.input):
            if t.startswith("t") and t not in {i.name for i in proto.graph.initializer}:
                n.input[i] = "/a/very/long/traced/name/" + t
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(4))
    before = _run(proto, x)
    assert compact(proto) > 0
    assert np.array_equal(_run(proto, x), before)


@pytest.mark.parametrize("fp_weights,container", [("int8", TensorProto.INT8),
                                                  ("int4", TensorProto.INT4)])
def test_kept_weights_int_are_stored_as_codes_and_stay_exact(tiny_swinir, tmp_path, fp_weights,
                                                             container):
    """--fp-weights int8/int4: the convolutions kept out of WbAb become weight-only integer grids
    in the student, and the file stores their codes; image layers stay FP16; ORT = student."""
    from calibrate.prepare import image_layers, kept_weight_grids

    tiny = tiny_swinir(2, embed_dim=12)  # 12 = 3 * 2^2: image layers are named, not guessed
    calib = torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(1))
    st = prepare(tiny, QuantRecipe(bits=4, grid="ort", fp_weights=fp_weights))
    convs = {n: m for n, m in st.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert image_layers(st) == {"conv_first", "upsample.0"}
    inner = [n for n, m in convs.items() if n not in image_layers(st)]
    assert inner and len(inner) < len(convs)  # the RSTB convs and conv_after_body, not first/last
    qmax = 127 if fp_weights == "int8" else 7
    for n in inner:
        m = convs[n]
        assert int(m.kept_codes.abs().max()) <= qmax
        w = m.kept_codes.float() * m.kept_scale.view(-1, 1, 1, 1)
        assert torch.equal(m.weight, w), n
        fp_w = tiny.get_submodule(n).weight.detach()
        nearest = torch.clamp(torch.round(fp_w / m.kept_scale.view(-1, 1, 1, 1)), -qmax, qmax)
        assert torch.equal(m.kept_codes.float(), nearest), n  # round to nearest on its grid
        assert not torch.equal(m.weight, fp_w)
    for n, m in convs.items():
        if n not in inner:
            assert getattr(m, "kept_codes", None) is None
            assert torch.equal(m.weight, m.weight.half().float())
    assert len(kept_weight_grids(st)) == len(inner)
    init_bounds(st, calib)
    path = export_qdq(st, ExportConfig(target="ort", tile=TILE), tmp_path / "q.onnx")
    proto = onnx.load(str(path))
    # the convolutions' codes: 4-D (the linears' own codes are 2-D, their zero points scalars)
    kinds = [t.data_type for t in proto.graph.initializer if len(t.dims) == 4]
    assert kinds.count(container) == len(inner)
    half = prepare(tiny, QuantRecipe(bits=4, grid="ort", fp_weights="fp16"))
    init_bounds(half, calib)
    fp16 = export_qdq(half, ExportConfig(target="ort", tile=TILE), tmp_path / "h.onnx")
    assert path.stat().st_size < fp16.stat().st_size
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = st(x).numpy()
    assert np.abs(_run(str(path), x) - ref).max() < 1e-4


def test_image_layers_are_named_by_structure_not_by_width(tiny_swinir):
    """A hidden width of 3 * scale^2 (12 at x2) would pass for an upsampler's output by width."""
    from edge_sr.models.base import SRModel

    tiny = tiny_swinir(2, embed_dim=12)
    assert tiny.image_layers() == ["conv_first", "upsample.0"]
    guessed = SRModel.image_layers(tiny)  # the width rule, for models that do not say
    assert {"conv_first", "upsample.0"} < set(guessed) and "conv_after_body" in guessed


def test_fp_weights_auto_measures_each_kept_layer_and_mixes_int4_with_int8(tiny_swinir,
                                                                          tmp_path):
    """--fp-weights auto: one held-out measurement per kept layer, the FP model left bitwise as
    it was, the chosen layers INT4 and the rest INT8 in the student and in the file."""
    from calibrate.prepare import kept_layers, kept_weight_grids
    from calibrate.site_choice import choose_kept_int4

    tiny = tiny_swinir(2, embed_dim=12)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    lr = torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hr = tiny(lr).clamp(0, 1)  # the FP model scores highest on its own outputs
    recipe = QuantRecipe(bits=4, grid="ort", fp_weights="auto")
    layers = kept_layers(tiny, {p.name for p in tiny.quant_points() if p.kind == "linear"})
    chosen, report = choose_kept_int4(tiny, recipe, lr, hr)
    assert list(report) == layers and set(chosen) <= set(layers)
    assert all(r["drop_db"] > 0 for r in report.values())  # INT4 moves the FP outputs
    assert all(r["int4"] == (r["drop_db"] <= 0.002) for r in report.values())
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert not any(hasattr(m, "kept_codes") for m in tiny.modules())
    everything, _ = choose_kept_int4(tiny, recipe, lr, hr, max_drop=float("inf"))
    nothing, _ = choose_kept_int4(tiny, recipe, lr, hr, max_drop=-1.0)
    assert everything == tuple(layers) and nothing == ()

    int4 = layers[:1]
    st = prepare(tiny, replace(recipe, kept_int4=tuple(int4)))
    bits = {n: int(m.kept_bits) for n, m in st.named_modules() if hasattr(m, "kept_bits")}
    assert bits == {n: 4 if n in int4 else 8 for n in layers}
    assert [g[3] for g in kept_weight_grids(st)] == [bits[n] for n in layers]
    init_bounds(st, lr)
    proto = onnx.load(str(export_qdq(st, ExportConfig(target="ort", tile=TILE),
                                     tmp_path / "a.onnx")))
    kinds = [t.data_type for t in proto.graph.initializer if len(t.dims) == 4]  # convolutions
    assert kinds.count(TensorProto.INT4) == 1 and kinds.count(TensorProto.INT8) == len(layers) - 1
    with pytest.raises(ValueError, match="--fp-weights auto"):
        QuantRecipe(fp_weights="int8", kept_int4=("conv_after_body",))
