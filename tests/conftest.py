"""Shared fixtures: a tiny random SwinIR-light factory and the shared data folder.

Tests never download: ``EDGE_SR_OFFLINE=1`` is set for the whole session. They never read or
write the user's cache either: ``$EDGE_SR_CACHE`` is unset and ``$XDG_CACHE_HOME`` points at a
folder of the session's own, from the moment this file is imported (test modules that compile
the fake-quant kernels while they are collected write there too).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from edge_sr.allocator import keep_freed_memory
from edge_sr.models.swinir import SwinIRLight
from edge_sr.paths import data_root as _data_root

os.environ["EDGE_SR_OFFLINE"] = "1"
os.environ.pop("EDGE_SR_CACHE", None)  # the user's cache stays out of reach (module docstring)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="edge-sr-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)
keep_freed_memory()  # the suite's big CPU forwards skip glibc's mmap/page-fault round trips


def perturb_parameters(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every parameter (default init hides mistakes); return it in eval mode."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if "relative_position_bias_table" in name else 0.05
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def assert_logits_in_place_change_nothing(model: torch.nn.Module, x: torch.Tensor, module,
                                          monkeypatch) -> None:
    """``model``'s output and input gradient with its attention logits updated in place (the
    default wherever autograd does not need the bias table) are bitwise those with
    ``module.logits_in_place`` forced off (out-of-place ops). Parameters are frozen first."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def run():
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.pow(2).sum().backward()
        return y.detach(), xi.grad

    in_place = run()
    monkeypatch.setattr(module, "logits_in_place", lambda *params: False)
    out_of_place = run()
    assert torch.equal(in_place[0], out_of_place[0])
    assert torch.equal(in_place[1], out_of_place[1])


def make_tiny_swinir(scale: int = 2, seed: int = 0, embed_dim: int = 12,
                     depths: tuple[int, ...] = (2, 2), num_heads: tuple[int, ...] = (2, 2),
                     window_size: int = 8, mlp_ratio: float = 2.0) -> SwinIRLight:
    """A small SwinIR-light in eval mode with seeded, non-trivial weights.

    The default init leaves biases at 0, LayerNorms at identity and position biases near 0, which
    would hide mistakes in those paths; every parameter gets seeded noise on top.
    """
    torch.manual_seed(seed)
    model = SwinIRLight(scale, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                        window_size=window_size, mlp_ratio=mlp_ratio)
    return perturb_parameters(model, seed)


def make_outlier_swinir(**config) -> SwinIRLight:
    """A tiny SwinIR-light whose first fc1 input has one huge channel (the post-norm NGswin
    case): the same FP function, with LayerNorm gain 30 on channel 3 and fc1's column 3 / 30."""
    fp = make_tiny_swinir(2, **config)
    blk = fp.layers[0].residual_group.blocks[0]
    with torch.no_grad():
        blk.norm2.weight[3] = 30.0
        blk.mlp.fc1.weight[:, 3] /= 30.0
    return fp


def file_and_export_roundtrip(student, fp, meta, path: Path, target: str = "ort"):
    """Save ``student`` with ``meta`` to ``path``, load it back on ``fp`` and export it to QDQ
    ONNX for ``target``. Asserts the reloaded student equals ``student`` bit for bit and the ONNX
    Runtime output is within 1e-4 of it (one 16x16 input). Returns (reloaded, proto)."""
    from calibrate.calibfile import load_calibrated, save_calibration
    from calibrate.export.ortcheck import make_session
    from calibrate.export_qdq import ExportConfig, build_qdq

    back = load_calibrated(save_calibration(path, student, meta), fp)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = student(x)
        assert torch.equal(back.model(x), ref)
    proto, _ = build_qdq(back.model, ExportConfig(target=target, tile=(16, 16)))
    out = make_session(proto, threads=1).run(None, {"lr": x.numpy()})[0]
    assert abs(out - ref.numpy()).max() < 1e-4
    return back, proto


@pytest.fixture
def tiny_swinir() -> Callable[..., SwinIRLight]:
    """Factory: ``tiny_swinir(scale=2, seed=0, **config)`` -> a seeded tiny SwinIR-light."""
    return make_tiny_swinir


@pytest.fixture
def data_root() -> Path:
    """The shared data folder; skips the test when it is not available."""
    root = _data_root(required=False)
    if root is None:
        pytest.skip("shared data not found (set EDGE_SR_DATA)")
    return root


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: on a loaded 2-core CI box, extra threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_engine(d: Path, dynamic: bool = False) -> Path:
    """A real ONNX Runtime engine in ``d``: a tiny random SwinIR-light exported at 16x16
    (``dynamic``: with a symbolic height and width, as ``build --dynamic`` makes it)."""
    from edge_sr.onnx_export import export_fp_onnx
    from runtime.engine import FP32_FILE, MODEL_FILE, Manifest, file_entry, write_manifest

    d.mkdir(parents=True, exist_ok=True)
    model = make_tiny_swinir(2)
    export_fp_onnx(model, d / MODEL_FILE, tile=(16, 16), dynamic=dynamic)
    export_fp_onnx(model, d / FP32_FILE, tile=(16, 16), dynamic=dynamic)
    req = model.size_requirements
    write_manifest(d, Manifest(name="tiny", model={"name": "tiny"}, scale=2, bits=None,
                               backend="onnxruntime", tile=[16, 16], batch=1,
                               overlap=0 if dynamic else 4,
                               precision="fp32", files={"model": file_entry(d, MODEL_FILE),
                                                        "fp32": file_entry(d, FP32_FILE)},
                               dynamic=dynamic,
                               size_requirements={"multiple": req.multiple,
                                                  "minimum": req.minimum}))
    return d
