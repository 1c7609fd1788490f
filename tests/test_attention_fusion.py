"""``edge_sr.onnx_tidy.fuse_attention``: each window attention as ONNX's ``Attention`` operator
(opset 23), in the FP graph and the ORT QDQ engine, with the same outputs up to rounding."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edge_sr.onnx_export import export_fp_onnx
from edge_sr.onnx_tidy import ATTENTION_OPSET, fuse_attention
from edge_sr.onnx_tidy import model_opset as _opset
from tests.test_ngswin import make_tiny_ngswin


def _run(proto_or_path, x: np.ndarray) -> np.ndarray:
    src = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) \
        else str(proto_or_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"lr": x})[0]


def _ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def _three_d(proto: onnx.ModelProto) -> int:
    return sum(any(a.name == "q_num_heads" for a in n.attribute)
               for n in proto.graph.node if n.op_type == "Attention")


def test_swinir_fp_export_fuses_every_attention_in_3d(tiny_swinir, tmp_path: Path) -> None:
    """Two blocks (one shifted): two Attention nodes taking (windows, N, C) tensors, no Softmax,
    none of the heads' Transposes, opset 23, the same outputs as the unfused graph."""
    model = tiny_swinir(2, depths=(2,), num_heads=(2,))
    plain = export_fp_onnx(model, tmp_path / "plain.onnx", tile=(16, 24))
    fused = export_fp_onnx(model, tmp_path / "fused.onnx", tile=(16, 24), fuse_attention=True)
    p, f = onnx.load(str(plain)), onnx.load(str(fused))
    assert _ops(p)["Softmax"] == 2 and _ops(f)["Softmax"] == 0
    assert _ops(f)["Attention"] == 2 and _three_d(f) == 2
    assert _opset(p) == 17 and _opset(f) == ATTENTION_OPSET
    heads = [n for n in f.graph.node if n.op_type == "Transpose"
             and list(n.attribute[0].ints) == [0, 2, 1, 3]]
    assert not heads and _ops(f)["Transpose"] < _ops(p)["Transpose"] - 6
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)).numpy()
    assert np.abs(_run(fused, x) - _run(plain, x)).max() < 1e-5
    with torch.no_grad():
        assert np.abs(_run(fused, x) - model(torch.from_numpy(x)).numpy()).max() < 1e-4


def test_masked_windows_are_recomputed_when_the_mask_sum_is_too_large(tiny_swinir,
                                                                      tmp_path: Path) -> None:
    """With ``max_bias_bytes`` below the shifted block's summed bias (16 windows x 2 heads x 64²
    floats: 512 KiB) the block runs every window with the position bias alone, then recomputes
    the windows its mask touches (Gather, Attention, ScatterND): still the same outputs. A 32x32
    tile has 4x4 windows of 8x8; the mask touches the last row and column of windows: 7 of 16."""
    model = tiny_swinir(2, depths=(2,), num_heads=(2,))
    path = export_fp_onnx(model, tmp_path / "plain.onnx", tile=(32, 32))
    proto = onnx.load(str(path))
    assert fuse_attention(proto, max_bias_bytes=300_000) == 2
    ops = _ops(proto)
    assert ops["Attention"] == 3 and ops["ScatterND"] == 1
    windows = [np.ravel(onnx.numpy_helper.to_array(n.attribute[0].t)) for n in proto.graph.node
               if n.op_type == "Constant" and n.output[0].endswith("/windows")]
    assert [w.tolist() for w in windows] == [[3, 7, 11, 12, 13, 14, 15]]
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    assert np.abs(_run(proto, x) - _run(path, x)).max() < 1e-5


def test_ngswin_cosine_attention_is_fused_through_its_normalisation(tmp_path: Path) -> None:
    """NGswin's q and k are L2-normalised per head and the logits scaled per head: the
    normalisation is recomputed before the heads' Transpose, the scale moves onto q, and every
    attention takes 3-D tensors."""
    model = make_tiny_ngswin(scale=2)
    plain = export_fp_onnx(model, tmp_path / "plain.onnx", tile=(48, 48))
    fused = export_fp_onnx(model, tmp_path / "fused.onnx", tile=(48, 48), fuse_attention=True)
    p, f = onnx.load(str(plain)), onnx.load(str(fused))
    assert _ops(f)["Softmax"] == 0 and _ops(f)["Attention"] == _ops(p)["Softmax"] > 0
    assert _three_d(f) == _ops(f)["Attention"]
    # the normalisations are kept, moved (each one LpNormalization in both graphs)
    assert _ops(f)["LpNormalization"] == _ops(p)["LpNormalization"] > 0
    assert _ops(f)["ReduceL2"] == _ops(p)["ReduceL2"] == 0
    # the per-head logit scale multiplies q as a (heads, d) constant (folded at load), not a
    # (heads, 1) one that ORT broadcasts element by element
    made = {o: n for n in f.graph.node for o in n.output}
    scaled = [n for n in f.graph.node if n.op_type == "Mul"
              and any(getattr(made.get(i), "op_type", "") == "Expand" for i in n.input)]
    assert len(scaled) == _ops(f)["Attention"] == _ops(f)["Expand"]
    x = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2)).numpy()
    assert np.abs(_run(fused, x) - _run(plain, x)).max() < 1e-5


def test_ort_engine_is_fused_and_stays_exact_to_the_fake_quant_model(tiny_swinir) -> None:
    """The ORT QDQ export fuses its floating-point attentions by default (opset 23), keeps them
    unfused with ``fuse_attention=False`` (opset 21), and both stay within float rounding of
    the fake-quant model."""
    from calibrate.dobi import init_bounds
    from calibrate.export.ortcheck import make_session
    from calibrate.export_qdq import ExportConfig, build_qdq
    from calibrate.prepare import QuantRecipe, prepare

    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    st = prepare(tiny, QuantRecipe(bits=8, grid="ort", fp_sites=("qk", "pv")))  # build's ORT sites
    init_bounds(st, calib)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = st(x).numpy()
    for fuse, softmax, opset in ((True, 0, ATTENTION_OPSET), (False, 2, 21)):
        proto, _ = build_qdq(st, ExportConfig(target="ort", tile=(16, 16), fuse_attention=fuse))
        assert _ops(proto)["Softmax"] == softmax and _opset(proto) == opset
        assert _ops(proto)["Attention"] == 2 - softmax
        out = make_session(proto, threads=1).run(None, {"lr": x.numpy()})[0]
        assert np.abs(out - ref).max() < 1e-4


def test_trt_export_is_never_fused(tiny_swinir) -> None:
    """TensorRT 10.3 does not parse ONNX's Attention: the ``trt`` target keeps the unfused
    attention whatever ``fuse_attention`` says."""
    from calibrate.dobi import init_bounds
    from calibrate.export_qdq import ExportConfig, build_qdq
    from calibrate.prepare import QuantRecipe, prepare

    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    st = prepare(tiny, QuantRecipe(bits=8, grid="trt"))
    init_bounds(st, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    proto, _ = build_qdq(st, ExportConfig(target="trt", tile=(16, 16)))
    assert _ops(proto)["Attention"] == 0 and _ops(proto)["Softmax"] == 2


def test_what_is_not_static_or_not_float_is_left_alone(tiny_swinir, tmp_path: Path) -> None:
    """A dynamic-shape export (window counts unknown) and an engine whose attention products
    are quantized (``fp_sites=()``: Q/DQ around q·kᵀ and p·v) are left as they are, opset too."""
    from calibrate.dobi import init_bounds
    from calibrate.export_qdq import ExportConfig, build_qdq
    from calibrate.prepare import QuantRecipe, prepare

    model = tiny_swinir(2, depths=(2,), num_heads=(2,))
    dyn = onnx.load(str(export_fp_onnx(model, tmp_path / "dyn.onnx", tile=(16, 16), dynamic=True,
                                       fuse_attention=True)))
    assert _ops(dyn)["Attention"] == 0 and _ops(dyn)["Softmax"] == 2 and _opset(dyn) == 17
    st = prepare(model, QuantRecipe(bits=8, grid="ort"))
    init_bounds(st, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    proto, _ = build_qdq(st, ExportConfig(target="ort", tile=(16, 16)))
    assert _ops(proto)["Attention"] == 0 and _ops(proto)["Softmax"] == 2 and _opset(proto) == 21


def test_cli_export_fuses_unless_asked_not_to(tiny_swinir, tmp_path: Path, monkeypatch) -> None:
    """``edge-sr export --target ort`` writes the fused opset-23 graph; ``--unfused-attention``
    the opset-21 one."""
    from click.testing import CliRunner

    import calibrate.export_qdq as ex
    from calibrate.dobi import init_bounds
    from calibrate.prepare import QuantRecipe, prepare
    from edge_sr.cli import main

    st = prepare(tiny_swinir(2, depths=(2,), num_heads=(2,)),
                 QuantRecipe(bits=8, grid="ort", fp_sites=("qk", "pv")))
    init_bounds(st, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    monkeypatch.setattr(ex, "_student", lambda c: st)
    cal = tmp_path / "cal.pt"
    cal.write_bytes(b"")
    for flags, opset, attention in (([], ATTENTION_OPSET, 2), (["--unfused-attention"], 21, 0)):
        out = tmp_path / f"m{opset}.onnx"
        res = CliRunner().invoke(main, ["export", str(cal), "--tile", "16x16", "-o", str(out),
                                        *flags])
        assert res.exit_code == 0, res.output
        proto = onnx.load(str(out))
        assert _opset(proto) == opset and _ops(proto)["Attention"] == attention


def test_a_graph_the_converter_cannot_raise_is_left_unfused(tiny_swinir, tmp_path: Path,
                                                             monkeypatch, caplog) -> None:
    """The fusion is a speed-up: when ONNX's version converter fails, the graph is left as it
    was (opset and all) with a warning, not an error."""
    import edge_sr.onnx_tidy as tidy_mod

    path = export_fp_onnx(tiny_swinir(2, depths=(2,), num_heads=(2,)), tmp_path / "m.onnx",
                          tile=(16, 16))
    proto = onnx.load(str(path))
    before = proto.SerializeToString()

    def fail(proto, opset):
        raise RuntimeError("No Adapter From Version $17")

    monkeypatch.setattr(tidy_mod, "_raise_opset", fail)
    with caplog.at_level("WARNING"):
        assert fuse_attention(proto) == 0
    assert proto.SerializeToString() == before
    assert "attention not fused" in caplog.text
