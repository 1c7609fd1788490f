"""Everything evaluation can score (``edge_sr.evaluate.Predictor``), built from what the user
named (``make_predictor``): a torch model or a fake-quant calibration (``TorchPredictor``, whole
image), an ONNX file or an engine (``BackendPredictor``).

A backend runs one fixed tile shape; its predictor tiles any (1, 3, h, w) tensor through it with
``runtime.tiling.run_tiled``, so evaluation scores an ONNX file or an engine exactly like a torch
model. A dynamic-shape backend (``tile`` None: a ``build --dynamic`` engine, or an ONNX file
exported with ``--dynamic``) runs each image whole, in one padded call.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from calibrate.calibfile import load_calibrated
from edge_sr.checkpoints import load_model
from edge_sr.errors import EdgeSRError
from edge_sr.evaluate import Predictor
from runtime.backends.base import Backend, BackendInfo
from runtime.backends.onnxruntime import OrtBackend
from runtime.engine import open_engine
from runtime.tiling import run_tiled


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


class TorchBackend(Backend):
    """A torch SR module as a ``Backend``: the fake-quant or FP reference run through exactly
    the tiling (or, with ``tile`` None, the whole-image padding of a dynamic engine) an engine
    gets, so engine-vs-model differences are the export's alone."""

    def __init__(self, model: torch.nn.Module, scale: int, tile: tuple[int, int] | None,
                 max_batch: int = 1, precision: str = "torch", pad_multiple: int = 1,
                 min_side: int = 1) -> None:
        self.model, self.scale = model.eval(), int(scale)
        self.tile = None if tile is None else tuple(tile)
        self.max_batch, self.precision = max_batch, precision
        self.pad_multiple, self.min_side = pad_multiple, min_side

    @torch.no_grad()
    def run(self, tiles: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(tiles))).numpy()

    def info(self) -> BackendInfo:
        return BackendInfo("torch", f"CPU ({torch.get_num_threads()} threads)", self.precision)


class BackendPredictor:
    """Callable (1, 3, h, w) float tensor in [0, 1] -> (1, 3, h*s, w*s), tiled through a backend."""

    def __init__(self, backend: Backend, name: str, overlap: int | None = None,
                 info: dict | None = None) -> None:
        self.backend, self.name, self.overlap = backend, name, overlap
        self.scale = int(backend.scale)
        self.info = dict(info or {})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise ValueError(f"expected (1, 3, H, W) in [0, 1], got {tuple(x.shape)}")
        lr = x.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(run_tiled(self.backend, lr, overlap=self.overlap))

    def run_numpy(self, lr: np.ndarray, progress: bool = False) -> np.ndarray:
        """Same as calling, on a float32 (1, 3, h, w) or (3, h, w) array."""
        return run_tiled(self.backend, lr, overlap=self.overlap, progress=progress)

    def close(self) -> None:
        self.backend.close()


def onnx_predictor(path: str | os.PathLike, threads: int | None = None,
                   overlap: int | None = None) -> BackendPredictor:
    """An ONNX Runtime (CPU) predictor over an SR ONNX file: tiled at its fixed shape, or, for a
    dynamic-shape file, one call per image (which must then be at least the model's window)."""
    backend = OrtBackend(path, threads=threads)
    info = backend.info()
    return BackendPredictor(backend, name=Path(path).name, overlap=overlap,
                            info={"onnx": str(path), "device": info.device,
                                  "precision": info.precision})


def engine_predictor(engine_dir: str | os.PathLike, threads: int | None = None,
                     scale: int | None = None, fp32: bool = False) -> BackendPredictor:
    """A predictor over an engine directory (``runtime.engine``), validated first."""
    eng = open_engine(engine_dir, scale=scale)
    backend = eng.backend(threads=threads, fp32=fp32)
    return BackendPredictor(backend, name=eng.manifest.name + ("-fp32" if fp32 else ""),
                            overlap=eng.manifest.overlap, info={"engine": str(eng.path)})


def _check_scale(scale: int | None, found: int, source: str) -> None:
    if scale is not None and int(scale) != int(found):
        raise EdgeSRError(f"--scale {scale}: {source} is an x{found} model, so the scale must be "
                          f"{found} (or left out)")


def make_predictor(model=None, scale: int | None = None,
                   calibration: str | os.PathLike | None = None,
                   onnx: str | os.PathLike | None = None, threads: int | None = None,
                   device: str = "cpu", engine: str | os.PathLike | None = None) -> Predictor:
    """Build a predictor from a model (registry name, checkpoint path or ``nn.Module``), a
    calibration file (fake-quant student of ``model``), an ONNX file (ONNX Runtime, CPU) or an
    engine directory (``edge-sr build``'s, tiled as ``upscale`` runs it).

    ``scale`` defaults to the model's; a different one is an error. ``threads`` sets the intra-op
    threads of torch (here) or of the ONNX Runtime session.
    """
    if threads is not None:
        if threads < 1:
            raise EdgeSRError(f"--threads: expected a positive number of threads, got {threads}")
        if onnx is None:
            torch.set_num_threads(threads)
    if engine is not None:
        if model is not None or calibration is not None or onnx is not None:
            raise EdgeSRError("--engine: give either an engine directory or --model/"
                              "--calibration/--onnx, not both")
        pred = engine_predictor(engine, threads=threads, scale=scale)
        _check_scale(scale, pred.scale, f"engine {engine}")
        return pred
    if onnx is not None:
        if model is not None or calibration is not None:
            raise EdgeSRError("--onnx: give either an ONNX file or --model/--calibration, not both")
        pred = onnx_predictor(Path(onnx), threads=threads)
        _check_scale(scale, pred.scale, f"ONNX file {onnx}")
        return pred
    if calibration is not None:
        loaded = load_calibrated(Path(calibration), model=model)
        _check_scale(scale, loaded.meta.scale, f"calibration file {calibration}")
        return TorchPredictor(loaded.model.to(device), loaded.meta.scale,
                              name=f"{Path(calibration).name}",
                              info={"calibration": str(calibration)})
    if model is None:
        raise EdgeSRError("--model: expected a checkpoint name or path, got nothing")
    if isinstance(model, torch.nn.Module):
        found = int(model.scale)
        _check_scale(scale, found, "the model")
        recipe = getattr(model, "quant_recipe", None)  # a calibrated (fake-quant) student
        name = type(model).__name__ if recipe is None else \
            f"fake-quant W{recipe.bits}A{recipe.bits} {type(model).__name__}"
        return TorchPredictor(model.to(device), found, name=name)
    lm = load_model(model, scale=None, device=device)
    _check_scale(scale, lm.scale, f"checkpoint {lm.name}")
    return TorchPredictor(lm.model, lm.scale, name=lm.name,
                          info={"path": str(lm.path), "sha256": lm.sha256, "arch": lm.arch})
