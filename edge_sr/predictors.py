"""What evaluation runs: anything that upscales a (1, 3, h, w) tensor in [0, 1] by ``scale``.

Evaluation, benchmarks and the CLI see only the ``Predictor`` protocol, so a full-precision torch
model, a fake-quant calibrated model and an ONNX Runtime session are scored by the same code.
``make_predictor`` builds one from what the user named.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from edge_sr.errors import EdgeSRError


@runtime_checkable
class Predictor(Protocol):
    """``predictor(x)`` maps (1, 3, h, w) float32 in [0, 1] to (1, 3, h*scale, w*scale)."""

    scale: int
    name: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class TorchPredictor:
    """A torch ``nn.Module`` run whole-image under ``no_grad`` (the model pads internally)."""

    def __init__(self, model: torch.nn.Module, scale: int, name: str,
                 info: dict | None = None) -> None:
        self.model, self.scale, self.name = model.eval(), int(scale), name
        self.info = dict(info or {})  # provenance (path, sha256, arch, calibration), for JSON
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device)).cpu()


def _optional(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise EdgeSRError(f"{what}: {module} is not available yet in this edge-sr") from None
        raise


def _check_scale(scale: int | None, found: int, source: str) -> None:
    if scale is not None and int(scale) != int(found):
        raise EdgeSRError(f"--scale {scale}: {source} is an x{found} model, so the scale must be "
                          f"{found} (or left out)")


def make_predictor(model=None, scale: int | None = None,
                   calibration: str | os.PathLike | None = None,
                   onnx: str | os.PathLike | None = None, threads: int | None = None,
                   device: str = "cpu") -> Predictor:
    """Build a predictor from a model (registry name, checkpoint path or ``nn.Module``), a
    calibration file (fake-quant student of ``model``) or an ONNX file (ONNX Runtime, CPU).

    ``scale`` defaults to the model's; a different one is an error. ``threads`` sets the intra-op
    threads of torch (here) or of the ONNX Runtime session.
    """
    if threads is not None:
        if threads < 1:
            raise EdgeSRError(f"--threads: expected a positive number, got {threads}")
        if onnx is None:
            torch.set_num_threads(threads)
    if onnx is not None:
        if model is not None or calibration is not None:
            raise EdgeSRError("--onnx: give either an ONNX file or --model/--calibration, not both")
        rp = _optional("runtime.predictors", f"--onnx {onnx}")
        pred = rp.onnx_predictor(Path(onnx), threads=threads)
        _check_scale(scale, pred.scale, f"ONNX file {onnx}")
        return pred
    if calibration is not None:
        cf = _optional("calibrate.calibfile", f"--calibration {calibration}")
        loaded = cf.load_calibrated(Path(calibration), model=model)
        _check_scale(scale, loaded.meta.scale, f"calibration file {calibration}")
        return TorchPredictor(loaded.model.to(device), loaded.meta.scale,
                              name=f"{Path(calibration).name}",
                              info={"calibration": str(calibration)})
    if model is None:
        raise EdgeSRError("--model: expected a checkpoint name or path, got nothing")
    if isinstance(model, torch.nn.Module):
        found = int(model.scale)
        _check_scale(scale, found, "the model")
        return TorchPredictor(model.to(device), found, name=type(model).__name__)
    from edge_sr.checkpoints import load_model

    lm = load_model(model, scale=None, device=device)
    _check_scale(scale, lm.scale, f"checkpoint {lm.name}")
    return TorchPredictor(lm.model, lm.scale, name=lm.name,
                          info={"path": str(lm.path), "sha256": lm.sha256, "arch": lm.arch})
