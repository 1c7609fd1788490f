"""The baselines ``edge-sr profile --compare`` times next to an engine.

* ``ort_quantize_static``: what ONNX Runtime's own tool makes of the engine's FP32 graph, the
  graph a user would build instead of an edge-sr engine: ``quant_pre_process`` (ORT's documented
  pre-processing: shape inference and graph optimization), then ``quantize_static`` in QDQ format,
  QUInt8 activations, per-channel QInt8 weights, MinMax calibration, on the MatMul/Gemm/Conv ops.
  Calibration uses a few LR crops (one per image) from the training pool's calibration split
  (``edge_sr.data.pool.pool_split().calib``), never a benchmark set. The graph is cached in the
  user cache as ``$EDGE_SR_CACHE/ort_quantize_static/<key>.onnx`` (written atomically), keyed by
  the FP32 graph's SHA-256, the ORT version and these settings; the key is stored in the graph's
  ``metadata_props``, so a second ``profile --compare`` reuses it. It is kept out of the engine
  directory, which stays what a device needs: at a 320x180 frame the graph is ~77 MB (its
  pre-processing folds the attention masks into per-window constants), against the engine's
  ~1.4 MB. Where the cache is not writable it goes into the engine directory as
  ``ort_quantize_static.onnx``; one found there (earlier versions wrote it there) is used too.
* ``torch_eager_fp32``: the engine's FP checkpoint (``manifest.model``) in PyTorch eager FP32 on
  the CPU, under ``torch.inference_mode``, fed the engine's tiles (same shape, same batch, same
  tiling and blending as the engine).

Either baseline can be missing (no pool data and no cached graph; no checkpoint):
``BaselineUnavailable`` says why, and the profile skips that row with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_sr.checkpoints import cache_dir, load_model
from edge_sr.data.pool import load_pair, pool_split
from edge_sr.errors import EdgeSRError
from edge_sr.fileio import atomic_path, sha256_file
from runtime.backends.base import Backend, BackendInfo
from runtime.backends.onnxruntime import cpu_model

log = logging.getLogger(__name__)

STATIC_FILE = "ort_quantize_static.onnx"
STATIC_LABEL = "ort_quantize_static"
EAGER_LABEL = "torch_eager_fp32"
STATIC_PRECISION = "int8-qdq (ort quantize_static)"
OP_TYPES = ("MatMul", "Gemm", "Conv")
CALIB_PATCHES = 8
_META_KEY = "edge_sr.ort_quantize_static.key"
_META_INFO = "edge_sr.ort_quantize_static.info"


class BaselineUnavailable(EdgeSRError):
    """A comparison row cannot be made here (the reason is the message); the profile skips it."""


def static_settings() -> dict:
    """The ``quantize_static`` arguments used, as recorded in the cache key and the JSON."""
    return {"pre_process": "quant_pre_process (defaults)", "quant_format": "QDQ",
            "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True,
            "reduce_range": False, "calibrate_method": "MinMax",
            "op_types_to_quantize": list(OP_TYPES)}


def _graph_input(path: Path) -> tuple[str, int, bool]:
    """Input name, batch (1 where the batch dimension is symbolic) and whether the height and
    width are symbolic (a dynamic engine's graph) of an ONNX graph."""
    import onnx

    inp = onnx.load(str(path), load_external_data=False).graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    n = dims[0].dim_value
    return inp.name, int(n) if n > 0 else 1, any(d.dim_value <= 0 for d in dims[2:])


def calibration_tiles(tile: tuple[int, int], scale: int, n: int = CALIB_PATCHES,
                      seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` LR crops of ``tile`` (height, width) from distinct pool calibration images.

    The LR is the pool's (MATLAB bicubic of the mod-cropped HR at ``scale``), as the engine sees
    real input; images and crop positions come from ``seed``. Returns float32 (n, 3, h, w) in
    [0, 1] and the image names.
    """
    try:
        paths = pool_split().calib
    except EdgeSRError as e:
        raise BaselineUnavailable(f"no calibration data for quantize_static ({e})") from None
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(paths), size=n, replace=len(paths) < n)
    th, tw = tile
    out, names = np.empty((n, 3, th, tw), np.float32), []
    for i, k in enumerate(picks):
        pair = load_pair(paths[int(k)], scale)
        lr = pair.lr
        ph, pw = max(0, th - lr.shape[0]), max(0, tw - lr.shape[1])
        if ph or pw:
            lr = np.pad(lr, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        y = int(rng.integers(lr.shape[0] - th + 1))
        x = int(rng.integers(lr.shape[1] - tw + 1))
        out[i] = lr[y:y + th, x:x + tw].transpose(2, 0, 1) / 255.0
        names.append(pair.name)
    return out, names


def static_key(fp32_sha256: str, n_calib: int, seed: int) -> str:
    import onnxruntime as ort

    blob = json.dumps({"fp32_sha256": fp32_sha256, "onnxruntime": ort.__version__,
                       "settings": static_settings(), "calibration": {
                           "source": "pool_split().calib", "patches": n_calib, "seed": seed}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _cached_meta(path: Path) -> dict[str, str]:
    """A graph's metadata_props ({} when there is no file or it does not load)."""
    if not path.is_file():
        return {}
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a truncated or foreign file: rebuild it
        return {}
    return {p.key: p.value for p in model.metadata_props}


def quantize_static_graph(fp32_path: Path, out_path: Path, tiles: np.ndarray,
                          meta: dict[str, str] | None = None) -> Path:
    """``quant_pre_process`` + ``quantize_static`` of ``fp32_path`` calibrated on ``tiles``
    (N, 3, h, w), written atomically to ``out_path`` with ``meta`` in its metadata_props."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name, batch, dynamic = _graph_input(fp32_path)
    feeds = [tiles[i:i + batch] for i in range(0, len(tiles), batch)]
    feeds = [np.concatenate([f, np.repeat(f[-1:], batch - len(f), axis=0)])
             if len(f) < batch else f for f in feeds]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: np.ascontiguousarray(f)} for f in feeds])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="edge-sr-ortq-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        # ORT's symbolic shape inference cannot follow a dynamic graph's in-graph padding and
        # window sizes, and reads ONNX's Attention (opset 23) as its contrib Attention; ONNX's
        # own shape inference still runs
        fused = any(n.op_type == "Attention" and n.domain in ("", "ai.onnx")
                    for n in onnx.load(str(fp32_path), load_external_data=False).graph.node)
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=dynamic or fused)
        quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(OP_TYPES), per_channel=True,
                        reduce_range=False, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        model = onnx.load(str(q))
        for k, v in (meta or {}).items():
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
        with atomic_path(out_path) as t:
            onnx.save(model, str(t))
    return out_path


def ort_static_graph(eng, n_calib: int = CALIB_PATCHES, seed: int = 0) -> tuple[Path, dict]:
    """The engine's ``quantize_static`` baseline graph (cached) and what the JSON records of it."""
    fp32 = eng.file("fp32")
    fp32_sha = (eng.manifest.files.get("fp32") or {}).get("sha256") or sha256_file(fp32)
    key = static_key(fp32_sha, n_calib, seed)

    candidates = [cache_dir() / "ort_quantize_static" / f"{key}.onnx", eng.path / STATIC_FILE]
    info = {"graph": None, "key": key, "fp32_sha256": fp32_sha, "settings": static_settings(),
            "calibration": {"source": "pool_split().calib (training pool, no benchmark images)",
                            "patches": n_calib, "seed": seed, "tile": list(eng.manifest.tile)}}
    for c in candidates:
        meta = _cached_meta(c)
        if meta.get(_META_KEY) == key:
            log.info("quantize_static baseline: cached %s", c)
            try:  # the image names it was calibrated on
                info["calibration"] = json.loads(meta[_META_INFO])["calibration"]
            except (KeyError, ValueError, TypeError):
                pass
            return c, info | {"graph": str(c), "cached": True, "seconds": 0.0}
    t0 = time.perf_counter()
    tiles, names = calibration_tiles(tuple(eng.manifest.tile), eng.manifest.scale, n_calib, seed)
    info["calibration"]["images"] = names
    meta = {_META_KEY: key, _META_INFO: json.dumps(info, sort_keys=True)}
    log.info("quantize_static baseline: quantizing %s on %d pool crops", fp32.name, n_calib)
    for c in candidates:
        try:
            quantize_static_graph(fp32, c, tiles, meta)
        except OSError as e:  # e.g. a read-only engine directory: the user cache instead
            log.warning("quantize_static baseline: cannot write %s (%s)", c, e)
            continue
        secs = time.perf_counter() - t0
        log.info("quantize_static baseline: wrote %s (%.1f MB) in %.1f s", c,
                 c.stat().st_size / 1e6, secs)
        return c, info | {"graph": str(c), "cached": False, "seconds": round(secs, 2)}
    raise BaselineUnavailable("quantize_static baseline: no writable place for its graph "
                              f"(tried {', '.join(map(str, candidates))})")


class EagerBackend(Backend):
    """A torch SR module in eager FP32 on the CPU under ``torch.inference_mode``, as a
    ``Backend`` (so it is tiled and blended exactly like the engine; ``tile`` None: whole images,
    like a dynamic engine)."""

    def __init__(self, model, scale: int, tile: tuple[int, int] | None,
                 max_batch: int = 1) -> None:
        self.model, self.scale = model.eval(), int(scale)
        self.tile = None if tile is None else tuple(tile)
        self.max_batch = max(1, int(max_batch))

    def run(self, tiles: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
            return self.model(x).numpy()

    def info(self) -> BackendInfo:
        import torch


        return BackendInfo("pytorch-eager", f"CPU ({cpu_model()}, {torch.get_num_threads()} "
                           "threads)", "fp32")

    def close(self) -> None:
        self.model = None


def eager_model(manifest) -> tuple[object, dict]:
    """The engine's FP model (``manifest.model.path``, else its registered name) and what the
    JSON records of it; ``BaselineUnavailable`` when it cannot be found or read."""
    rec = manifest.model or {}
    tried, errors = [], []
    for ref in (rec.get("path"), rec.get("name")):
        if not ref or ref in tried:
            continue
        if ref == rec.get("path") and not os.path.isfile(ref):
            tried.append(ref)
            errors.append(f"{ref}: no such file")
            continue
        tried.append(ref)
        try:
            lm = load_model(ref, scale=manifest.scale)
        except EdgeSRError as e:
            errors.append(str(e))
            continue
        same = rec.get("sha256") in (None, lm.sha256)
        if not same:
            log.warning("torch eager baseline: %s is not the checkpoint the engine was built "
                        "from (SHA-256 differs); timing it anyway", lm.path)
        return lm.model, {"checkpoint": str(lm.path), "sha256": lm.sha256,
                          "matches_manifest": same, "arch": lm.arch}
    raise BaselineUnavailable("the engine's FP checkpoint was not found ("
                              + ("; ".join(errors) or "manifest.model names no path") + ")")
