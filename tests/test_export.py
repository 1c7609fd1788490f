"""QDQ export: exactness against the fake-quant model, integer fusion in ORT, metadata, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from calibrate.export.grid import act_encoding
from calibrate.export.ortcheck import fused_op_types, integer_coverage, make_session
from calibrate.export.students import minmax_student
from calibrate.export_qdq import ExportConfig, build_qdq, export_qdq, read_qdq_meta
from calibrate.prepare import QuantRecipe, prepare
from calibrate.quantizer import BoundFakeQuantizer, fake_quant_nograd
from edge_sr.errors import EdgeSRError

TILE = (16, 16)  # two windows per side: shifted blocks get a real mask


@pytest.fixture
def tiny(tiny_swinir):
    return tiny_swinir(depths=(2,), num_heads=(2,))


@pytest.fixture
def calib():
    return torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(1))


def _run(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    return make_session(proto, threads=1).run(None, {"lr": x.numpy()})[0]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("target,bits,scale,batch,tile", [
    ("ort", 2, 2, 1, TILE), ("ort", 3, 2, 1, TILE), ("ort", 4, 2, 1, TILE),
    ("ort", 8, 2, 1, TILE), ("trt", 2, 3, 2, (16, 24)), ("trt", 8, 2, 1, TILE)])
def test_export_matches_fake_quant(tiny_swinir, target, bits, scale, batch, tile):
    tiny = tiny_swinir(scale=scale, depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, *tile, generator=torch.Generator().manual_seed(1))
    student = minmax_student(tiny, calib, bits)
    proto, records = build_qdq(student, ExportConfig(target=target, tile=tile, batch=batch))
    x = torch.rand(batch, 3, *tile, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, fp = student(x).numpy(), tiny(x).numpy()
    out = _run(proto, x)
    assert out.shape == (batch, 3, tile[0] * scale, tile[1] * scale)
    assert np.abs(out - ref).max() < 1e-4  # float noise only
    assert np.abs(ref - fp).max() > 1e-3  # the quantizers really act (not a vacuous test)
    assert len([r for r in records if r["kind"] == "linear"]) == 2 * (3 + 3)  # q,k,v,proj,fc1,fc2


def test_shared_input_qkv_is_exact(tiny, calib):
    """One fused qkv GEMM with per-column weight scales (qkv_separation=False)."""
    student = minmax_student(tiny, calib, 3, qkv_separation=False)
    proto, _ = build_qdq(student, ExportConfig(tile=TILE, weight_container="int8"))
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = student(x).numpy()
    assert np.abs(_run(proto, x) - ref).max() < 1e-4
    dq = next(n for n in proto.graph.node if n.name.endswith("attn.qkv/W0/DequantizeLinear"))
    assert dq.attribute[0].name == "axis"


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("target", ["ort", "trt"])
def test_activation_grid_round_trip(bits, target):
    """Sub -> Clip -> Q -> DQ (+m) in ORT reproduces l + k*s, clipping and ties included."""
    from onnx import helper

    from calibrate.export.emit import _emit_act, _Graph

    q = BoundFakeQuantizer(bits)
    q.set_bounds(-0.37, 0.81)
    enc = act_encoding(q, target)
    g = _Graph()
    (dq,) = _emit_act(g, "x", enc, "a/", "a")
    g.add("Add", [dq, g.const("m", enc.shift)], ["y"], "a/AddShift")
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4001]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(g.nodes, "g", vi[:1], vi[1:], g.inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    x = torch.linspace(-1, 1.2, 4001)
    x = torch.cat([x[:-8], q.lower.detach() + (q.upper - q.lower).detach() / (2**bits - 1)
                   * torch.tensor([0.5, 1.5, 2.5, 3.5, 0, 1, 2, 3])])  # exact ties and grid points
    ref = fake_quant_nograd(x, q.lower.detach(), q.upper.detach(), bits).numpy()
    out = make_session(model, threads=1).run(None, {"x": x.numpy()})[0]
    err = np.abs(out - ref)
    # x - m rounds differently from x - l: only inputs within float noise of a midpoint may flip
    flips = err > 1e-6
    assert flips.mean() < 2e-3 and np.allclose(err[flips], enc.scale, rtol=1e-4)
    assert enc.qmax - enc.qmin == 2**bits - 1
    if not (target == "trt" and bits == 8):  # int8 forces z = 128 at 8 bits
        assert abs(enc.shift) <= enc.scale / 2 + 1e-7
    if target == "trt":
        assert enc.zero_point == 0 and enc.container == "int8" and -128 <= enc.qmin < enc.qmax <= 127
    else:
        assert enc.container == "uint8" and (enc.qmin, enc.qmax) == (0, 2**bits - 1)


def test_ort_int8_runs_integer_kernels(tiny, calib):
    """Every quantized linear and both attention matmuls become MatMulIntegerToFloat."""
    student = minmax_student(tiny, calib, 4)
    proto, records = build_qdq(student, ExportConfig(tile=TILE, weight_container="int8"))
    cov = integer_coverage(fused_op_types(proto))
    n_linear = sum(r["kind"] == "linear" for r in records)
    n_attn = 2 * 2  # two blocks, q@k^T and attn@v
    assert cov["integer"] == {"MatMulIntegerToFloat": n_linear + n_attn}
    assert cov["float_total"] == 0


def test_int4_weights_are_packed_and_smaller(tiny, calib):
    student = minmax_student(tiny, calib, 4)
    p4, _ = build_qdq(student, ExportConfig(tile=TILE))
    p8, _ = build_qdq(student, ExportConfig(tile=TILE, weight_container="int8"))
    w4 = [t for t in p4.graph.initializer if t.name.endswith("/W0")]
    w8 = [t for t in p8.graph.initializer if t.name.endswith("/W0")]
    assert w4 and all(t.data_type == TensorProto.INT4 for t in w4)
    assert all(t.data_type == TensorProto.UINT8 for t in w8)
    assert sum(len(t.raw_data) for t in w4) * 2 == pytest.approx(
        sum(len(t.raw_data) for t in w8), abs=len(w4))
    # the int4 codes dequantize to the fake-quant weight
    lin = student.get_submodule("layers.0.residual_group.blocks.0.mlp.fc1")
    t = next(t for t in w4 if t.name.startswith("layers.0.residual_group.blocks.0.mlp.fc1/"))
    scale = numpy_helper.to_array(next(i for i in p4.graph.initializer if i.name == t.name + "_scale"))
    shift = numpy_helper.to_array(next(i for i in p4.graph.initializer if i.name == t.name + "_shift"))
    w = numpy_helper.to_array(t).astype(np.float32).T * scale + shift.reshape(-1, 1)
    wq = lin.weight_quantizers[0](lin.weight).detach().numpy()
    assert np.abs(w - wq).max() < 1e-6


def test_metadata_and_trt_symmetry(tiny, calib):
    student = minmax_student(tiny, calib, 3)
    proto, records = build_qdq(student, ExportConfig(target="trt", tile=TILE))
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in qdq:
        meta = {p.key: p.value for p in n.metadata_props}
        assert meta["edge_sr.bits"] == "3", n.name
        assert json.loads(n.doc_string)["bits"] == 3
        zp = inits[n.input[2]]
        assert np.all(zp.astype(np.int64) == 0), n.name  # symmetric everywhere
        if meta["edge_sr.kind"] == "act":
            assert zp.dtype == np.int8 and inits[n.input[1]].shape == ()  # per-tensor int8
        else:
            assert meta["edge_sr.container"] == "int4"
    # stable names a post-pass can rely on
    names = {n.name for n in proto.graph.node}
    for r in records:
        if r["kind"] == "linear":
            site, j = r["site"], r["group"]
            assert {f"{site}/MatMul{j}", f"{site}/W{j}/DequantizeLinear", f"{site}/Add{j}",
                    f"{site}/ReduceSum{j}"} <= names
    meta = read_qdq_meta(proto)
    assert meta["target"] == "trt" and len(meta["sites"]) == len(records)
    assert all(s["act"]["zero_point"] == 0 for s in meta["sites"] if s["kind"] == "linear")


def test_export_writes_atomically_and_respects_force(tiny, calib, tmp_path):
    student = minmax_student(tiny, calib, 2)
    out = tmp_path / "m.onnx"
    path = export_qdq(student, ExportConfig(tile=TILE), out)
    assert path == out and read_qdq_meta(out)["config"]["tile"] == list(TILE)
    with pytest.raises(EdgeSRError, match="--force"):
        export_qdq(student, ExportConfig(tile=TILE), out, force=False)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_bad_inputs(tiny, calib):
    with pytest.raises(EdgeSRError, match="not calibrated"):
        build_qdq(prepare(tiny, QuantRecipe(bits=4)), ExportConfig(tile=TILE))
    student = minmax_student(tiny, calib, 4)
    with pytest.raises(EdgeSRError, match="--tile: tile 12x16 is not a multiple of 8"):
        build_qdq(student, ExportConfig(tile=(12, 16)))
    for opset in (20, onnx.defs.onnx_opset_version() + 1):
        with pytest.raises(EdgeSRError, match="--opset"):
            ExportConfig(opset=opset)
    with pytest.raises(EdgeSRError, match="no quantizers"):
        build_qdq(tiny, ExportConfig(tile=TILE))


def test_cli_export(tiny, calib, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import calibrate.export_qdq as ex
    from edge_sr.cli import main

    student = minmax_student(tiny, calib, 3)
    monkeypatch.setattr(ex, "_student", lambda c: student)  # until calibration files exist
    cal = tmp_path / "cal.pt"
    cal.write_bytes(b"")
    out = tmp_path / "m.onnx"
    args = ["export", str(cal), "--target", "trt", "--tile", "16x16", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert read_qdq_meta(out)["target"] == "trt"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--force" in res.output
    res = CliRunner().invoke(main, args[:-2] + ["--opset", "19", "-o", str(out), "--force"])
    assert res.exit_code == 2 and "--opset" in res.output


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_checkpoint_crop(data_root, bits):
    """The real SwinIR-light x2 on a Set5 crop: ORT vs fake-quant within the fidelity budget."""
    from edge_sr.data.images import load_image, to_tensor, to_uint8
    from edge_sr.models.swinir import SwinIRLight

    torch.set_num_threads(1)
    model = SwinIRLight(2)
    sd = torch.load(data_root / "models" / "swinir_light_x2_ref.pth", map_location="cpu")
    model.load_state_dict(sd.get("params", sd), strict=False)
    model.eval()
    train = sorted((data_root / "train" / "BSD200").glob("*.png"))[:2]
    calib = torch.cat([to_tensor(load_image(p))[..., :48, :48] for p in train])
    student = minmax_student(model, calib, bits)
    lr = to_tensor(load_image(data_root / "benchmark/Set5/LR_bicubic/X2/butterflyx2.png"))
    x = lr[..., 32:64, 32:64].contiguous()
    hr = load_image(data_root / "benchmark/Set5/HR/butterfly.png")[64:128, 64:128]
    proto, _ = build_qdq(student, ExportConfig(tile=(32, 32)))
    with torch.no_grad():
        ref = to_uint8(student(x)).astype(np.float64)
    out = to_uint8(torch.from_numpy(_run(proto, x))).astype(np.float64)
    assert np.abs(ref - out).max() <= 1
    hr = hr.astype(np.float64) / 255
    assert abs(_psnr(ref / 255, hr) - _psnr(out / 255, hr)) <= 0.01
