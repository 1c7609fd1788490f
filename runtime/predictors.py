"""``Predictor``s (see ``edge_sr.predictors``) over fixed-shape runtime artifacts.

A backend runs one fixed tile shape; the predictor tiles any (1, 3, h, w) tensor through it with
``runtime.tiling.run_tiled``, so evaluation scores an ONNX file or an engine exactly like a torch
model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from runtime.backends.base import Backend, BackendInfo
from runtime.tiling import run_tiled


class TorchBackend(Backend):
    """A torch SR module as a fixed-tile ``Backend``: the fake-quant or FP reference run through
    exactly the tiling an engine gets, so engine-vs-model differences are the export's alone."""

    def __init__(self, model: torch.nn.Module, scale: int, tile: tuple[int, int],
                 max_batch: int = 1, precision: str = "torch") -> None:
        self.model, self.scale, self.tile = model.eval(), int(scale), tuple(tile)
        self.max_batch, self.precision = max_batch, precision

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
    """An ONNX Runtime (CPU) predictor over a fixed-shape SR ONNX file."""
    from runtime.backends.onnxruntime import OrtBackend

    backend = OrtBackend(path, threads=threads)
    info = backend.info()
    return BackendPredictor(backend, name=Path(path).name, overlap=overlap,
                            info={"onnx": str(path), "device": info.device,
                                  "precision": info.precision})


def engine_predictor(engine_dir: str | os.PathLike, threads: int | None = None,
                     scale: int | None = None, fp32: bool = False) -> BackendPredictor:
    """A predictor over an engine directory (``runtime.engine``), validated first."""
    from runtime.engine import open_engine

    eng = open_engine(engine_dir, scale=scale)
    backend = eng.backend(threads=threads, fp32=fp32)
    return BackendPredictor(backend, name=eng.manifest.name + ("-fp32" if fp32 else ""),
                            overlap=eng.manifest.overlap, info={"engine": str(eng.path)})
