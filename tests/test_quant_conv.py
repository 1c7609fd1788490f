"""``--quant-conv`` (beyond the paper): the body's 3x3 convolutions on ORT's QLinearConv grid,
exact between the fake-quant model and the engine."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calibrate.dobi import init_bounds
from calibrate.export.ortcheck import fused_op_types, make_session
from calibrate.export_qdq import ExportConfig, build_qdq
from calibrate.prepare import QuantRecipe, prepare, quantize_kept_weights, quantizers
from calibrate.qmodules import QuantConv2d
from edge_sr.errors import EdgeSRError

TILE = (16, 16)


def _student(tiny_swinir, quant_conv: bool, bits: int = 4):
    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    st = prepare(tiny, QuantRecipe(bits=bits, grid="ort", fp_sites=("qk", "pv"),
                                   fp_weights="int8", quant_conv=quant_conv))
    init_bounds(st, torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(1)))
    return tiny, st


def test_body_convs_become_quantized_and_the_rest_stay(tiny_swinir):
    tiny, st = _student(tiny_swinir, True)
    assert tiny.body_convs() == ["layers.0.conv", "conv_after_body"]
    convs = {n for n, m in st.named_modules() if isinstance(m, QuantConv2d)}
    assert convs == {"layers.0.conv", "conv_after_body"}
    names = [n for n, _ in quantizers(st) if n.split(".")[-1] in ("act_quantizer",
                                                                   "out_quantizer")]
    assert len(names) == 4
    for n in convs:
        m = st.get_submodule(n)
        assert m.act_quantizer.bits == 8 and m.out_quantizer.bits == 8  # W8A8 at --bits 4
        assert m.act_quantizer.grid == m.out_quantizer.grid == "integer"
        codes, s = m.conv.kept_codes, m.conv.kept_scale
        assert m.conv.kept_bits == 8 and int(codes.abs().max()) <= 127
        assert torch.equal(m.conv.weight, codes.float() * s[:, None, None, None])
    # the image layers stay floating point
    assert isinstance(st.conv_first, nn.Conv2d) and not isinstance(st.conv_first, QuantConv2d)


def test_bias_is_rounded_to_the_accumulator_grid():
    conv = nn.Conv2d(6, 5, 3, padding=1)
    holder = nn.Module()
    holder.c = conv
    quantize_kept_weights(holder, set(), 8, only=["c"])
    q = QuantConv2d(conv, 4)
    q.act_quantizer.set_bounds(-1.0, 2.0)
    q.act_quantizer.grid = "integer"
    lo, up = q.act_quantizer.grid_bounds()
    step = (up - lo) / 15 * conv.kept_scale
    b = q.accumulator_bias()
    k = b / step
    assert torch.allclose(k, k.round(), atol=1e-3) and not torch.equal(b, conv.bias)
    # while the quantizers are off (DOBI's FP pass) the bias is the layer's own
    q.act_quantizer.enabled = False
    assert torch.equal(q.accumulator_bias(), conv.bias)
    # the output is the 8-bit out grid's
    q.act_quantizer.enabled = True
    x = torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        y = F.conv2d(q.act_quantizer(x), conv.weight, q.accumulator_bias(), padding=1)
    q.out_quantizer.set_bounds(float(y.min()), float(y.max()))
    with torch.no_grad():
        out = q(x)
    assert len(torch.unique(out)) <= 256 and 0 < float((out - y).abs().max()) < 0.02


def test_engine_runs_qlinearconv_and_stays_exact(tiny_swinir):
    tiny, st = _student(tiny_swinir, True)
    proto, _ = build_qdq(st, ExportConfig(target="ort", tile=TILE))
    ops = fused_op_types(proto)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 2  # conv_first and the upsampler stay FP
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, fp = st(x).numpy(), tiny(x).numpy()
    out = make_session(proto, threads=1).run(None, {"lr": x.numpy()})[0]
    assert np.abs(out - ref).max() < 1e-4  # the fused integer kernel is what was calibrated
    assert np.abs(ref - fp).max() > 1e-3


def test_without_the_option_the_convolutions_stay_floating_point(tiny_swinir):
    _, st = _student(tiny_swinir, False)
    assert not any(isinstance(m, QuantConv2d) for m in st.modules())
    proto, _ = build_qdq(st, ExportConfig(target="ort", tile=TILE))
    assert Counter(fused_op_types(proto))["QLinearConv"] == 0


def test_option_needs_the_ort_grid_and_body_convolutions(tiny_swinir):
    with pytest.raises(ValueError, match="--quant-conv.*--grid ort"):
        QuantRecipe(bits=4, quant_conv=True)
    assert not QuantRecipe(bits=4, grid="ort", quant_conv=True).faithful

    class NoConvs(type(tiny_swinir(2))):
        def body_convs(self):
            return []

    m = tiny_swinir(2)
    m.__class__ = NoConvs
    with pytest.raises(EdgeSRError, match="no dense body convolutions"):
        prepare(m, QuantRecipe(bits=4, grid="ort", quant_conv=True))


def test_cli_flag_reaches_the_build_and_its_errors_are_one_line():
    import json

    from click.testing import CliRunner

    from edge_sr.cli import main
    from runtime.build import BuildConfig
    from runtime.calib_cache import calibration_key

    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--quant-conv",
                                  "--print-config"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["quant_conv"] is True
    on, off = BuildConfig(bits=4, scale=2, quant_conv=True), BuildConfig(bits=4, scale=2)
    assert on.calibration_config().quant_recipe().quant_conv
    assert calibration_key("0" * 64, on) != calibration_key("0" * 64, off)  # its own cache entry
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--quant-conv",
                                  "--grid", "real", "--print-config"])
    assert r.exit_code != 0 and "--quant-conv" in r.output and "--grid ort" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_integer_output_is_ort_qlinearconv_bit_for_bit():
    """The fake-quant forward value is ORT's fused QLinearConv's: every output code equal."""
    from onnx import TensorProto, helper, numpy_helper

    from calibrate.export.grid import act_encoding

    torch.manual_seed(0)
    c, h, w = 16, 24, 24
    conv = nn.Conv2d(c, c, 3, padding=1)
    holder = nn.Module()
    holder.c = conv
    quantize_kept_weights(holder, set(), 8, only=["c"])
    q = QuantConv2d(conv, 8)
    for qq, (lo, up) in ((q.act_quantizer, (-2.0, 2.5)), (q.out_quantizer, (-3.0, 3.2))):
        qq.set_bounds(lo, up)
        qq.grid = "integer"
    x = torch.randn(1, c, h, w) * 1.3
    with torch.no_grad():
        ref = q(x).numpy()

    def arr(name, a):
        return numpy_helper.from_array(np.asarray(a), name)

    inits, nodes = [], []
    for tag, qq, src, dst in (("x", q.act_quantizer, "x0", "xd"), ("y", q.out_quantizer, "yc", "y")):
        e = act_encoding(qq, "ort")
        inits += [arr(f"{tag}lo", np.float32(e.clip_lo)), arr(f"{tag}hi", np.float32(e.clip_hi)),
                  arr(f"{tag}s", np.float32(e.scale)), arr(f"{tag}z", np.uint8(e.zero_point))]
        nodes += [helper.make_node("Clip", [src, f"{tag}lo", f"{tag}hi"], [f"{tag}_clipped"]),
                  helper.make_node("QuantizeLinear", [f"{tag}_clipped", f"{tag}s", f"{tag}z"], [f"{tag}q"]),
                  helper.make_node("DequantizeLinear", [f"{tag}q", f"{tag}s", f"{tag}z"], [dst])]
    inits += [arr("wc", conv.kept_codes.numpy()), arr("ws", conv.kept_scale.numpy()),
              arr("wz", np.zeros(c, np.int8)), arr("b", q.accumulator_bias().detach().numpy())]
    nodes.insert(3, helper.make_node("DequantizeLinear", ["wc", "ws", "wz"], ["wd"], axis=0))
    nodes.insert(4, helper.make_node("Conv", ["xd", "wd", "b"], ["yc"], pads=[1] * 4))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT,
                                                                     [1, c, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    assert fused_op_types(model)["QLinearConv"] == 1
    out = make_session(model, threads=1).run(None, {"x0": x.numpy()})[0]
    step = q.out_quantizer.qparams().scale
    assert np.abs(out - ref).max() < 1e-3 * step  # no output code differs
    # the float convolution alone would be a step away here and there
    with torch.no_grad():
        y = F.conv2d(q.act_quantizer(x), conv.weight, q.accumulator_bias(), padding=1)
        assert float((q.out_quantizer(y) - q(x)).abs().max()) <= 1.01 * step


def test_dqc_gradients_reach_the_convolution_bounds(tiny_swinir):
    _, st = _student(tiny_swinir, True)
    m = st.get_submodule("layers.0.conv")
    params = [m.act_quantizer.lower, m.act_quantizer.upper, m.out_quantizer.lower,
              m.out_quantizer.upper]
    for p in params:
        p.requires_grad_(True)
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(3))
    st(x).square().mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
