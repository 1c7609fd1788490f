"""DQC: distillation quantization calibration (spec §4). In the paper only the quantizers'
bounds train; ``weight_lr > 0`` (beyond the paper) also trains the quantized linears' weights and
biases through the same straight-through estimator.

Loss = output L1 (student vs FP teacher, no ground truth) + lambda * sum of feature terms at the
model's ``feature_modules()`` outputs. ``feature_loss="fixed"`` (default) is the intended loss:
each feature is divided by its own per-sample L2 norm (detached) and the term is the squared
distance between the unit-normalised student and teacher features, averaged over the batch (the
per-sample MSE times the element count, so it is scale-free and not vanishingly small).
``"released"`` reproduces the released code bit for bit in its maths: the (B,1,1,1) norm
broadcast over (B,N,C) features to (B,B,N,C), MSE divided again by the element count, and the
output L1 divided by the per-sample element count (spec §4.2, §7.3-5).

Adam (lr 1e-2 constant, betas (0.9, 0.99)). Validation PSNR on held-out pool patches (never the
test sets) picks the final bounds among the DOBI start and every validated iteration. State is
saved atomically every ``ckpt_every`` iterations; ``resume`` continues from it.

One step is ``DQCStep.step`` (``benchmarks.dqc_step`` times it). Beyond the paper, with the same
maths: ``recompute`` checkpoints every transformer block (memory for time), and
``bound_lr="relative"`` gives each quantizer an lr proportional to its range (``param_groups``),
and ``weight_lr`` trains the weights of every quantized linear as well, at ``weight_lr`` times
its mean weight-grid step (quantization-aware fine-tuning by distillation, as in the block
reconstruction of BRECQ / EfficientQAT, but end to end). ``precision="bf16"`` runs the teacher
and the student under autocast (bfloat16 GEMMs, e.g. AVX-512 BF16 or AMX on a CPU); the fake
quantizers, the losses, the bounds and Adam stay float32, and validation runs in float32.
Each validation in the history records the seconds since this run (re)started.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from calibrate.prepare import activation_quantizers, bound_parameters, quantizers
from calibrate.qmodules import QuantLinear
from calibrate.vocab import DQC_PRECISIONS, DQCPrecision
from edge_sr.data.images import to_uint8
from edge_sr.errors import EdgeSRError
from edge_sr.fileio import atomic_path
from edge_sr.hardware import native_bf16
from edge_sr.logutil import QuietBarLog, progress_disabled
from edge_sr.metrics import psnr_y

log = logging.getLogger(__name__)

MIN_RANGE_FRACTION = 1e-3  # of a grid's range at the start of DQC, the least it keeps
MIN_RANGE = 1e-8  # absolute floor (a grid that starts with no range)


@dataclass(frozen=True)
class DQCConfig:
    iterations: int = 4000
    batch: int = 16
    lr_patch: int = 64
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.99)
    feature_weight: float = 5.0
    feature_loss: Literal["fixed", "released"] = "fixed"
    val_every: int = 100
    ckpt_every: int = 100
    seed: int = 0
    recompute: bool = False  # activation checkpointing per transformer block (same maths)
    # "absolute": one lr for every bound (the paper); "relative": each quantizer's lr is
    # ``lr`` times its range u - l at the start (beyond the paper; spec §7.9)
    bound_lr: Literal["absolute", "relative"] = "absolute"
    # 0: only the bounds train (the paper). > 0: the quantized linears' weights and biases train
    # too, each linear at weight_lr x its mean weight-grid step (u - l) / (2^b - 1) (beyond it)
    weight_lr: float = 0.0
    # "fp32": the paper. "bf16": teacher and student forward under CPU/CUDA autocast (GEMMs in
    # bfloat16, fake quantizers and losses in float32); validation stays float32 (beyond it)
    precision: DQCPrecision = "fp32"
    # QDrop (beyond the paper): while DQC trains, each activation element stays FP with this
    # probability (calibrate.quantizer); 0: every element quantized, as the paper
    qdrop: float = 0.0
    # early stop (beyond the paper): end DQC after this many validations in a row without a new
    # best held-out PSNR (the best-validated bounds are kept either way); 0: run every iteration
    patience: int = 0

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 validations, got {self.patience!r}")
        if not 0.0 <= self.qdrop < 1.0:
            raise ValueError(f"qdrop must be a probability in [0, 1), got {self.qdrop!r}")
        if self.precision not in DQC_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(DQC_PRECISIONS)}, got "
                             f"{self.precision!r}")
        if not self.weight_lr >= 0:
            raise ValueError(f"weight_lr must be >= 0, got {self.weight_lr!r}")
        if self.bound_lr not in ("absolute", "relative"):
            raise ValueError(f"bound_lr must be 'absolute' or 'relative', got {self.bound_lr!r}")
        if self.feature_loss not in ("fixed", "released"):
            raise ValueError(f"feature_loss must be 'fixed' or 'released', got {self.feature_loss!r}")
        if self.iterations < 0 or self.batch < 1 or self.lr_patch < 8:
            raise ValueError("DQC needs iterations >= 0, batch >= 1 and lr_patch >= 8, got "
                             f"{self.iterations}, {self.batch}, {self.lr_patch}")


@dataclass
class DQCReport:
    iterations: int  # the iterations the bounds have trained for, a resumed run's earlier ones too
    seconds: float  # DQC time, a resumed run's earlier part (up to its last save) included
    best_iteration: int
    best_val_psnr: float
    history: list[dict] = field(default_factory=list)
    stopped_at: int | None = None  # the iteration a deadline stopped the run at (None: ran out)
    resumed_at: int = 0  # the iteration a --resume continued from (0: a run from the start)
    converged_at: int | None = None  # the iteration ``patience`` ended a complete run at


def output_loss(out_s: torch.Tensor, out_t: torch.Tensor, variant: str) -> torch.Tensor:
    l1 = (out_s - out_t).abs().mean()
    if variant == "released":  # mean * B / numel: divided again by the per-sample count
        return l1 * out_s.shape[0] / out_s.numel()
    return l1


def feature_loss(fs: torch.Tensor, ft: torch.Tensor, variant: str) -> torch.Tensor:
    b = fs.shape[0]
    ns = fs.reshape(b, -1).norm(dim=1).detach()
    nt = ft.reshape(b, -1).norm(dim=1).detach()
    if variant == "released":
        # norms reshaped to (B,1,1,1) against (B,N,C): broadcasts to (B,B,N,C) (spec §7.3)
        a, c = fs / ns.view(b, 1, 1, 1), ft / nt.view(b, 1, 1, 1)
        return F.mse_loss(a, c) / a.numel()
    shape = (b,) + (1,) * (fs.dim() - 1)
    a, c = fs / ns.view(shape).clamp_min(1e-12), ft / nt.view(shape).clamp_min(1e-12)
    return ((a - c) ** 2).reshape(b, -1).sum(dim=1).mean()


def block_paths(model: nn.Module) -> list[str]:
    """Module paths of the transformer blocks (each holds one attention's ``qkv`` point)."""
    return [p.name.rsplit(".attn.", 1)[0] for p in model.quant_points()
            if p.role == "qkv" and ".attn." in p.name]


class _Recompute:
    """Activation checkpointing of the named blocks: their internals are recomputed in the
    backward pass instead of stored (``torch.utils.checkpoint``, non-reentrant). Outputs, and
    so gradients, are the same; peak memory falls to about one block's activations."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        from torch.utils.checkpoint import checkpoint

        self.mods = [model.get_submodule(n) for n in names]
        for m in self.mods:
            fwd = m.forward

            def wrapped(*args, _fwd=fwd, **kwargs):
                if not torch.is_grad_enabled():
                    return _fwd(*args, **kwargs)
                return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

            m.forward = wrapped

    def close(self) -> None:
        for m in self.mods:
            del m.forward  # back to the class's forward


class _FeatureTap:
    """Forward hooks that keep the latest outputs of the named modules."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def f(mod, inp, out):
            self.out[name] = out
        return f

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def val_psnr(student: nn.Module, val_lr: torch.Tensor, val_hr: torch.Tensor, scale: int) -> float:
    """Mean Y-PSNR (crop = scale) of the student on held-out patches, via edge_sr.metrics."""
    dev = next(student.parameters()).device
    with torch.no_grad():
        sr = student(val_lr.to(dev)).cpu()
    vals = [psnr_y(to_uint8(sr[i:i + 1]), to_uint8(val_hr[i:i + 1]), scale)
            for i in range(sr.shape[0])]
    return float(sum(min(v, 100.0) for v in vals) / len(vals))


def quantized_linears(student: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in student.named_modules() if isinstance(m, QuantLinear)]


def bounds_state(student: nn.Module, weights: bool = False) -> dict[str, torch.Tensor]:
    """What DQC trains: every quantizer's bounds and, with ``weights`` (``weight_lr > 0``), the
    quantized linears' weights and biases too."""
    st = {f"{n}.{k}": getattr(q, k).detach().clone() for n, q in quantizers(student)
          for k in ("lower", "upper")}
    if not weights:
        return st
    for n, m in quantized_linears(student):
        st[f"{n}.weight"] = m.weight.detach().clone()
        if m.bias is not None:
            st[f"{n}.bias"] = m.bias.detach().clone()
    return st


def load_bounds(student: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, q in quantizers(student):
            q.lower.copy_(state[f"{n}.lower"])
            q.upper.copy_(state[f"{n}.upper"])
        for n, m in quantized_linears(student):
            for k in ("weight", "bias"):
                if f"{n}.{k}" in state:  # states written before weights could train lack them
                    getattr(m, k).copy_(state[f"{n}.{k}"])


def linear_parameters(student: nn.Module) -> list[tuple[QuantLinear, list[nn.Parameter]]]:
    """Each quantized linear with its weight (and bias): what ``weight_lr > 0`` trains."""
    return [(m, [m.weight] + ([m.bias] if m.bias is not None else []))
            for _, m in quantized_linears(student)]


def weight_step(m: QuantLinear) -> float:
    """The mean grid step (u - l) / (2^b - 1) of a quantized linear's weight quantizers."""
    steps = [float((q.upper.detach() - q.lower.detach()).abs().mean()) / (2**q.bits - 1)
             for q in m.weight_quantizers]
    return sum(steps) / len(steps)


def param_groups(student: nn.Module, cfg: DQCConfig) -> list[dict]:
    """Adam's parameter groups: all bounds at ``cfg.lr``, or one group per quantizer at
    ``cfg.lr * (u - l)`` (its mean range, for a per-channel grid) with ``bound_lr="relative"``.

    An absolute lr of 1e-2 moves softmax bounds (range 1) by 1% a step but NGswin's fc1-input
    bounds (range ~2000) by nothing measurable; a relative lr moves every grid alike.
    """
    if cfg.bound_lr == "absolute":
        groups = [{"params": bound_parameters(student)}]
    else:
        groups = []
        for _, q in quantizers(student):
            rng = float((q.upper.detach() - q.lower.detach()).abs().mean())
            groups.append({"params": [q.lower, q.upper], "lr": cfg.lr * max(rng, 1e-8)})
    if cfg.weight_lr > 0:
        groups += [{"params": ps, "lr": cfg.weight_lr * max(weight_step(m), 1e-12)}
                   for m, ps in linear_parameters(student)]
    return groups


class DQCStep:
    """One DQC training step, the unit ``run_dqc`` repeats and ``benchmarks.dqc_step`` times.

    ``step(lr)``: teacher forward (no autograd), student forward, output + feature loss,
    backward, Adam. The bounds train (and, with ``cfg.weight_lr > 0``, the quantized linears'
    weights and biases); ``close()`` removes the hooks and freezes them again.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DQCConfig) -> None:
        self.student, self.teacher, self.cfg = student.eval(), teacher.eval(), cfg
        self.params = bound_parameters(student)
        if cfg.weight_lr > 0:
            self.params += [p for _, ps in linear_parameters(student) for p in ps]
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(param_groups(student, cfg), lr=cfg.lr, betas=cfg.betas)
        # each grid keeps at least MIN_RANGE_FRACTION of its starting range: a step that would
        # cross the bounds (upper <= lower, no grid at all) stops there instead
        self.min_range = [(q, (MIN_RANGE_FRACTION * (q.upper - q.lower).detach().abs())
                           .clamp_min(MIN_RANGE)) for _, q in quantizers(student)]
        self.names = student.feature_modules()
        self.tap_s = _FeatureTap(student, self.names)
        self.tap_t = _FeatureTap(teacher, self.names)
        self.recompute = _Recompute(student, block_paths(student) if cfg.recompute else [])
        self.act_quantizers = activation_quantizers(student) if cfg.qdrop > 0 else []
        self._check_precision(next(student.parameters()).device)

    def _set_drop(self, p: float) -> None:
        for q in self.act_quantizers:
            q.drop = p

    def _autocast(self, lr: torch.Tensor):
        if self.cfg.precision == "bf16":
            return torch.autocast(lr.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _check_precision(self, device: torch.device) -> None:
        if self.cfg.precision == "bf16" and not native_bf16(str(device)):
            log.warning("DQC in bf16 on a %s without bfloat16 arithmetic: it is emulated, and "
                        "likely slower than fp32", "GPU" if device.type == "cuda" else "CPU")

    def step(self, lr: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        with torch.no_grad(), self._autocast(lr):
            out_t = self.teacher(lr)
        # QDrop's masks for the forward and for a recomputed block in the backward (checkpoint
        # restores the generator's state, so both draw the same mask)
        self._set_drop(cfg.qdrop)
        try:
            with self._autocast(lr):
                out_s = self.student(lr)
            loss = output_loss(out_s.float(), out_t.float(), cfg.feature_loss)
            feat = sum(feature_loss(self.tap_s.out[n].float(), self.tap_t.out[n].float(),
                                    cfg.feature_loss) for n in self.names)
            loss = loss + cfg.feature_weight * feat
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            self._set_drop(0.0)
        self.opt.step()
        with torch.no_grad():
            for q, gap in self.min_range:
                q.upper.copy_(torch.maximum(q.upper, q.lower + gap))
        self.tap_s.out.clear()
        self.tap_t.out.clear()
        return loss.detach()

    def close(self) -> None:
        self.tap_s.close()
        self.tap_t.close()
        self.recompute.close()
        for p in self.params:
            p.requires_grad_(False)


def run_dqc(student: nn.Module, teacher: nn.Module, sample: Callable[[int, int], torch.Tensor],
            val: tuple[torch.Tensor, torch.Tensor], cfg: DQCConfig,
            state_path: str | Path | None = None, resume: bool = False,
            deadline: float | None = None) -> DQCReport:
    """Train the bounds of ``student`` against ``teacher`` in place; keep the best-validated.

    ``sample(iteration, n)`` returns n LR training patches, a function of its arguments (so a
    resumed run sees the same patches); ``val`` is (LR, HR) held-out
    patches. With ``state_path`` the run saves its state there every ``cfg.ckpt_every`` steps
    and, with ``resume``, starts from it. ``deadline`` (a ``time.perf_counter()`` value) stops
    the run after the first step that ends past it: the stopping iteration is validated, saved
    to ``state_path`` and reported as ``stopped_at`` (``--resume`` continues from it).
    ``cfg.patience`` > 0 ends a run after that many validations in a row without a new best
    held-out PSNR: a complete run, reported as ``converged_at`` (beyond the paper: a budget
    with patience spends no time after the held-out curve has flattened).
    """
    torch.manual_seed(cfg.seed)
    scale = int(student.scale)
    dev = next(student.parameters()).device
    start, history = 0, []
    best = (0, val_psnr(student, *val, scale), bounds_state(student, cfg.weight_lr > 0))
    history.append({"iteration": 0, "val_psnr": best[1]})
    trainer = DQCStep(student, teacher, cfg)
    opt = trainer.opt
    state_path = Path(state_path) if state_path else None
    t0 = time.perf_counter()
    before = 0.0  # a resumed run's DQC seconds up to its last save
    stopped_at = converged_at = None
    try:
        if resume and state_path is not None and state_path.exists():
            st = read_resume_state(state_path)
            check_resumable(state_path, cfg, st)
            load_bounds(student, st["bounds"])
            opt.load_state_dict(st["optimizer"])
            start, history = st["iteration"], st["history"]
            before = st.get("seconds", history[-1].get("seconds", 0.0))
            best = (st["best_iteration"], st["best_val_psnr"], st["best_bounds"])
            torch.set_rng_state(st["torch_rng"])
            log.info("resuming DQC at iteration %d from %s", start, state_path)
        bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations,
                   desc="DQC", disable=progress_disabled(), leave=False)
        post = {"val": f"{best[1]:.2f}"}
        quiet = QuietBarLog(bar)  # a redirected log: a line every LOG_EVERY_S seconds
        for it in bar:
            loss = trainer.step(sample(it, cfg.batch).to(dev))
            done = it + 1
            late = deadline is not None and time.perf_counter() >= deadline
            validate = done % cfg.val_every == 0 or done == cfg.iterations or late
            if validate or done % 10 == 0 or dev.type == "cpu":  # .item() waits for a GPU
                post = {"loss": f"{loss.item():.3g}", "val": f"{best[1]:.2f}"}
            if validate:
                v = val_psnr(student, *val, scale)
                history.append({"iteration": done, "loss": loss.item(), "val_psnr": v,
                                "seconds": before + time.perf_counter() - t0})
                if v > best[1]:
                    best = (done, v, bounds_state(student, cfg.weight_lr > 0))
                post["val"] = f"{v:.2f}"
                log.debug("DQC %d: loss %.4g, val %.3f dB", done, loss.item(), v)
            bar.set_postfix(post, refresh=False)
            if quiet.due():
                log.info("DQC: iteration %d of %d, %.0f s; best held-out %.3f dB (iteration %d)",
                         done, cfg.iterations, quiet.elapsed(), best[1], best[0])
            if state_path is not None and (done % cfg.ckpt_every == 0 or done == cfg.iterations
                                           or late):
                _save_state(state_path, cfg, done, student, opt, history, best,
                            before + time.perf_counter() - t0)
            if late and done < cfg.iterations:
                stopped_at = done
                log.info("DQC: time limit reached at iteration %d of %d", done, cfg.iterations)
                break
            stale = sum(1 for h in history if h["iteration"] > best[0])  # validations since
            if validate and cfg.patience and stale >= cfg.patience and done < cfg.iterations:
                converged_at = done  # (a resumed run counts ``stale`` from its history alike)
                log.info("DQC: no better held-out PSNR in %d validations since iteration %d: "
                         "stopping at iteration %d of %d (patience)", stale, best[0], done,
                         cfg.iterations)
                break
        bar.close()
    finally:
        trainer.close()
    load_bounds(student, best[2])
    own = time.perf_counter() - t0
    rep = DQCReport(stopped_at or converged_at or cfg.iterations, before + own, best[0], best[1],
                    history, stopped_at, start, converged_at)
    ran = rep.iterations - start
    log.info("DQC (%s): %d iteration%s in %.0f s%s; best validation %.3f dB at iteration %d",
             cfg.precision, ran, "" if ran == 1 else "s", own,
             f" (resumed at {start}, now at {rep.iterations})" if start else "",
             rep.best_val_psnr, rep.best_iteration)
    return rep


def read_resume_state(path: str | Path) -> dict:
    """A resumable calibration's saved state (DQC state, resolved recipe or starting point);
    ``EdgeSRError`` naming the file when it cannot be read (a damaged or foreign file)."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle/zip errors of every kind: the file is not ours or damaged
        raise EdgeSRError(f"--resume: {path}: expected the state an interrupted edge-sr "
                          f"calibrate saved, could not read it ({type(e).__name__}); delete it "
                          "to calibrate from the start") from e
    if not isinstance(st, dict) or ("config" not in st and "requested" not in st):
        raise EdgeSRError(f"--resume: {path}: expected the state an interrupted edge-sr "
                          "calibrate saved, found another file; delete it to calibrate from "
                          "the start")
    return st


def differences(stored: dict, asked: dict) -> str:
    """``"k a there, b here; ..."`` for the keys whose values differ ("" if none)."""
    keys = [k for k in {**stored, **asked} if stored.get(k) != asked.get(k)]
    return "; ".join(f"{k} {stored.get(k)!r} there, {asked.get(k)!r} here" for k in keys)


def check_resumable(state_path: str | Path, cfg: DQCConfig, st: dict | None = None) -> None:
    """``EdgeSRError`` naming each setting that differs when the DQC state at ``state_path`` was
    written for another ``DQCConfig`` (``st``: the state, if already loaded)."""
    if st is None:
        st = read_resume_state(state_path)
    # a state saved before a setting existed ran with that setting's default (e.g. qdrop 0)
    diff = differences(asdict(DQCConfig()) | st["config"], asdict(cfg))
    if diff:
        raise EdgeSRError(f"--resume: the interrupted run's DQC ({state_path}) used other "
                          f"settings: {diff}")


def _save_state(path: Path, cfg: DQCConfig, iteration: int, student: nn.Module,
                opt: torch.optim.Optimizer, history: list, best: tuple, seconds: float) -> None:
    st = {"config": asdict(cfg), "iteration": iteration, "seconds": seconds,
          "bounds": bounds_state(student, cfg.weight_lr > 0),
          "optimizer": opt.state_dict(), "history": history, "best_iteration": best[0],
          "best_val_psnr": best[1], "best_bounds": best[2], "torch_rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(st, tmp)

