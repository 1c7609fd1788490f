"""Tiling maths, and tiled inference against whole-image inference."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backends.base import Backend, BackendInfo
from runtime.tiling import TilePlan, axis_starts, pad_to_min, ramp_weights, run_tiled


class NearestBackend(Backend):
    """A pointwise 'SR' (nearest upsampling, a fixed affine map): tiling must be invisible."""

    def __init__(self, tile=(16, 16), scale=2, max_batch=1):
        self.tile, self.scale, self.max_batch = tile, scale, max_batch
        self.calls = []

    def run(self, tiles):
        assert tiles.shape[1:] == (3, *self.tile) and tiles.shape[0] <= self.max_batch
        self.calls.append(tiles.shape[0])
        return np.repeat(np.repeat(tiles, self.scale, 2), self.scale, 3) * 0.5 + 0.25

    def info(self):
        return BackendInfo("test", "cpu", "fp32")


@pytest.mark.parametrize("length,tile,overlap,expected", [
    (64, 64, 16, [0]),
    (100, 64, 16, [0, 36]),
    (112, 64, 16, [0, 48]),
    (113, 64, 16, [0, 24, 49]),
    (10, 4, 0, [0, 3, 6]),
])
def test_axis_starts_exact(length, tile, overlap, expected):
    assert axis_starts(length, tile, overlap) == expected


@pytest.mark.parametrize("length", range(16, 140, 7))
@pytest.mark.parametrize("tile,overlap", [(16, 0), (16, 4), (32, 8), (16, 15)])
def test_axis_starts_cover_with_overlap(length, tile, overlap):
    if length < tile:
        return
    s = axis_starts(length, tile, overlap)
    assert s[0] == 0 and s[-1] + tile == length
    gaps = np.diff(s)
    assert np.all(gaps > 0)
    assert np.all(tile - gaps >= overlap)  # neighbours share at least `overlap`
    if len(s) > 2:  # no more tiles than needed: one fewer would need a longer stride
        assert (length - tile) / (len(s) - 2) > tile - overlap


def test_axis_starts_errors():
    with pytest.raises(ValueError, match="smaller than the tile"):
        axis_starts(10, 16, 4)
    with pytest.raises(ValueError, match="overlap < tile"):
        axis_starts(64, 16, 16)


def test_ramp_weights():
    np.testing.assert_allclose(ramp_weights(6, 2, True, False), [0.25, 0.75, 1, 1, 1, 1])
    np.testing.assert_allclose(ramp_weights(6, 2, False, True), [1, 1, 1, 1, 0.75, 0.25])
    np.testing.assert_allclose(ramp_weights(4, 0, True, True), [1, 1, 1, 1])
    assert ramp_weights(8, 4, True, True).min() > 0


def test_pad_to_min_mirrors():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    y = pad_to_min(x, 5, 9)
    assert y.shape == (1, 5, 9)
    np.testing.assert_array_equal(y[0, :3, :4], x[0])
    np.testing.assert_array_equal(y[0, 3], x[0, 2, [0, 1, 2, 3, 3, 2, 1, 0, 0]])  # symmetric
    assert pad_to_min(x, 2, 2) is x


def test_plan_weights_positive_everywhere():
    plan = TilePlan.make(50, 70, (16, 16), 4)
    acc = np.zeros((100, 140))
    for y, x in plan.boxes():
        acc[2 * y:2 * (y + 16), 2 * x:2 * (x + 16)] += plan.weight(y, x, 2)
    assert acc.min() > 0
    assert len(plan) == len(plan.ys) * len(plan.xs) == 4 * 6


@pytest.mark.parametrize("h,w", [(16, 16), (37, 50), (9, 70), (5, 5), (64, 33)])
@pytest.mark.parametrize("batch", [1, 3])
def test_run_tiled_is_seamless(h, w, batch):
    rng = np.random.default_rng(h * w)
    x = rng.random((3, h, w), dtype=np.float32)
    be = NearestBackend(max_batch=batch)
    out = run_tiled(be, x, overlap=4)
    ref = np.repeat(np.repeat(x, 2, 1), 2, 2) * 0.5 + 0.25
    assert out.shape == (1, 3, 2 * h, 2 * w)
    np.testing.assert_allclose(out[0], ref, atol=1e-6)
    assert max(be.calls) <= batch


def test_run_tiled_rejects_bad_shapes():
    with pytest.raises(ValueError, match="3, H, W"):
        run_tiled(NearestBackend(), np.zeros((4, 20, 20), np.float32))
    with pytest.raises(ValueError, match="one image"):
        run_tiled(NearestBackend(), np.zeros((2, 3, 20, 20), np.float32))


@pytest.mark.slow
def test_tiled_fp_graph_matches_whole_image_psnr(data_root, tmp_path):
    """The real x2 reference model as a 64x64 ONNX graph, tiled (overlap 16), scores within
    0.05 dB of whole-image PyTorch inference (one Set5 image here for time; all of Set5/Set14 are
    measured by benchmarks/latency.py --tiling, see docs/results/runtime.md)."""
    import torch

    from edge_sr.checkpoints import load_model
    from edge_sr.data import load_benchmark
    from edge_sr.data.images import to_tensor, to_uint8
    from edge_sr.metrics import psnr_y
    from edge_sr.onnx_export import export_fp_onnx
    from runtime.backends.onnxruntime import OrtBackend

    lm = load_model("swinir-light-x2-ref", scale=2)
    path = export_fp_onnx(lm.model, tmp_path / "fp.onnx", tile=(64, 64))
    be = OrtBackend(path, threads=2)
    pairs = [p for p in load_benchmark("Set5", 2) if p.name == "butterfly"]
    assert len(pairs) == 1
    for p in pairs:
        x = to_tensor(p.lr)
        with torch.no_grad():
            whole = psnr_y(to_uint8(lm.model(x)), p.hr, 2)
        tiled = psnr_y(to_uint8(torch.from_numpy(run_tiled(be, x.numpy(), overlap=16))), p.hr, 2)
        assert abs(tiled - whole) < 0.05, (p.name, tiled, whole)
        assert whole > 25  # a real model, not a broken one


def test_dynamic_backend_runs_each_image_whole(tiny_swinir, tmp_path, one_thread):
    """A dynamic-shape graph (tile None): one call per image, padded only to the window (8),
    cropped back, equal to the PyTorch model on the whole image; no tiles, no blending."""
    import torch

    from edge_sr.onnx_export import export_fp_onnx
    from runtime.backends.onnxruntime import OrtBackend
    from runtime.tiling import dynamic_shape

    model = tiny_swinir(2, depths=(2,), num_heads=(2,))
    path = export_fp_onnx(model, tmp_path / "dyn.onnx", tile=(16, 16), dynamic=True)
    backend = OrtBackend(path, threads=1, pad_multiple=8, min_side=8)
    assert backend.tile is None and backend.scale == 2  # scale found by a probe run
    calls = []
    run = backend.run
    backend.run = lambda t: calls.append(t.shape) or run(t)
    for hw in [(16, 24), (20, 36), (3, 4)]:
        x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(hw[1]))
        with torch.no_grad():
            ref = model(x).numpy()
        out = run_tiled(backend, x.numpy())
        assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4, hw
        assert calls[-1] == (1, 3, *dynamic_shape(*hw, 8, 8))
    assert len(calls) == 3  # one call per image
    assert dynamic_shape(20, 36, 8, 8) == (24, 40) and dynamic_shape(3, 4, 8, 8) == (8, 8)


def test_redirected_runs_log_their_progress(monkeypatch, caplog):
    """Without a progress bar (a redirected log) a long tiled image logs a line now and then."""
    import logging

    import runtime.tiling as tiling

    monkeypatch.setattr(tiling, "progress_disabled", lambda: True)
    monkeypatch.setattr(tiling, "LOG_EVERY_S", 0.0)
    x = np.zeros((3, 40, 40), np.float32)
    with caplog.at_level(logging.INFO, logger="runtime.tiling"):
        run_tiled(NearestBackend(), x, overlap=4, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tiles:")]
    assert lines and lines[-1].startswith("tiles: ") and " of " in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runtime.tiling"):
        run_tiled(NearestBackend(), x, overlap=4, progress=False)  # quiet unless asked
    assert not caplog.records
