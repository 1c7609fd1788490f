"""The calibration vocabularies, each defined once. No torch import: the CLI builds its click
choices from here, and ``calibrate.api`` / ``calibrate.prepare`` check their inputs against it.

* ``Method``: what calibrates. ``2dquant`` is the faithful paper (DOBI + DQC); ``edge-sr`` adds
  the options measured better on held-out data (``calibrate.api.EDGE_SR_OPTIONS``); ``dobi``,
  ``minmax`` and ``percentile`` calibrate without DQC.
* ``Budget``: how much DQC runs (iterations x batch x patch; ``calibrate.api.DQC_BUDGETS``). Not to
  be confused with ``calibrate.prepare.QuantRecipe``, *what* gets quantized and how.
* ``Grid``: the grid quantizers learn, the paper's real-valued one or the one an engine runs.
* ``WeightGrid``, ``Rounding``, ``FPWeights``, ``DQCPrecision``: options beyond the paper.
* ``SITE_KINDS``: the kinds of quantization site ``--fp-sites`` can keep in floating point.
* ``Target``, ``WeightContainer``: what a QDQ export is written for, and how it stores weights.
"""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["2dquant", "edge-sr", "dobi", "minmax", "percentile"]
Budget = Literal["cpu", "fast", "paper"]
Grid = Literal["real", "ort", "trt"]
WeightGrid = Literal["tensor", "channel"]
Rounding = Literal["nearest", "gptq"]
FPWeights = Literal["fp32", "fp16", "int8", "int4", "auto"]  # int/auto: weight-only (kept layers)
DQCPrecision = Literal["fp32", "bf16"]  # the float type of DQC's GEMMs (bf16: autocast)
Target = Literal["ort", "trt"]  # the engine a QDQ export is written for
WeightContainer = Literal["auto", "int8", "int4"]  # how export stores weight codes

METHODS: tuple[str, ...] = get_args(Method)
BUDGETS: tuple[str, ...] = get_args(Budget)
DEPLOY_GRIDS: tuple[str, ...] = get_args(Grid)
WEIGHT_GRIDS: tuple[str, ...] = get_args(WeightGrid)
ROUNDINGS: tuple[str, ...] = get_args(Rounding)
FP_WEIGHTS: tuple[str, ...] = get_args(FPWeights)
DQC_PRECISIONS: tuple[str, ...] = get_args(DQCPrecision)
TARGET_NAMES: tuple[str, ...] = get_args(Target)
WEIGHT_CONTAINERS: tuple[str, ...] = get_args(WeightContainer)
# each kind with the quantization-point roles it covers: the four linears (input and weight), the
# attention products q.k^T and p.v (both operands), and the softmax output alone
SITE_KINDS: dict[str, tuple[str, ...]] = {
    "qkv": ("qkv",), "proj": ("proj",), "fc1": ("fc1",), "fc2": ("fc2",),
    "qk": ("q", "k"), "pv": ("attn_probs", "v"), "softmax": ("attn_probs",)}


def expected(option: str, allowed, got) -> str:
    """The one-line message for a value outside a vocabulary."""
    return f"{option}: expected one of {', '.join(allowed)}, got {got!r}"
