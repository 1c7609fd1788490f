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
    """Runs an SR artifact on batches of LR tiles.

    ``run`` takes float32 NCHW tiles in [0, 1] of the artifact's input shape (batch may be smaller
    than ``max_batch``) and returns float32 NCHW SR tiles, ``scale`` times larger. A backend whose
    ``tile`` is None (a dynamic-shape graph) takes any size whose sides are multiples of
    ``pad_multiple`` and at least ``min_side``: ``runtime.tiling.run_tiled`` pads a whole image to
    that and runs it in one call.
    """

    scale: int
    tile: tuple[int, int] | None  # (height, width) of one LR tile; None: any size (dynamic)
    max_batch: int
    pad_multiple: int = 1  # dynamic backends: LR sides are padded up to a multiple of this
    min_side: int = 1  # dynamic backends: and to at least this

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
