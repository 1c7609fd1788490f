"""What every edge-sr model exposes, so calibration, export and runtime stay architecture-free.

A model marks each activation quantization point with an ``ActSlot`` (an identity in full
precision) and keeps its quantizable linears as plain ``nn.Linear``. ``quant_points()`` lists both,
with the role that decides the DOBI search (one-sided for softmax and post-GELU tensors), and
``feature_modules()`` names the outputs that DQC's feature loss reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Roles of quantization points. "attn_probs" (softmax output) and the input of "fc2"
# (post-GELU) are long-tailed: the paper searches them one-sided.
LONG_TAILED_ROLES = frozenset({"attn_probs", "fc2"})


class ActSlot(nn.Identity):
    """An activation quantization point; the identity until calibration swaps in a quantizer."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def extra_repr(self) -> str:
        return f"role={self.role!r}"


@dataclass(frozen=True)
class QuantPoint:
    """One place a quantizer goes: a linear (weight + input quantizers) or an activation slot."""

    name: str  # module path, e.g. "layers.0.residual_group.blocks.1.attn.qkv"
    kind: Literal["linear", "act"]
    role: str  # "qkv", "proj", "fc1", "fc2", "q", "k", "v", "attn_probs"

    @property
    def long_tailed_input(self) -> bool:
        """Whether the activation this point quantizes is long-tailed (paper: one-sided DOBI)."""
        return self.role in LONG_TAILED_ROLES


def window_attention_block_points(prefix: str, mlp: str = "mlp") -> list[QuantPoint]:
    """2DQuant's eight points of one window-attention block (spec §1.2), in execution order."""
    return [
        QuantPoint(f"{prefix}.attn.qkv", "linear", "qkv"),
        QuantPoint(f"{prefix}.attn.q_quant", "act", "q"),
        QuantPoint(f"{prefix}.attn.k_quant", "act", "k"),
        QuantPoint(f"{prefix}.attn.v_quant", "act", "v"),
        QuantPoint(f"{prefix}.attn.attn_probs_quant", "act", "attn_probs"),
        QuantPoint(f"{prefix}.attn.proj", "linear", "proj"),
        QuantPoint(f"{prefix}.{mlp}.fc1", "linear", "fc1"),
        QuantPoint(f"{prefix}.{mlp}.fc2", "linear", "fc2"),
    ]


@dataclass(frozen=True)
class SizeRequirements:
    """Input constraints: the model pads to ``multiple`` itself; fixed-shape tiles must obey it."""

    multiple: int
    minimum: int = 1

    def padding(self, h: int, w: int) -> tuple[int, int]:
        return (-h) % self.multiple, (-w) % self.multiple

    def fit(self, h: int, w: int) -> tuple[int, int]:
        """The smallest valid fixed shape that holds an ``h`` x ``w`` input: each side raised to
        ``minimum`` and padded up to ``multiple``."""
        def up(n: int) -> int:
            n = max(n, self.minimum)
            return n + (-n) % self.multiple
        return up(h), up(w)

    def check_tile(self, h: int, w: int) -> str | None:
        """Return why a fixed tile shape is invalid, or None when it is fine."""
        if h % self.multiple or w % self.multiple:
            return f"tile {h}x{w} is not a multiple of {self.multiple}"
        if min(h, w) < self.minimum:
            return f"tile {h}x{w} is smaller than the minimum {self.minimum}"
        return None


def pad_flip(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad bottom/right with a flipped copy, as the official SwinIR test script does.

    A pad longer than the image repeats the mirror (period 2 x size, edge included), so any size
    works, down to 1 pixel; for pads up to the image size it is the official single flip.
    """
    for dim, pad in ((2, pad_h), (3, pad_w)):
        while pad > 0:
            size = int(x.shape[dim])
            step = min(pad, size)
            x = torch.cat([x, torch.flip(x, [dim])], dim).narrow(dim, 0, size + step)
            pad -= step
    return x


_DYNAMIC_TRACE = [False]


@contextmanager
def dynamic_shapes() -> Iterator[None]:
    """While a dynamic-shape ONNX export traces a model: sizes stay traced values, so padding,
    window masks and crops are computed in the graph instead of baked in as constants."""
    _DYNAMIC_TRACE[0] = True
    try:
        yield
    finally:
        _DYNAMIC_TRACE[0] = False


def tracing_dynamic() -> bool:
    """True inside ``dynamic_shapes()`` while the ONNX tracer runs."""
    return _DYNAMIC_TRACE[0] and torch.jit.is_tracing()


def pad_flip_traced(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``pad_flip`` to the next multiple of ``multiple`` with sizes that may be traced: one
    flipped copy, so each side must be at least ``multiple - 1`` pixels (``minimum``)."""
    for dim in (2, 3):
        n = x.shape[dim]
        x = torch.cat([x, torch.flip(x, [dim])], dim).narrow(dim, 0, n + (-n) % multiple)
    return x


def pad_reflect_symmetric(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad all sides evenly with reflection (used by models that pad centrally).

    Reflection (edge not repeated) needs pads shorter than the side; longer pads, and 1-pixel
    sides, reflect repeatedly (replicating a 1-pixel side), so any size works.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    if ph < h and pw < w:
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
    for dim, size, pad in ((-2, h, ph), (-1, w, pw)):
        if pad:
            before = pad // 2
            pos = torch.arange(-before, size + pad - before)
            period = max(2 * (size - 1), 1)
            pos = pos.remainder(period)
            idx = torch.where(pos < size, pos, period - pos).clamp(0, size - 1)
            x = x.index_select(dim, idx.to(x.device))
    return x


class SRModel(nn.Module):
    """Base class of edge-sr's SR networks. Input and output are RGB in [0, 1], NCHW."""

    arch: str = "?"
    scale: int
    size_requirements: SizeRequirements
    # True when the forward pass traces with sizes as graph values (``dynamic_shapes``), so one
    # ONNX export runs any input size; False where padding or masks need Python-side sizes
    dynamic_export: bool = False

    def quant_points(self) -> list[QuantPoint]:
        raise NotImplementedError

    def feature_modules(self) -> list[str]:
        """Module paths whose outputs DQC's feature loss compares (teacher vs student)."""
        raise NotImplementedError

    def image_layers(self) -> list[str]:
        """Module paths of the convolutions and linears that read or write image channels: the
        first layer and the upsampler's (the paper keeps them full precision). The models name
        them by structure; this default guesses by width (3 in, or 3 or 3*scale^2 out), which
        would also catch a hidden layer of that width."""
        sq = 3 * int(getattr(self, "scale", 1)) ** 2
        out = []
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and (m.in_channels == 3 or m.out_channels in (3, sq)):
                out.append(name)
            elif isinstance(m, nn.Linear) and (m.in_features == 3 or m.out_features in (3, sq)):
                out.append(name)
        return out

    def body_convs(self) -> list[str]:
        """Module paths of the dense 3x3 convolutions inside the body (not image layers) that
        ``calibrate``'s ``quant_conv`` option may run on an integer grid; none by default."""
        return []

    def position_bias_tables(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(table, index)`` of every windowed attention: ``table`` ``((2w-1)^2, heads)`` and
        ``index`` ``(w*w, w*w)``, whose bias is ``table[index].permute(2, 0, 1)`` (Swin's
        relative position bias). The ONNX exports store the tables, not the expanded biases."""
        return [(m.relative_position_bias_table.detach().float().cpu(),
                 m.relative_position_index.cpu())
                for m in self.modules() if hasattr(m, "relative_position_bias_table")]

    _config: dict

    def config(self) -> dict:
        """Constructor arguments, recorded in manifests."""
        return dict(self._config)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Transformer initialisation (truncated-normal linears, unit LayerNorms), as upstream."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Mlp(nn.Module):
    """The transformer MLP: fc1, exact GELU, fc2 (fc2's input is the long-tailed post-GELU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass(frozen=True)
class Architecture:
    """How the checkpoint registry recognises and builds one architecture from a state dict.

    ``detect(state_dict) -> bool`` looks only at keys and shapes. ``build(state_dict, scale)``
    infers the hyper-parameters from the tensors, loads strictly on every learned parameter
    (buffers such as ``attn_mask``/``relative_position_index`` may be absent or present) and
    raises ``EdgeSRError`` naming the mismatch (e.g. an x3 checkpoint asked to run x2).
    """

    name: str
    detect: Callable[[dict], bool]
    build: Callable[[dict, int | None], SRModel]


@dataclass(frozen=True)
class CheckpointEntry:
    """A named checkpoint: official file name, URL, size and checksum where known."""

    name: str  # e.g. "swinir-light-x2", "swinir-light-x2-ref", "ngswin-x2"
    arch: str
    scale: int
    filename: str
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    shared_relpath: str | None = None  # path under $EDGE_SR_DATA, for the shipped checkpoints
