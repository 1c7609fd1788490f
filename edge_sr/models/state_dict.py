"""From a loaded checkpoint object to a bare state dict: one rule for every architecture.

1. **Wrappers.** A dict holding one of ``WRAPPER_KEYS`` as a dict is a wrapper, and the first such
   key (in that order) holds the state dict: ``params_ema`` before ``params`` as the official
   SwinIR/BasicSR test scripts do, ``state_dict`` (Lightning), ``model_state_dict`` (the usual
   training-loop ``{'model_state_dict': ..., 'optimizer_state_dict': ..., 'epoch': ...}``),
   ``model``. Applied again while the result is itself a wrapper.
2. **Prefixes.** ``module.`` (DataParallel / DistributedDataParallel) and ``_orig_mod.``
   (``torch.compile``) are stripped from the front of every key, in any order and nesting.
3. Every entry must then be a name -> tensor pair.

Nothing else is guessed: the architecture's ``build`` then loads strictly on every learned
parameter, so a wrapper or prefix this rule does not know is a clear "missing/unexpected" error.
"""

from __future__ import annotations

import torch

from edge_sr.errors import EdgeSRError

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model_state_dict", "model")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_NESTING = 4


def strip_prefixes(key: str) -> str:
    """``module._orig_mod.conv.weight`` -> ``conv.weight``."""
    stripped = True
    while stripped:
        stripped = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key, stripped = key[len(p):], True
    return key


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The bare state dict of a checkpoint object (see the module docstring for the rule)."""
    if not isinstance(obj, dict):
        raise EdgeSRError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    for _ in range(_MAX_NESTING):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    sd: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            others = ", ".join(str(x) for x in list(obj)[:6])
            raise EdgeSRError(
                f"{source}: expected a dict of tensors, found entry {k!r} of type "
                f"{type(v).__name__} (keys: {others}); a training checkpoint must keep its "
                f"weights under one of {', '.join(WRAPPER_KEYS)}")
        name = strip_prefixes(k)
        if name in sd:
            raise EdgeSRError(f"{source}: keys {k!r} and another both name {name!r} once the "
                              f"{'/'.join(WRAPPER_PREFIXES)} prefixes are removed")
        sd[name] = v
    return sd
