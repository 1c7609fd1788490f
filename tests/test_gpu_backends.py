"""The GPU path on a CPU machine: the trt-target ONNX under polygraphy, the LowBitLinear post-pass,
the TensorRT backend's guards, and (GPU only, skipped here) the CUDA backend and a TRT build."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sr.errors import EdgeSRError, MissingDependencyError
from runtime.backends import tensorrt as trt_backend

HAS_GPU = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
# polygraphy and onnx-graphsurgeon are dev dependencies (pyproject [dev]): their tests run on
# every machine that runs the suite, and a broken install fails them instead of skipping
POLYGRAPHY = Path(sys.executable).with_name("polygraphy")


def _student(bits: int = 3, qkv_separation: bool = False):
    from calibrate.prepare import QuantRecipe, prepare, quantizers
    from calibrate.qmodules import QuantLinear
    from edge_sr.models.swinir import SwinIRLight

    torch.manual_seed(0)
    fp = SwinIRLight(2, embed_dim=12, depths=(1,), num_heads=(2,), window_size=4).eval()
    st = prepare(fp, QuantRecipe(bits=bits, qkv_separation=qkv_separation))
    for _, m in st.named_modules():
        if isinstance(m, QuantLinear):
            for q, w in zip(m.weight_quantizers, m.weight_blocks()):
                q.set_bounds(float(w.detach().min()), float(w.detach().max()))
    for i, (_, q) in enumerate(quantizers(st)):
        if not bool(q.initialized):
            q.set_bounds(-1.5 - 0.01 * i, 1.7 + 0.02 * i)
    return fp, st


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    """The trt-target QDQ ONNX of a tiny calibrated SwinIR (H4's exporter)."""
    import onnx

    from calibrate.export_qdq import ExportConfig, build_qdq

    fp, st = _student(bits=3, qkv_separation=True)
    proto, _ = build_qdq(st, ExportConfig(target="trt", tile=(8, 8)))
    path = tmp_path_factory.mktemp("trt") / "model.onnx"
    onnx.save(proto, str(path))
    return st, path


def _ort(path_or_proto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    src = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _polygraphy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(POLYGRAPHY), *args], capture_output=True, text=True, timeout=300)


def test_trt_target_passes_polygraphy_lint_and_sanitize(trt_export, tmp_path):
    _, path = trt_export
    lint = _polygraphy("check", "lint", str(path), "-o", str(tmp_path / "lint.json"))
    assert lint.returncode == 0, lint.stdout[-2000:] + lint.stderr[-2000:]
    report = json.loads((tmp_path / "lint.json").read_text())
    assert report["summary"]["failing"] == []
    assert not [e for e in report["lint_entries"] if e["level"] == "exception"]
    out = tmp_path / "sanitized.onnx"
    san = _polygraphy("surgeon", "sanitize", str(path), "--fold-constants", "-o", str(out))
    assert san.returncode == 0, san.stderr[-2000:]
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_ort(str(out), x), _ort(str(path), x), atol=1e-5)


def test_lowbit_plugin_graph(trt_export, tmp_path):
    """Every quantized linear becomes one LowBitLinear; the graph is valid ONNX; rewritten back
    to plain ops it computes what the QDQ graph computes (and the fake-quant model)."""
    import onnx

    from calibrate.export_plugin import OP_TYPE, apply_lowbit_plugins, decompose_lowbit_plugins

    st, path = trt_export
    proto = onnx.load(str(path))
    from calibrate.export_qdq import read_qdq_meta

    linear = {r["matmul"] for r in read_qdq_meta(proto)["sites"] if r["kind"] == "linear"}
    n_groups = sum(1 for n in proto.graph.node if n.op_type == "MatMul" and n.name in linear)
    plug = apply_lowbit_plugins(onnx.load(str(path)))
    onnx.checker.check_model(plug)
    nodes = [n for n in plug.graph.node if n.op_type == OP_TYPE]
    assert n_groups > 0 and len(nodes) == n_groups
    n = nodes[0]
    attrs = {a.name for a in n.attribute}
    assert n.domain == "edge_sr" and {"plugin_version", "plugin_namespace", "act_bits", "w_bits",
                                      "act_lower", "w_scale"} <= attrs
    assert any(o.domain == "edge_sr" for o in plug.opset_import)
    assert not [m for m in plug.graph.node if m.op_type == "MatMul" and m.name in linear]
    x = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    qdq = _ort(str(path), x)
    dec = _ort(decompose_lowbit_plugins(plug), x)
    np.testing.assert_allclose(dec, qdq, atol=2e-5)
    with torch.no_grad():
        ref = st(torch.from_numpy(x)).numpy()
    assert np.abs(dec - ref).max() < 1e-5
    onnx.save(plug, str(tmp_path / "plugin.onnx"))


@pytest.mark.parametrize("bits,target,container,separate", [(4, "ort", "int8", False),
                                                            (2, "trt", "auto", True)])
def test_lowbit_plugin_pass_any_export(bits, target, container, separate):
    """The pass reads the site records, not the container: both targets, INT4 and INT8 weights,
    shared or separate q/k/v input quantizers."""
    from calibrate.export_plugin import apply_lowbit_plugins, decompose_lowbit_plugins
    from calibrate.export_qdq import ExportConfig, build_qdq

    _, st = _student(bits=bits, qkv_separation=separate)
    proto, _ = build_qdq(st, ExportConfig(target=target, tile=(8, 8), weight_container=container,
                                          lowbit_plugin=True))
    x = np.random.default_rng(2).random((1, 3, 8, 8), dtype=np.float32)
    dec = _ort(decompose_lowbit_plugins(apply_lowbit_plugins(proto)), x)
    with torch.no_grad():
        ref = st(torch.from_numpy(x)).numpy()
    assert np.abs(dec - ref).max() < 1e-5


def test_lowbit_node_maths_equals_fake_quant_linear(trt_export):
    """The node's integer maths (runtime.lowbit reference) on its own attributes reproduces the
    PyTorch QuantLinear it replaced (shared-input linear: one node)."""
    import onnx
    from onnx import numpy_helper

    from calibrate.export_plugin import OP_TYPE, apply_lowbit_plugins, params_from_node
    from runtime.lowbit import lowbit_linear_reference

    st, path = trt_export
    plug = apply_lowbit_plugins(onnx.load(str(path)))
    inits = {t.name: numpy_helper.to_array(t) for t in plug.graph.initializer}
    node = next(n for n in plug.graph.node if n.op_type == OP_TYPE and "fc1" in n.name)
    site = node.name.rsplit("/", 1)[0]
    qlin = st.get_submodule(site)
    p = params_from_node(node, inits)
    x = torch.randn(2, 16, qlin.in_features)
    with torch.no_grad():
        want = qlin(x)
    got = lowbit_linear_reference(x, p)
    assert (got - want).abs().max().item() < 1e-5


def test_polygraphy_lint_flags_the_custom_op(trt_export, tmp_path):
    import onnx

    from calibrate.export_plugin import apply_lowbit_plugins

    _, path = trt_export
    plug_path = tmp_path / "plugin.onnx"
    onnx.save(apply_lowbit_plugins(onnx.load(str(path))), str(plug_path))
    lint = _polygraphy("check", "lint", str(plug_path), "-o", str(tmp_path / "lint.json"))
    assert lint.returncode == 0, lint.stdout[-2000:]
    report = json.loads((tmp_path / "lint.json").read_text())
    custom = [e for e in report["lint_entries"] if "LowBitLinear" in e["message"]]
    assert custom and all("not a registered" in e["message"] for e in custom)
    assert report["summary"]["failing"] == []


def test_plugin_pass_refuses_foreign_models():
    from onnx import TensorProto, helper

    from calibrate.export_plugin import apply_lowbit_plugins

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(EdgeSRError, match="edge_sr.qdq"):
        apply_lowbit_plugins(helper.make_model(g))


# ---- TensorRT backend guards (no TensorRT needed) ----------------------------------------------


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_missing_tensorrt_says_how_to_install(tmp_path):
    with pytest.raises(MissingDependencyError) as e:
        trt_backend.import_tensorrt()
    msg = str(e.value)
    assert "python3-libnvinfer" in msg and "pypi.nvidia.com" in msg and "--backend ort" in msg
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    with pytest.raises(MissingDependencyError):
        trt_backend.build_engine(onnx_file, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_build_config_and_typing():
    cfg = trt_backend.PlanOptions()
    assert trt_backend.resolve_typing(cfg, 10) == "weak"  # JetPack 6: FP16 flag for FP parts
    assert trt_backend.resolve_typing(cfg, 11) == "strong"
    assert trt_backend.resolve_typing(trt_backend.PlanOptions(fp16=False), 10) == "strong"
    with pytest.raises(EdgeSRError):
        trt_backend.resolve_typing(trt_backend.PlanOptions(typing="weak"), 11)
    with pytest.raises(EdgeSRError):
        trt_backend.PlanOptions(typing="loose")
    with pytest.raises(EdgeSRError, match="not found"):
        trt_backend.build_engine("/nonexistent/model.onnx", "/tmp/x.engine")


def test_engine_compat_check():
    built = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    trt_backend.check_engine_compat(built, dict(built), "e.engine")
    with pytest.raises(EdgeSRError, match="TensorRT 10.3.0.*10.8.0"):
        trt_backend.check_engine_compat(built, {**built, "tensorrt": "10.8.0"}, "e.engine")
    with pytest.raises(EdgeSRError, match="GPU-specific"):
        trt_backend.check_engine_compat(
            built, {**built, "gpu": "NVIDIA H100", "compute_capability": "9.0"}, "e.engine")
    assert trt_backend.sidecar_path("a/model.engine") == Path("a/model.engine.json")


# ---- CUDA backend ------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_GPU, reason="a CUDA GPU is present")
def test_cuda_backend_without_gpu_is_a_clear_error():
    from runtime.backends.cuda import CudaBackend, profile_cuda, profile_engine_cuda

    fp, _ = _student()
    with pytest.raises(EdgeSRError, match="no CUDA GPU"):
        CudaBackend.create(fp_model=fp, precision="fp16")
    with pytest.raises(EdgeSRError, match="no CUDA GPU"):
        profile_cuda(fp, runs=1)
    with pytest.raises(EdgeSRError, match="no CUDA GPU"):
        profile_engine_cuda("engines/any")


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
def test_cuda_backend_lowbit_matches_fake_quant():
    from runtime.backends.cuda import CudaBackend, profile_cuda
    from runtime.lowbit import load_library

    try:
        load_library()
    except MissingDependencyError as e:
        pytest.skip(str(e))
    fp, st = _student(bits=4)
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    be = CudaBackend.create(student=st, precision="lowbit", tile=(8, 8), max_batch=2,
                            compute_dtype="fp32")
    with torch.no_grad():
        want = st(torch.from_numpy(x)).numpy()
    assert np.abs(be.run(x) - want).max() < 5e-3
    assert be.info().name == "cuda"
    rows = profile_cuda(fp, {"w4a4": st}, input_size=(16, 16), runs=3, warmup=1)
    assert [r["precision"] for r in rows] == ["w4a4", "fp16", "fp32"]
    assert all(r["p50_ms"] > 0 and r["ratio_vs_fp16"] > 0 for r in rows)


@pytest.mark.skipif(not (HAS_GPU and HAS_TRT), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_fp16_engine_matches_ort(tmp_path):
    import onnx

    from calibrate.export_qdq import ExportConfig, build_qdq

    _, st = _student(bits=8)
    proto, _ = build_qdq(st, ExportConfig(target="trt", tile=(8, 8)))
    onnx.save(proto, str(tmp_path / "m.onnx"))
    trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine",
                             trt_backend.PlanOptions(timing_cache=str(tmp_path / "cache")))
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    be = trt_backend.TensorRTBackend(tmp_path / "m.engine")
    assert np.abs(be.run(x) - _ort(str(tmp_path / "m.onnx"), x)).max() < 2e-2
    assert (tmp_path / "cache").is_file()


def test_export_with_lowbit_plugin_flag(tmp_path):
    """``--target trt --lowbit-plugin`` (ExportConfig.lowbit_plugin) runs this pass on export."""
    import onnx

    from calibrate.export_plugin import META_KEY, OP_TYPE
    from calibrate.export_qdq import ExportConfig, export_qdq

    _, st = _student(bits=3)
    out = export_qdq(st, ExportConfig(target="trt", tile=(8, 8), lowbit_plugin=True),
                     tmp_path / "plugin.onnx")
    proto = onnx.load(str(out))
    nodes = [n for n in proto.graph.node if n.op_type == OP_TYPE]
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == META_KEY))
    assert nodes and len(meta["nodes"]) == len(nodes)
    assert {n["w_bits"] for n in meta["nodes"]} == {3}
