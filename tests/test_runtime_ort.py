"""The ONNX Runtime backend and the ONNX predictor, on a tiny random SwinIR-light."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_sr.errors import EdgeSRError
from edge_sr.onnx_export import export_fp_onnx
from runtime.backends.onnxruntime import OrtBackend, cpu_model, graph_precision
from runtime.predictors import onnx_predictor


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from conftest import make_tiny_swinir

    model = make_tiny_swinir(2)
    d = tmp_path_factory.mktemp("ort")
    return model, export_fp_onnx(model, d / "b1.onnx", tile=(16, 24)), \
        export_fp_onnx(model, d / "b3.onnx", tile=(16, 24), batch=3)


def test_backend_shape_scale_info(tiny_onnx):
    _, p1, _ = tiny_onnx
    be = OrtBackend(p1, threads=1)
    assert be.tile == (16, 24) and be.scale == 2 and be.max_batch == 1
    info = be.info()
    assert info.name == "onnxruntime" and info.precision == "fp32"
    assert cpu_model() in info.device and "1 thread" in info.device
    assert graph_precision(p1) == "fp32"


def test_backend_matches_torch_per_tile(tiny_onnx):
    model, p1, p3 = tiny_onnx
    x = torch.rand(5, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    for path in (p1, p3):  # fixed batch 1 (looped) and 3 (5 = 3 + 2, the last call padded)
        out = OrtBackend(path, threads=1).run(x.numpy())
        assert out.shape == (5, 3, 32, 48)
        np.testing.assert_allclose(out, ref, atol=2e-4)


def test_backend_rejects_wrong_tile(tiny_onnx):
    _, p1, _ = tiny_onnx
    be = OrtBackend(p1, threads=1)
    with pytest.raises(ValueError, match="16, 24"):
        be.run(np.zeros((1, 3, 24, 16), np.float32))
    with pytest.raises(EdgeSRError, match="tile 8x8 was asked"):
        OrtBackend(p1, tile=(8, 8))


def test_backend_errors(tmp_path):
    with pytest.raises(EdgeSRError, match="file not found"):
        OrtBackend(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(EdgeSRError, match="bad.onnx: onnxruntime could not load it"):
        OrtBackend(bad)


def test_backend_threads_validation(tiny_onnx):
    _, p1, _ = tiny_onnx
    with pytest.raises(EdgeSRError, match="--threads"):
        OrtBackend(p1, threads=0)
    assert OrtBackend(p1).threads >= 1


def test_onnx_predictor_any_size(tiny_onnx):
    model, p1, _ = tiny_onnx
    pred = onnx_predictor(p1, threads=1)
    assert pred.scale == 2 and pred.name == "b1.onnx"
    x = torch.rand(1, 3, 21, 53, generator=torch.Generator().manual_seed(1))
    y = pred(x)
    assert y.shape == (1, 3, 42, 106) and y.dtype == torch.float32
    # A tile-sized input is one graph call: identical to torch on the same input.
    t = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        np.testing.assert_allclose(pred(t).numpy(), model(t).numpy(), atol=2e-4)
