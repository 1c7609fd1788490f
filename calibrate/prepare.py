"""Turn an FP ``SRModel`` into its fake-quant student, from a ``QuantRecipe``.

The model lists its own quantization points (``SRModel.quant_points``); nothing here knows about
SwinIR or NGswin. Phases are explicit calls: ``prepare`` -> DOBI -> DQC -> save; no quantizer
changes state on its first forward.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from calibrate.qmodules import QuantConv2d, QuantLinear
from calibrate.quantizer import BoundFakeQuantizer, check_bits
from calibrate.rotation import random_hadamard
from calibrate.vocab import (
    DEPLOY_GRIDS,
    FP_WEIGHTS,
    SITE_KINDS,
    WEIGHT_GRIDS,
    FPWeights,
    Grid,
    WeightGrid,
    expected,
)
from edge_sr.errors import EdgeSRError
from edge_sr.models.base import QuantPoint, SRModel

LINEAR_ROLES = ("qkv", "proj", "fc1", "fc2")
WIDE_BITS = 8  # bit width of the ``wide_inputs`` quantizers
# DEPLOY_GRIDS (calibrate.vocab), the engine a grid is made for (beyond the paper): "real" keeps
# the paper's real-valued zero points (exact export with correction terms); "ort" and "trt" put
# 0 on every grid so that export is plain Q/DQ (``quantizer_grid`` gives each quantizer's kind).
# FP_WEIGHTS: how the weights that stay in floating point (convolutions, position-bias tables,
# unquantized linears) are held: float32 (the paper), or rounded to FP16 values in the student so
# that the engine stores them in half the bytes and still runs exactly what was calibrated.
# "int8" / "int4" go further for the convolutions and linears among them (weight-only, see
# ``quantize_kept_weights``); the layers that read or write image channels stay FP16. "auto"
# holds each of those layers at INT4 or INT8 by its measured held-out sensitivity
# (``calibrate.site_choice.choose_kept_int4``; the recipe's ``kept_int4``).
FP16_MIN_NUMEL = 256  # smaller tensors (biases, norms, scalars) stay float32 either way
KEPT_WEIGHT_BITS = {"int8": 8, "int4": 4, "auto": 8}  # auto: INT4 for recipe.kept_int4
KEPT_CLIP_RATIOS = tuple(np.linspace(0.5, 1.0, 26))  # per-channel clip candidates (least squares)


def quantizer_grid(deploy: str, weight: bool, bits: int) -> str:
    """A quantizer's grid kind for a deployment grid: weights are symmetric (signed codes, zero
    point 0) on both engines; activations have an integer zero point (uint8 for ORT; for
    TensorRT the codes ``k - z`` live in int8 with zero point 0, which at 8 bits forces
    ``z = 128``, a symmetric grid)."""
    if deploy == "real":
        return "real"
    if weight or (deploy == "trt" and bits == 8):
        return "symmetric"
    return "integer"


def _check_linear_sites(option: str, entries: tuple[str, ...]) -> None:
    """Entries are linear roles ("fc1") or module paths of linears ("...blocks.3.ffn.fc1")."""
    bad = [e for e in entries if e not in LINEAR_ROLES
           and e.rpartition(".")[2] not in LINEAR_ROLES]
    if bad:
        raise ValueError(f"--{option}: unknown linear roles {sorted(bad)}; expected some of "
                         f"{', '.join(LINEAR_ROLES)} (or module paths of such linears)")


def _matches(point: QuantPoint, entries: tuple[str, ...]) -> bool:
    return point.role in entries or point.name in entries


@dataclass(frozen=True)
class QuantRecipe:
    """What gets quantized and how its bounds are searched.

    ``search_assignment``: ``"paper"`` searches softmax and post-GELU tensors one-sided (Fig. 2);
    ``"released"`` reproduces the released code, two-sided everywhere (spec §3, §7.1).
    ``qkv_separation``: three input quantizers for q, k, v (paper) or one shared (deployment).
    ``wide_inputs``: linear roles (``"fc1"``, ``"qkv"``, ...) or linear module paths whose
    *input* quantizer runs at ``WIDE_BITS`` instead of ``bits``; an option beyond the paper
    (empty = the paper). Post-norm models such as NGswin feed fc1 the raw residual stream, whose
    range grows to ~1000 in the decoder; one per-tensor 4-bit grid cannot hold it
    (docs/results/ngswin_accuracy.md).

    Also beyond the paper (defaults = the paper):

    * ``rotate``: linear roles or module paths whose input is rotated by a randomised Hadamard
      matrix (``calibrate.rotation``; seeded by ``rotation_seed``), folded into the weight. A
      rotated input is bell-shaped, so its DOBI search is two-sided.
    * ``weight_grid``: ``"tensor"`` (one grid per weight block, the paper) or ``"channel"`` (one
      per output channel).
    * ``grid``: ``"real"`` (the paper's real-valued zero points), ``"ort"`` or ``"trt"``: the
      grids that engine runs natively, searched by DOBI and learned by DQC under that
      constraint (``DEPLOY_GRIDS``, ``quantizer_grid``).
    * ``fp_sites``: kinds of site (``SITE_KINDS``) left in floating point in the student, so
      also in the engine and in every reported PSNR (empty = the paper: all quantized).
    * ``fp_weights``: ``"fp16"`` rounds every floating-point weight that is not quantized (of at
      least ``FP16_MIN_NUMEL`` elements and two axes) to FP16 before calibration; the exports
      then store it as FP16 (``edge_sr.onnx_tidy.store_fp16``), bit-exact to the student.
      ``"int8"`` / ``"int4"`` also make the convolutions and linears among them weight-only
      integer grids (``quantize_kept_weights``; image layers stay FP16), stored as codes.
      ``"auto"``: the layers in ``kept_int4`` at INT4, the rest INT8 (``kept_int4`` is filled
      on held-out data by ``calibrate.site_choice.choose_kept_int4``; empty: all INT8).
    * ``smooth``: SmoothQuant's migration strength alpha in [0, 1]; every quantized linear's input
      is divided per channel by factors measured on calibration data
      (``calibrate.smoothing``), which ``prepare`` then takes as its ``smoothing`` argument.
    * ``quant_conv``: the model's body convolutions (``SRModel.body_convs``: SwinIR-light's RSTB
      convolutions and ``conv_after_body``) become ``QuantConv2d``: 8-bit input, per-channel
      weight and output grids (``WIDE_BITS``, whatever ``bits`` is: ORT's ``QLinearConv`` runs
      8-bit codes either way, and 4-bit inputs there cost 1.7 dB held-out on SwinIR-light).
      Needs ``grid="ort"``.
    """

    bits: int = 4
    qkv_separation: bool = True
    search_assignment: Literal["paper", "released"] = "paper"
    wide_inputs: tuple[str, ...] = ()
    rotate: tuple[str, ...] = ()
    rotation_seed: int = 0
    weight_grid: WeightGrid = "tensor"
    grid: Grid = "real"
    fp_weights: FPWeights = "fp32"
    fp_sites: tuple[str, ...] = ()
    smooth: float | None = None
    kept_int4: tuple[str, ...] = ()
    quant_conv: bool = False

    def __post_init__(self) -> None:
        try:
            check_bits(self.bits)
        except ValueError as e:
            raise ValueError(f"--bits: {e}") from None
        object.__setattr__(self, "wide_inputs", tuple(self.wide_inputs))
        object.__setattr__(self, "rotate", tuple(self.rotate))
        object.__setattr__(self, "fp_sites", tuple(self.fp_sites))
        object.__setattr__(self, "kept_int4", tuple(self.kept_int4))
        if bad := sorted(set(self.fp_sites) - set(SITE_KINDS)):
            raise ValueError(f"--fp-sites: unknown site kinds {bad}; expected some of "
                             f"{', '.join(SITE_KINDS)}")
        _check_linear_sites("wide-inputs", self.wide_inputs)
        _check_linear_sites("rotate", self.rotate)
        if self.search_assignment not in ("paper", "released"):
            raise ValueError(
                f"search_assignment must be 'paper' or 'released', got {self.search_assignment!r}"
            )
        if self.weight_grid not in WEIGHT_GRIDS:
            raise ValueError(expected("--weight-grid", WEIGHT_GRIDS, self.weight_grid))
        if self.grid not in DEPLOY_GRIDS:
            raise ValueError(expected("--grid", DEPLOY_GRIDS, self.grid))
        if self.fp_weights not in FP_WEIGHTS:
            raise ValueError(expected("--fp-weights", FP_WEIGHTS, self.fp_weights))
        if self.kept_int4 and self.fp_weights != "auto":
            raise ValueError("kept_int4 names INT4 kept layers, which only --fp-weights auto "
                             f"uses (got --fp-weights {self.fp_weights})")
        if self.quant_conv and self.grid != "ort":
            raise ValueError(f"--quant-conv: the convolutions run as ONNX Runtime's QLinearConv, "
                             f"so they need --grid ort, got --grid {self.grid}")
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"--smooth: expected a migration strength from 0 to 1 (or none), "
                             f"got {self.smooth}")

    @property
    def faithful(self) -> bool:
        """Whether this is the paper's quantizer set-up (no option beyond it)."""
        return not (self.wide_inputs or self.rotate or self.weight_grid != "tensor"
                    or self.grid != "real" or self.fp_weights != "fp32" or self.fp_sites
                    or self.smooth is not None or self.quant_conv)

    def rotated(self, point: QuantPoint) -> bool:
        return point.kind == "linear" and _matches(point, self.rotate)

    def quantized(self, point: QuantPoint) -> bool:
        """Whether ``point`` gets a quantizer (not kept in floating point by ``fp_sites``)."""
        return not any(point.role in SITE_KINDS[k] for k in self.fp_sites)

    def search_for(self, point: QuantPoint) -> str:
        if self.search_assignment == "paper" and point.long_tailed_input \
                and not self.rotated(point):
            return "one_sided"
        return "two_sided"

    def input_bits(self, point: QuantPoint | str) -> int:
        if isinstance(point, str):  # a role
            return WIDE_BITS if point in self.wide_inputs else self.bits
        return WIDE_BITS if _matches(point, self.wide_inputs) else self.bits

    def to_dict(self) -> dict:
        d = asdict(self)
        d["wide_inputs"] = list(self.wide_inputs)
        d["rotate"] = list(self.rotate)
        d["fp_sites"] = list(self.fp_sites)
        d["kept_int4"] = list(self.kept_int4)
        return d


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def quantized_layers(model: SRModel, recipe: QuantRecipe) -> tuple[set[str], set[str]]:
    """(quantized linears, quantized body convolutions) of ``model`` under ``recipe``, by module
    path: the layers whose weights are not "kept" (``fp_weights``, ``quantize_kept_weights``)."""
    linears = {p.name for p in model.quant_points() if p.kind == "linear" and recipe.quantized(p)}
    convs = set(model.body_convs()) if recipe.quant_conv else set()
    return linears, convs


def prepare(model: SRModel, recipe: QuantRecipe,
            smoothing: dict[str, torch.Tensor] | None = None) -> SRModel:
    """Return a deep copy of ``model`` with every quantization point swapped for a quantizer.

    ``smoothing``: {linear module path: (K,) factors}, required when ``recipe.smooth`` is set
    (``calibrate.smoothing.smoothing_factors``; calibration files store them). Raises
    ``ValueError`` when they are missing or do not fit.
    """
    if recipe.smooth is not None and smoothing is None:
        raise ValueError("the recipe smooths the linear inputs (smooth="
                         f"{recipe.smooth}), but no smoothing factors were given")
    quantized, convs = quantized_layers(model, recipe)
    if recipe.quant_conv and not convs:
        raise EdgeSRError(f"--quant-conv: {getattr(model, 'arch', 'this model')} has no dense "
                          "body convolutions to quantize (SRModel.body_convs)")
    student = copy.deepcopy(model).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    if convs:  # their 8-bit weight codes first: the kept weights' choices below skip them
        quantize_kept_weights(student, set(), 8, only=convs)
    if recipe.fp_weights != "fp32":
        kept = (quantize_kept_weights(student, quantized | convs,
                                      KEPT_WEIGHT_BITS[recipe.fp_weights], int4=recipe.kept_int4)
                if recipe.fp_weights in KEPT_WEIGHT_BITS else set())
        round_fp_weights(student, {f"{n}.weight" for n in quantized | kept | convs})
    for point in model.quant_points():
        if not recipe.quantized(point):
            continue
        search = recipe.search_for(point)
        if point.kind == "linear":
            lin = student.get_submodule(point.name)
            groups = 3 if point.role == "qkv" else 1
            try:
                rot = (random_hadamard(lin.in_features, recipe.rotation_seed)
                       if recipe.rotated(point) else None)
            except ValueError as e:
                raise EdgeSRError(f"--rotate: {point.name}: {e}") from None
            q = QuantLinear(lin, recipe.bits, groups=groups,
                            shared_input=groups > 1 and not recipe.qkv_separation,
                            act_search=search, act_bits=recipe.input_bits(point),
                            rotation=rot, weight_channels=recipe.weight_grid == "channel",
                            smoothing=None if recipe.smooth is None else smoothing[point.name])
        else:
            q = BoundFakeQuantizer(recipe.bits, search)
        _set_submodule(student, point.name, q)
    for name in sorted(convs):
        _set_submodule(student, name, QuantConv2d(student.get_submodule(name), WIDE_BITS))
    for name, q in quantizers(student):
        q.grid = quantizer_grid(recipe.grid, ".weight_quantizers." in name, q.bits)
    student.quant_recipe = recipe
    # the new quantizers are made on the CPU: follow the model's device (calibration on a GPU)
    return student.to(next(model.parameters()).device)


@torch.no_grad()
def round_fp_weights(model: nn.Module, skip: set[str]) -> int:
    """Round each floating-point weight not in ``skip`` (two or more axes, at least
    ``FP16_MIN_NUMEL`` elements) to the nearest FP16 value, in place; returns how many."""
    n = 0
    for name, p in model.named_parameters():
        if name not in skip and p.dim() >= 2 and p.numel() >= FP16_MIN_NUMEL \
                and p.is_floating_point():
            p.copy_(p.half().to(p.dtype))
            n += 1
    return n


def image_layers(model: nn.Module) -> set[str]:
    """Module paths of the layers that read or write image channels (kept FP16 by
    ``quantize_kept_weights``): the model's own ``image_layers()`` (``SRModel``), which the
    edge-sr models name by structure; for another module, ``SRModel``'s guess by width."""
    named = getattr(model, "image_layers", None)
    return set(named() if named is not None else SRModel.image_layers(model))


def kept_layers(model: nn.Module, skip: set[str]) -> list[str]:
    """Module paths of the convolutions and linears ``quantize_kept_weights`` would quantize:
    not in ``skip``, not image layers, at least ``FP16_MIN_NUMEL`` weights; in module order."""
    skip = set(skip) | image_layers(model)
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in skip
            and m.weight.numel() >= FP16_MIN_NUMEL]


@torch.no_grad()
def quantize_kept_weights(model: nn.Module, skip: set[str], bits: int,
                          int4: Collection[str] = (), only: Collection[str] | None = None
                          ) -> set[str]:
    """Weight-only quantization of the convolutions and linears that calibration keeps out of
    W_b A_b (beyond the paper: a smaller engine file). Their inputs stay floating point.

    Each weight ``w`` (``(out, in, ...)``) gets a symmetric per-output-channel grid
    ``s * c``, ``c`` an integer in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, with ``s`` the clip of
    ``KEPT_CLIP_RATIOS`` x max|w| (rounded to an FP16 value) of least squared error per channel
    (round to nearest). The weight becomes ``c.float() * s`` in float32, in place, and the
    module keeps ``kept_codes`` (int8, ``w``'s shape) and ``kept_scale`` (float32, ``(out,)``)
    so that export stores the codes and rebuilds the same float32 values
    (``edge_sr.onnx_tidy.store_int_weights``). Measured on NGswin: docs/results/grids.md, "Size".
    Skipped: modules in ``skip`` (quantized linears), image layers (``image_layers``), weights of
    fewer than ``FP16_MIN_NUMEL`` elements (``kept_layers``). The modules named in ``int4`` get
    4 bits whatever ``bits`` is. ``only``: these module paths instead of ``kept_layers`` (the
    body convolutions of ``QuantRecipe.quant_conv``). Returns the names of the modules quantized.
    """
    int4 = set(int4)
    done = set()
    for name in kept_layers(model, skip) if only is None else sorted(only):
        m = model.get_submodule(name)
        layer_bits = 4 if name in int4 else bits
        qmax = 2 ** (layer_bits - 1) - 1
        w = m.weight.detach().float()
        flat = w.reshape(w.shape[0], -1)
        amax = flat.abs().amax(1).clamp_min(1e-12)
        best_err = torch.full_like(amax, float("inf"))
        best_s = (amax / qmax).half().float()
        for r in KEPT_CLIP_RATIOS:
            s = (amax * float(r) / qmax).half().float()  # FP16 values: stored in 2 bytes
            q = torch.clamp(torch.round(flat / s[:, None]), -qmax, qmax) * s[:, None]
            err = (q - flat).pow(2).sum(1)
            better = err < best_err
            best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
        codes = torch.clamp(torch.round(flat / best_s[:, None]), -qmax, qmax)
        m.kept_codes = codes.to(torch.int8).reshape(w.shape)
        m.kept_scale = best_s.float()
        m.kept_bits = layer_bits
        m.weight.copy_((codes * best_s[:, None]).reshape(w.shape).to(m.weight.dtype))
        done.add(name)
    return done


def kept_weight_grids(model: nn.Module
                      ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]]:
    """``(weight, codes, scale, bits, dq)`` of every weight ``quantize_kept_weights`` quantized,
    as numpy arrays (the float32 weight and int8 codes in the module's layout, the ``(out,)``
    scale), for the export (``edge_sr.onnx_tidy.store_int_weights``); ``dq``: the convolution of
    a ``QuantConv2d``, whose weight must be a ``DequantizeLinear`` for ORT's ``QLinearConv``."""
    convs = {id(m.conv) for m in model.modules() if isinstance(m, QuantConv2d)}
    return [(m.weight.detach().float().cpu().numpy(), m.kept_codes.cpu().numpy(),
             m.kept_scale.cpu().numpy(), int(m.kept_bits), id(m) in convs)
            for m in model.modules() if getattr(m, "kept_codes", None) is not None]


def quantizers(model: nn.Module) -> Iterator[tuple[str, BoundFakeQuantizer]]:
    """All quantizers with their stable fully qualified names, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, BoundFakeQuantizer):
            yield name, m


def activation_quantizers(model: nn.Module) -> list[BoundFakeQuantizer]:
    """The quantizers of activations: every quantizer but the quantized linears' weight ones."""
    weights = {id(q) for m in model.modules() if isinstance(m, QuantLinear)
               for q in m.weight_quantizers}
    return [q for _, q in quantizers(model) if id(q) not in weights]


def bound_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The only parameters DQC trains."""
    return [p for _, q in quantizers(model) for p in (q.lower, q.upper)]


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for _, q in quantizers(model):
        q.enabled = enabled
