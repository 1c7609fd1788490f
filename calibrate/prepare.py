"""Turn an FP ``SRModel`` into its fake-quant student, from a ``QuantRecipe``.

The model lists its own quantization points (``SRModel.quant_points``); nothing here knows about
SwinIR or NGswin. Phases are explicit calls: ``prepare`` -> DOBI -> DQC -> save; no quantizer
changes state on its first forward.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from torch import nn

from calibrate.qmodules import QuantLinear
from calibrate.quantizer import BoundFakeQuantizer, check_bits
from edge_sr.models.base import QuantPoint, SRModel


@dataclass(frozen=True)
class QuantRecipe:
    """What gets quantized and how its bounds are searched.

    ``search_assignment``: ``"paper"`` searches softmax and post-GELU tensors one-sided (Fig. 2);
    ``"released"`` reproduces the released code, two-sided everywhere (spec §3, §7.1).
    ``qkv_separation``: three input quantizers for q, k, v (paper) or one shared (deployment).
    """

    bits: int = 4
    qkv_separation: bool = True
    search_assignment: Literal["paper", "released"] = "paper"

    def __post_init__(self) -> None:
        try:
            check_bits(self.bits)
        except ValueError as e:
            raise ValueError(f"--bits: {e}") from None
        if self.search_assignment not in ("paper", "released"):
            raise ValueError(
                f"search_assignment must be 'paper' or 'released', got {self.search_assignment!r}"
            )

    def search_for(self, point: QuantPoint) -> str:
        if self.search_assignment == "paper" and point.long_tailed_input:
            return "one_sided"
        return "two_sided"

    def to_dict(self) -> dict:
        return asdict(self)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def prepare(model: SRModel, recipe: QuantRecipe) -> SRModel:
    """Return a deep copy of ``model`` with every quantization point swapped for a quantizer."""
    student = copy.deepcopy(model).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    for point in model.quant_points():
        search = recipe.search_for(point)
        if point.kind == "linear":
            lin = student.get_submodule(point.name)
            groups = 3 if point.role == "qkv" else 1
            q = QuantLinear(lin, recipe.bits, groups=groups,
                            shared_input=groups > 1 and not recipe.qkv_separation,
                            act_search=search)
        else:
            q = BoundFakeQuantizer(recipe.bits, search)
        _set_submodule(student, point.name, q)
    student.quant_recipe = recipe
    return student


def quantizers(model: nn.Module) -> Iterator[tuple[str, BoundFakeQuantizer]]:
    """All quantizers with their stable fully qualified names, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, BoundFakeQuantizer):
            yield name, m


def bound_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The only parameters DQC trains."""
    return [p for _, q in quantizers(model) for p in (q.lower, q.upper)]


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for _, q in quantizers(model):
        q.enabled = enabled
