"""Trace a calibrated fake-quant model to ONNX with one placeholder node per quantization site.

torch's exporters refuse sub-8-bit fake quantization (deploy notes §0.2), and the fake-quant modules
must not know about ONNX. So a deep copy of the model has each standalone ``BoundFakeQuantizer``
swapped for ``edge_sr::QAct`` and each ``QuantLinear`` for ``edge_sr::QLinear`` (custom-domain
nodes carrying the module path); everything else exports as plain FP ops. ``emit.py`` then
replaces the placeholders with Q/DQ subgraphs built from the learned bounds.
"""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import nullcontext

import onnx
import torch
from torch import nn

from calibrate.qmodules import QuantConv2d, QuantLinear
from calibrate.quantizer import BoundFakeQuantizer
from edge_sr.models.base import dynamic_shapes

DOMAIN = "edge_sr"
TRACE_OPSET = 20  # the TorchScript exporter's maximum in torch 2.13; emit.py raises it
INPUT_NAME, OUTPUT_NAME = "lr", "sr"


class _ActMark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g, x, name: str):
        out = g.op(f"{DOMAIN}::QAct", x, site_s=name)
        out.setType(x.type())
        return out


class _LinearMark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str, out_features: int) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], out_features)

    @staticmethod
    def symbolic(g, x, name: str, out_features: int):
        out = g.op(f"{DOMAIN}::QLinear", x, site_s=name)
        t = x.type()
        sizes = t.varyingSizes()  # None for a dimension the export leaves symbolic
        if sizes is not None:  # static shapes let the exporter fold the Shape/Gather arithmetic;
            # a dynamic export still learns the rank, dtype and feature width (no warning)
            out.setType(t.with_sizes([*sizes[:-1], out_features]))
        return out


class _ActSite(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.site = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ActMark.apply(x, self.site)


class _LinearSite(nn.Module):
    def __init__(self, name: str, linear: QuantLinear) -> None:
        super().__init__()
        self.site, self.out_features = name, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearMark.apply(x, self.site, self.out_features)


def _swap(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def quant_sites(model: nn.Module) -> tuple[dict[str, QuantLinear], dict[str, BoundFakeQuantizer]]:
    """The model's quantized linears and standalone activation quantizers, by module path."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    acts = {
        n: m for n, m in model.named_modules()
        if isinstance(m, BoundFakeQuantizer) and not any(n.startswith(p + ".") for p in linears)
    }
    return linears, acts


def trace_with_sites(model: nn.Module, tile: tuple[int, int], batch: int,
                     dynamic: bool = False) -> onnx.ModelProto:
    """Export ``model`` at ``(batch, 3, *tile)`` with placeholder nodes at every quantization site
    (``dynamic``: with a symbolic height and width, ``edge_sr.onnx_export``'s dynamic trace)."""
    marked = copy.deepcopy(model).eval()
    for m in marked.modules():
        if isinstance(m, QuantConv2d):
            m.freeze_bias()  # its bias on the accumulator grid, before the quantizers go
    linears, acts = quant_sites(marked)
    for name in acts:
        _swap(marked, name, _ActSite(name))
    for name, lin in linears.items():
        _swap(marked, name, _LinearSite(name, lin))
    x = torch.rand(batch, 3, *tile)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        marked(x)  # fill per-shape caches (shifted-window masks) so they export as constants
        warnings.filterwarnings("ignore")
        axes = {INPUT_NAME: {2: "h", 3: "w"}, OUTPUT_NAME: {2: "H", 3: "W"}} if dynamic else None
        with dynamic_shapes() if dynamic else nullcontext():
            torch.onnx.export(marked, (x,), buf, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=TRACE_OPSET,
                              do_constant_folding=True, dynamo=False, custom_opsets={DOMAIN: 1},
                              dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())
