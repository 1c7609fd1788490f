"""The architecture registry: recognise a checkpoint from its tensors and build the model.

Each architecture module exposes ``ARCHITECTURE`` (an ``Architecture``) and, optionally,
``CHECKPOINTS`` (named ``CheckpointEntry``s); both are imported here, plainly, so the import
graph shows the registry's members.
"""

from __future__ import annotations

import logging

from edge_sr.errors import EdgeSRError
from edge_sr.models import ngswin
from edge_sr.models.base import Architecture, CheckpointEntry, SRModel
from edge_sr.models.swinir import ARCHITECTURE as SWINIR_LIGHT
from edge_sr.models.swinir import SwinIRLight, swinir_from_state_dict, unwrap_state_dict

log = logging.getLogger(__name__)

ARCHITECTURES: list[Architecture] = [SWINIR_LIGHT, ngswin.ARCHITECTURE]
# Checkpoints contributed by architecture modules (SwinIR's live in edge_sr.checkpoints).
EXTRA_CHECKPOINTS: list[CheckpointEntry] = list(ngswin.CHECKPOINTS)


def get_architecture(name: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    known = ", ".join(a.name for a in ARCHITECTURES)
    raise EdgeSRError(f"unknown architecture {name!r}; known: {known}")


def detect_architecture(sd: dict, source: str = "checkpoint") -> Architecture:
    """The first architecture whose ``detect`` accepts the (unwrapped) state dict."""
    for arch in ARCHITECTURES:
        if arch.detect(sd):
            return arch
    keys = ", ".join(list(sd)[:4])
    known = ", ".join(a.name for a in ARCHITECTURES)
    raise EdgeSRError(
        f"{source}: not a recognised architecture (edge-sr knows {known}); "
        f"its first keys are {keys or 'none'}"
    )


def build_model(obj: object, scale: int | None = None,
                source: str = "checkpoint") -> tuple[SRModel, Architecture]:
    """Detect the architecture of a loaded checkpoint object and build the model (eval mode)."""
    sd = unwrap_state_dict(obj, source)
    arch = detect_architecture(sd, source)
    try:
        model = arch.build(sd, scale)
    except EdgeSRError as e:
        # Architectures phrase errors as "checkpoint ..."; name the actual file instead.
        msg = str(e)
        if msg.startswith("checkpoint"):
            msg = source + msg[len("checkpoint"):]
        elif not msg.startswith(source):
            msg = f"{source}: {msg}"
        raise EdgeSRError(msg) from None
    return model.eval(), arch


__all__ = [
    "ARCHITECTURES",
    "EXTRA_CHECKPOINTS",
    "SwinIRLight",
    "build_model",
    "detect_architecture",
    "get_architecture",
    "swinir_from_state_dict",
    "unwrap_state_dict",
]
