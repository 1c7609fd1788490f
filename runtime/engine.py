"""Engine directories: ``engines/<name>/`` with the artifacts and a ``manifest.json``.

Layout::

    model.onnx        the deployable graph (QDQ for quantized engines)
    model_fp32.onnx   the full-precision graph at the same tile (or dynamic), for ``profile
                      --compare``
    model.engine      the TensorRT plan (trt engines only)
    model_fp32.engine the TensorRT plan of the FP graph (trt engines only, for --compare)
    manifest.json     what was built, from what, how well it scored, how long it took

``open_engine`` validates a directory before anything runs: a missing, corrupt or mismatched
engine (the manifest says x3, the user asks for x2; a file whose checksum changed) is an
``EdgeSRError`` naming the file and what was wrong.

A dynamic engine (``edge-sr build --dynamic``, ``Manifest.dynamic``) holds graphs with a symbolic
height and width: its ``tile`` is only the shape the export traced at, and every image runs
whole, in one call, padded to the model's ``size_requirements``. Manifests written before the
field existed read as fixed-shape engines (same ``FORMAT_VERSION``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edge_sr.errors import EdgeSRError
from edge_sr.fileio import sha256_file, write_json
from runtime.backends.onnxruntime import OrtBackend
from runtime.vocab import BACKENDS

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
FP32_FILE = "model_fp32.onnx"
TRT_FILE = "model.engine"
TRT_FP32_FILE = "model_fp32.engine"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    """Everything recorded about one engine (``manifest.json``)."""

    name: str
    model: dict  # name, path, sha256, arch, config of the FP checkpoint
    scale: int
    bits: int | None  # None: a full-precision engine
    backend: str  # "onnxruntime" or "tensorrt"
    tile: list[int]  # LR (height, width) of one tile (dynamic engines: the export's trace shape)
    batch: int  # tiles per call the graph takes
    overlap: int  # LR pixels neighbouring tiles share (0 and unused for dynamic engines)
    precision: str  # e.g. "w4a4-qdq", "fp32"
    files: dict[str, dict]  # role ("model", "fp32", "engine") -> {"path", "sha256", "bytes"}
    budget: str | None = None  # the DQC budget (calibrate.vocab.BUDGETS)
    method: str | None = None
    calibration: dict | None = None  # {"sha256", "key", "cached"}
    validation: dict | None = None  # PSNR / fidelity measured at build
    # build's quick speed check against the FP32 graph on the building machine
    # (runtime.profile.speed_check): engine_ms, fp32_ms, speed_vs_fp32, ...; None: not run
    speed: dict | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    build_config: dict | None = None  # the BuildConfig, to reproduce the build
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION
    # True: the graphs take any LR height and width (one call per image, no tiles)
    dynamic: bool = False
    # the model's SizeRequirements, {"multiple": m, "minimum": n}: a dynamic engine pads each
    # image's sides to at least n and a multiple of m (None in manifests that predate it)
    size_requirements: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | os.PathLike = "manifest") -> Manifest:
        if not isinstance(d, dict):
            raise EdgeSRError(f"{source}: expected a JSON object, found {type(d).__name__}")
        version = d.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise EdgeSRError(f"{source}: format_version {version!r} is newer than this edge-sr "
                              f"reads ({FORMAT_VERSION}); upgrade edge-sr or rebuild the engine")
        known = {f.name for f in fields(cls)}
        if "recipe" in d and "budget" not in d:  # manifests written before the rename
            d = {**d, "budget": d["recipe"]}
        required = {"name", "model", "scale", "bits", "backend", "tile", "batch", "overlap",
                    "precision", "files"}
        missing = sorted(required - d.keys())
        if missing:
            raise EdgeSRError(f"{source}: expected the keys {', '.join(missing)}, they are "
                              "missing (corrupt, or not an edge-sr engine manifest)")
        m = cls(**{k: v for k, v in d.items() if k in known})
        m._check(source)
        return m

    def _check(self, source) -> None:
        def bad(what: str, found) -> EdgeSRError:
            return EdgeSRError(f"{source}: expected {what}, found {found!r}")

        if not isinstance(self.scale, int) or self.scale < 1:
            raise bad("a positive integer scale", self.scale)
        if self.bits is not None and (not isinstance(self.bits, int) or self.bits < 1):
            raise bad("bits to be a positive integer or null", self.bits)
        if self.backend not in BACKENDS:
            raise bad(f"backend in {BACKENDS}", self.backend)
        if (not isinstance(self.tile, list | tuple) or len(self.tile) != 2
                or not all(isinstance(t, int) and t > 0 for t in self.tile)):
            raise bad("tile as [height, width]", self.tile)
        if not isinstance(self.dynamic, bool):
            raise bad("dynamic as true or false", self.dynamic)
        req = self.size_requirements
        if req is not None and (not isinstance(req, dict) or not all(
                isinstance(req.get(k), int) and req[k] > 0 for k in ("multiple", "minimum"))):
            raise bad("size_requirements as {'multiple': m, 'minimum': n}", req)
        if self.dynamic and req is None:
            raise bad("size_requirements for a dynamic engine", req)
        if self.dynamic and self.backend != "onnxruntime":
            raise bad("a dynamic engine on onnxruntime (TensorRT plans have fixed shapes)",
                      self.backend)
        if not isinstance(self.files, dict) or "model" not in self.files:
            raise bad("files with a 'model' entry", self.files)
        for role, f in self.files.items():
            if not isinstance(f, dict) or not isinstance(f.get("path"), str):
                raise bad(f"files.{role} as {{'path': ..., 'sha256': ...}}", f)
            if Path(f["path"]).is_absolute() or ".." in Path(f["path"]).parts:
                raise bad(f"files.{role}.path relative to the engine directory", f["path"])


def file_entry(engine_dir: Path, name: str) -> dict:
    """The manifest's record of one artifact: relative path, checksum, size."""
    p = engine_dir / name
    return {"path": name, "sha256": sha256_file(p), "bytes": p.stat().st_size}


def write_manifest(engine_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(engine_dir) / MANIFEST
    write_json(path, manifest.to_dict())
    return path


@dataclass
class Engine:
    """A validated engine directory."""

    path: Path
    manifest: Manifest

    def file(self, role: str) -> Path:
        entry = self.manifest.files.get(role)
        if entry is None:
            raise EdgeSRError(f"engine {self.path}: has no '{role}' artifact (its manifest lists "
                              f"{', '.join(sorted(self.manifest.files))})")
        return self.path / entry["path"]

    def backend(self, threads: int | None = None, fp32: bool = False):
        """A ``Backend`` running this engine (``fp32``: its full-precision graph instead)."""
        m = self.manifest
        if m.backend == "tensorrt":
            from runtime.backends.tensorrt import TensorRTBackend  # lazy: needs a GPU

            return TensorRTBackend(self.file("fp32_engine" if fp32 else "engine"))

        role = "fp32" if fp32 else "model"
        precision = "fp32" if fp32 else m.precision
        if m.dynamic:  # any size: no tile, each image padded to the model's multiple
            req = m.size_requirements
            return OrtBackend(self.file(role), threads=threads, tile=None, max_batch=m.batch,
                              precision=precision, scale=m.scale, pad_multiple=req["multiple"],
                              min_side=req["minimum"])
        return OrtBackend(self.file(role), threads=threads, tile=tuple(m.tile),
                          max_batch=m.batch, precision=precision)


def read_manifest(engine_dir: str | os.PathLike) -> Manifest:
    d = Path(engine_dir)
    if not d.exists():
        raise EdgeSRError(f"--engine {d}: no such directory; build one with "
                          f"`edge-sr build --bits 4 --scale 2 --out {d}`")
    if not d.is_dir():
        raise EdgeSRError(f"--engine {d}: expected an engine directory, found a file")
    path = d / MANIFEST
    if not path.is_file():
        raise EdgeSRError(f"--engine {d}: expected {MANIFEST} in it, found none (not an engine "
                          "directory, or a build that did not finish)")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeSRError(f"{path}: expected valid JSON, found a corrupt file ({e})") from None
    return Manifest.from_dict(data, source=path)


def open_engine(engine_dir: str | os.PathLike, scale: int | None = None,
                verify: bool = True) -> Engine:
    """Read and validate an engine directory; ``scale`` (if given) must match the manifest's.

    ``verify`` checks every artifact's size and SHA-256 against the manifest (milliseconds for
    SwinIR-light's ~1-4 MB graphs), so a truncated or swapped file is caught before it runs.
    """
    d = Path(engine_dir)
    m = read_manifest(d)
    if scale is not None and int(scale) != m.scale:
        raise EdgeSRError(f"--scale {scale}: engine {d} is an x{m.scale} engine (manifest.json "
                          f"says scale {m.scale}); build an x{scale} engine or drop --scale")
    for role, f in m.files.items():
        p = d / f["path"]
        if not p.is_file():
            raise EdgeSRError(f"engine {d}: expected {f['path']} ({role}) as its manifest "
                              "lists, found nothing")
        if verify and f.get("sha256") and sha256_file(p) != f["sha256"]:
            raise EdgeSRError(f"engine {d}: {f['path']} does not match the SHA-256 in "
                              f"{MANIFEST} (changed or corrupt); rebuild the engine")
    return Engine(d, m)
