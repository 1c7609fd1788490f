"""Block reconstruction: the quantizers' bounds trained one transformer block at a time, against
the FP model's block outputs, on cached block inputs (beyond the paper).

For each block in execution order: the student's own input to the block (everything upstream
already quantized and reconstructed) and the FP teacher's output of the same block are cached for
the calibration patches; then Adam trains the bounds of that block's quantizers on
``mean((block_q(x_q) - block_fp(x_fp))^2)`` over random mini-batches of the cached inputs (a
block whose loss over all cached patches does not fall keeps its starting bounds). One
step costs one block's forward and backward instead of the whole model's (DQC), so many more steps
fit in a CPU-minute; the price is a local loss that sees neither the blocks after it nor the
output.

Source: BRECQ (Li et al., ICLR 2021), block-wise reconstruction with the quantized model's block
inputs and the FP outputs as targets; BRECQ also learns the weights' rounding (AdaRound), which
is not done here: only the bounds train, as in DQC (the paper). The learning rate is relative to
each quantizer's range (``calibrate.dqc.param_groups`` with ``bound_lr="relative"``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from calibrate.dqc import (
    DQCConfig,
    block_paths,
    bounds_state,
    load_bounds,
    param_groups,
    val_psnr,
)
from calibrate.prepare import bound_parameters
from edge_sr.logutil import progress_disabled

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconConfig:
    """``iterations`` Adam steps per block, each on ``batch`` of the cached patches."""

    iterations: int = 50
    batch: int = 4
    lr: float = 1e-2  # times each quantizer's range at the start (relative bound lr)
    betas: tuple[float, float] = (0.9, 0.99)
    chunk: int = 8  # patches per forward pass when caching block inputs and outputs
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch < 1 or self.chunk < 1 or not self.lr > 0:
            raise ValueError("block reconstruction needs iterations, batch and chunk >= 1 and "
                             f"lr > 0, got {self.iterations}, {self.batch}, {self.chunk}, "
                             f"{self.lr}")


@dataclass
class ReconReport:
    blocks: int
    seconds: float
    val_psnr_before: float
    val_psnr_after: float
    kept: bool  # False: the held-out PSNR fell, so the starting bounds were restored
    per_block: list[dict] = field(default_factory=list)


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


def execution_order(model: nn.Module, names: list[str], x: torch.Tensor) -> list[str]:
    """``names`` sorted by when their modules run in one forward pass of ``x``.

    Raises ValueError if a module runs other than exactly once."""
    seen: list[str] = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.append(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if sorted(seen) != sorted(names):
        raise ValueError("block reconstruction needs every block to run exactly once per "
                         f"forward pass; ran {len(seen)} calls for {len(names)} blocks")
    return seen


def block_inputs(model: nn.Module, name: str, x: torch.Tensor, chunk: int
                 ) -> tuple[torch.Tensor, tuple, dict]:
    """The input of block ``name`` for every patch of ``x`` (N, 3, h, w): the first positional
    argument stacked over patches (N, ...), and the other arguments of the last call (sizes,
    masks: the same for every patch of one shape)."""
    xs, rest = [], ((), {})

    def hook(m, args, kwargs):
        nonlocal rest
        xs.append(args[0].detach())
        rest = (args[1:], kwargs)
        raise _Stop

    h = model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], chunk):
                try:
                    model(x[i:i + chunk])
                except _Stop:
                    pass
    finally:
        h.remove()
    return torch.cat(xs), rest[0], rest[1]


def block_outputs(model: nn.Module, names: list[str], x: torch.Tensor, chunk: int
                  ) -> dict[str, torch.Tensor]:
    """Every named block's output for every patch of ``x``, from full forward passes."""
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, y, n=n: outs[n].append(y.detach())) for n in names]
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], chunk):
                model(x[i:i + chunk])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in outs.items()}


def _block_mse(block: nn.Module, xs: torch.Tensor, yt: torch.Tensor, args: tuple, kwargs: dict,
               chunk: int) -> float:
    """Mean squared error of ``block`` on every cached input against its targets."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, xs.shape[0], chunk):
            total += float(((block(xs[i:i + chunk], *args, **kwargs) - yt[i:i + chunk]) ** 2).sum())
    return total / yt.numel()


def run_block_recon(student: nn.Module, teacher: nn.Module, patches: torch.Tensor,
                    val: tuple[torch.Tensor, torch.Tensor], cfg: ReconConfig) -> ReconReport:
    """Train ``student``'s bounds block by block (in place) against ``teacher``.

    ``student``: the fake-quant model (bounds initialised, e.g. by DOBI); ``teacher``: its FP
    model. ``patches``: (N, 3, h, w) LR calibration patches in [0, 1]; ``val``: held-out (LR, HR)
    patches. The held-out PSNR is measured before and after; if it fell, the starting bounds are
    restored (``kept`` False), as DQC keeps its best-validated bounds.
    """
    t0 = time.perf_counter()
    scale = int(student.scale)
    dev = next(student.parameters()).device
    student.eval()
    teacher.eval()
    patches = patches.to(dev)
    start = bounds_state(student)
    before = val_psnr(student, *val, scale)
    names = execution_order(student, block_paths(student), patches[:1])
    targets = block_outputs(teacher, names, patches, cfg.chunk)
    gen = torch.Generator().manual_seed(cfg.seed)
    groups_cfg = DQCConfig(lr=cfg.lr, bound_lr="relative")
    per_block = []
    for name in tqdm(names, desc="block reconstruction", disable=progress_disabled(),
                     leave=False):
        block = student.get_submodule(name)
        params = bound_parameters(block)
        if not params:
            continue
        xs, args, kwargs = block_inputs(student, name, patches, cfg.chunk)
        yt = targets.pop(name)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(param_groups(block, groups_cfg), lr=cfg.lr, betas=cfg.betas)
        first = _block_mse(block, xs, yt, args, kwargs, cfg.chunk)
        saved = [p.detach().clone() for p in params]
        for _ in range(cfg.iterations):
            idx = torch.randint(0, xs.shape[0], (cfg.batch,), generator=gen)
            loss = ((block(xs[idx.to(dev)], *args, **kwargs) - yt[idx.to(dev)]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p in params:
            p.requires_grad_(False)
        last = _block_mse(block, xs, yt, args, kwargs, cfg.chunk)
        restored = not last < first
        if restored:  # no gain on the cached patches: this block keeps its starting bounds
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
            last = first
        per_block.append({"block": name, "mse_before": first, "mse_after": last,
                          "restored": restored})
        log.debug("block reconstruction %s: MSE %.4g -> %.4g", name, first, last)
    after = val_psnr(student, *val, scale)
    kept = after >= before
    if not kept:
        load_bounds(student, start)
    rep = ReconReport(len(per_block), time.perf_counter() - t0, before, after, kept, per_block)
    log.info("block reconstruction: %d blocks x %d steps in %.0f s; held-out %.3f -> %.3f dB%s",
             rep.blocks, cfg.iterations, rep.seconds, before, after,
             "" if kept else " (worse: starting bounds kept)")
    return rep
