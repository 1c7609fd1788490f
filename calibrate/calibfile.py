"""Calibration files: the learned bounds of every quantizer plus what they are valid for.

A file is ``torch.save`` of a small dict of plain Python values (loadable with
``weights_only=True``): format tag and version, ``bounds`` {quantizer name: (lower, upper)} and
``meta`` (bits, scale, method, recipe, the FP checkpoint's name, file sha256 and state checksum,
the calibration config, timings, versions). A per-channel quantizer's bounds are two lists of
floats. Files written before the recipe gained its options beyond the paper (rotation, per-channel
weights, per-site bits) carry no such keys and read as the faithful recipe they were made with.
When the weights were not rounded to nearest (GPTQ, ``meta.rounding``), the file also holds every
quantized linear's weight (``weights`` {module path: float32 tensor}), restored on loading. When
DQC trained the weights too (``meta.weights_trained``, ``DQCConfig.weight_lr > 0``; format
version 2) the file also holds their biases (``biases``), and with SmoothQuant smoothing
(``recipe.smooth``; version 2) each quantized linear's factors (``smoothing`` {module path:
(K,) tensor}). Version 1 files (neither) still read. Loading rebuilds the student from the FP checkpoint
and the stored recipe; the bit width comes from the recipe, and a file that disagrees with what
the caller asks for (bits, scale, recipe, checkpoint) is an error that names both (spec §7.13).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from calibrate.dobi import apply_bounds
from calibrate.prepare import QuantRecipe, prepare, quantizers
from calibrate.qmodules import QuantLinear
from edge_sr.errors import EdgeSRError
from edge_sr.fileio import atomic_path

FORMAT = "edge-sr-calibration"
VERSION = 2  # 2: trained weights and biases (meta.weights_trained), smoothing factors
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class CalibrationMeta:
    bits: int
    scale: int
    method: str
    recipe: dict  # QuantRecipe.to_dict()
    checkpoint_name: str
    checkpoint_sha256: str
    state_sha256: str  # checksum of the FP state dict (checks an in-memory model too)
    arch: str
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # timings, DQC history, chosen percentile, ...
    versions: dict = field(default_factory=dict)
    rounding: str = "nearest"  # weight rounding: "nearest" (paper) or "gptq" (weights stored)
    weights_trained: bool = False  # DQC trained the linears' weights and biases (both stored)

    @property
    def stores_weights(self) -> bool:
        return self.rounding != "nearest" or self.weights_trained

    @property
    def quant_recipe(self) -> QuantRecipe:
        return QuantRecipe(**self.recipe)


@dataclass
class CalibratedModel:
    model: nn.Module  # fake-quant SRModel in eval mode
    meta: CalibrationMeta

    @property
    def bounds(self) -> dict[str, tuple[float, float]]:
        return {n: q.bounds() for n, q in quantizers(self.model)}


def state_checksum(model: nn.Module) -> str:
    """sha256 over the FP model's state dict (names, dtypes, shapes and bytes, sorted by name)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def save_calibration(path: str | os.PathLike, student: nn.Module, meta: CalibrationMeta) -> Path:
    """Write ``student``'s bounds and ``meta`` atomically."""
    path = Path(path)
    obj = {"format": FORMAT, "version": VERSION, "meta": asdict(meta),
           "bounds": {n: q.bounds() for n, q in quantizers(student)}}
    linears = [(n, m) for n, m in student.named_modules() if isinstance(m, QuantLinear)]
    if meta.stores_weights:  # the weights are not the FP ones: store them
        obj["weights"] = {n: m.weight.detach().cpu().clone() for n, m in linears}
    if meta.weights_trained:
        obj["biases"] = {n: m.bias.detach().cpu().clone() for n, m in linears
                         if m.bias is not None}
    if meta.quant_recipe.smooth is not None:
        obj["smoothing"] = {n: m.smoothing.detach().cpu().clone() for n, m in linears}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def read_calibration(path: str | os.PathLike, with_weights: bool = False):
    """(bounds, meta) of a calibration file, checked for format and completeness; with
    ``with_weights``, (bounds, meta, tensors): {"weights": {linear: tensor}, "biases": {...},
    "smoothing": {...}}, each empty when the file has none."""
    path = Path(path)
    if not path.is_file():
        raise EdgeSRError(f"calibration file {path}: expected a file written by 'edge-sr "
                          "calibrate', found nothing there")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EdgeSRError(f"calibration file {path}: expected a file written by 'edge-sr "
                          f"calibrate' (a torch.save archive); it is not one, or it is truncated "
                          f"or corrupt ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = (type(obj).__name__ if not isinstance(obj, dict) else
                 "no format field (not a file 'edge-sr calibrate' wrote)" if "format" not in obj
                 else repr(obj["format"]))
        raise EdgeSRError(f"calibration file {path}: expected format {FORMAT!r}, found {found}")
    if obj.get("version") not in READABLE_VERSIONS:
        raise EdgeSRError(f"calibration file {path}: expected version "
                          f"{' or '.join(map(str, READABLE_VERSIONS))}, found "
                          f"{obj.get('version')}")
    names = {f.name for f in fields(CalibrationMeta)}
    meta = CalibrationMeta(**{k: v for k, v in obj["meta"].items() if k in names})
    weights = dict(obj.get("weights", {}))
    if meta.stores_weights and not weights:
        why = "trained by DQC" if meta.weights_trained else f"rounded by {meta.rounding}"
        raise EdgeSRError(f"calibration file {path}: its weights were {why} but are missing "
                          "from the file")
    smoothing = dict(obj.get("smoothing", {}))
    if meta.quant_recipe.smooth is not None and not smoothing:
        raise EdgeSRError(f"calibration file {path}: its recipe smooths the linear inputs but "
                          "the smoothing factors are missing from the file")
    tensors = {"weights": weights, "biases": dict(obj.get("biases", {})),
               "smoothing": smoothing}
    return (obj["bounds"], meta, tensors) if with_weights else (obj["bounds"], meta)


def _mismatch(path: Path, what: str, stored, asked) -> EdgeSRError:
    return EdgeSRError(f"calibration file {path} was made for {what} {stored}, but {what} "
                       f"{asked} was asked for")


def load_calibrated(path: str | os.PathLike, model=None, *, bits: int | None = None,
                    scale: int | None = None, recipe: QuantRecipe | None = None) -> CalibratedModel:
    """Rebuild the fake-quant student of a calibration file.

    ``model``: None (the checkpoint the file names), a registry name / checkpoint path, or an FP
    ``SRModel``; it must be the checkpoint the file was calibrated on. ``bits``, ``scale`` and
    ``recipe``, when given, must match the file.
    """
    path = Path(path)
    bounds, meta, tensors = read_calibration(path, with_weights=True)
    if bits is not None and bits != meta.bits:
        raise _mismatch(path, "bits", meta.bits, bits)
    if scale is not None and scale != meta.scale:
        raise _mismatch(path, "scale", meta.scale, scale)
    if recipe is not None and recipe.to_dict() != meta.quant_recipe.to_dict():
        raise _mismatch(path, "recipe", meta.quant_recipe.to_dict(), recipe.to_dict())
    if model is None or isinstance(model, (str, os.PathLike)):
        from edge_sr.checkpoints import load_model

        lm = load_model(model if model is not None else meta.checkpoint_name)
        if lm.sha256 != meta.checkpoint_sha256:
            raise EdgeSRError(
                f"calibration file {path} was made for checkpoint {meta.checkpoint_name} "
                f"(sha256 {meta.checkpoint_sha256[:12]}), but checkpoint {lm.name} "
                f"(sha256 {lm.sha256[:12]}) was given")
        fp = lm.model
    else:
        fp = model
        if state_checksum(fp) != meta.state_sha256:
            raise EdgeSRError(
                f"calibration file {path} was made for checkpoint {meta.checkpoint_name} "
                f"(state checksum {meta.state_sha256[:12]}), but the given model's weights "
                f"differ (checksum {state_checksum(fp)[:12]})")
    if int(fp.scale) != meta.scale:
        raise _mismatch(path, "scale", meta.scale, int(fp.scale))
    try:
        student = prepare(fp, meta.quant_recipe, tensors["smoothing"] or None)
        mods = dict(student.named_modules())
        stored = [(n, "weight", w) for n, w in tensors["weights"].items()] + \
                 [(n, "bias", b) for n, b in tensors["biases"].items()]
        for path_, attr, w in stored:
            lin = mods.get(path_)
            dst = getattr(lin, attr, None) if isinstance(lin, QuantLinear) else None
            if dst is None or dst.shape != w.shape:
                raise ValueError(f"stored {attr} {path_} {tuple(w.shape)} fits no quantized "
                                 "linear of the model")
            with torch.no_grad():
                dst.copy_(w)
        apply_bounds(student, {k: tuple(v) for k, v in bounds.items()})
    except (ValueError, KeyError) as e:
        raise EdgeSRError(f"calibration file {path}: its quantizers do not fit the model ({e})"
                          ) from None
    return CalibratedModel(student.eval(), meta)
