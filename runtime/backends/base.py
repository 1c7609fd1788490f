"""The one interface every inference backend implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BackendInfo:
    name: str  # "onnxruntime", "tensorrt", "cuda"
    device: str  # e.g. "CPU (AMD EPYC 9B14, 2 threads)" or "NVIDIA H100"
    precision: str  # e.g. "fp32", "w4a4-qdq", "fp16"


class Backend(abc.ABC):
    """Runs a fixed-shape SR artifact on batches of LR tiles.

    ``run`` takes float32 NCHW tiles in [0, 1] of the artifact's input shape (batch may be smaller
    than ``max_batch``) and returns float32 NCHW SR tiles, ``scale`` times larger.
    """

    scale: int
    tile: tuple[int, int]  # (height, width) of one LR tile
    max_batch: int

    @abc.abstractmethod
    def run(self, tiles: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def info(self) -> BackendInfo: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
