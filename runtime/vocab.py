"""The runtime vocabularies, each defined once (no heavy import: the CLI builds its choices here).

* ``BackendChoice``: what ``build --backend`` accepts; ``auto`` is TensorRT where a CUDA GPU and
  tensorrt are usable, else ONNX Runtime (``runtime.build.resolve_backend``).
* ``Backend``: what an engine manifest records.
* ``ENGINE_BITS``: the widths ``build --bits`` makes engines at (WbAb): the paper's 2, 3 and 4,
  and W8A8, the first deployment most users want. ``calibrate`` takes any width from 2 to 8.
"""

from __future__ import annotations

from typing import Literal, get_args

BackendChoice = Literal["auto", "ort", "trt"]
BACKEND_CHOICES: tuple[str, ...] = get_args(BackendChoice)
Backend = Literal["onnxruntime", "tensorrt"]
BACKENDS: tuple[str, ...] = get_args(Backend)
ENGINE_BITS: tuple[int, ...] = (2, 3, 4, 8)
