"""DOBI: distribution-oriented bound initialisation (spec §3), exact and vectorised.

Each quantizer's 100 candidate bound pairs are scored by the exact squared error
``sum((x - Q(x; l_i, u_i))**2)`` over the whole FP tensor, without running 100 fake-quant passes.
Every candidate's error is a sum over intervals cut by its clip bounds and rounding midpoints;
all candidates' cut points are merged into one sorted threshold list, each element is bucketed
once (``torch.bucketize``) and per-interval count / sum / sum of squares are accumulated in
float64. Prefix sums then give every candidate's error in O(candidates x levels). Elements that
sit exactly on a cut point contribute the same error on either side, so the result equals the
brute-force objective up to float64 rounding. Tensors are processed in chunks, one quantizer at a
time as its input is captured, so memory stays bounded (the 50M-element softmax included).
By default tensors above ``DEFAULT_MAX_ELEMENTS`` are scored on a seeded random 1M-element
subset (see there); ``max_elements=None`` scores every element.

Statistics come from FP activations: quantizers are disabled during the single forward pass and
never change state in ``forward``; bounds are set only after the pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from calibrate.prepare import quantizers, set_quant_enabled
from calibrate.qmodules import QuantLinear
from calibrate.quantizer import BoundFakeQuantizer, Grid, Search, fake_quant_nograd, grid_bounds

log = logging.getLogger(__name__)

NUM_CANDIDATES = 100
CHUNK = 1 << 22  # elements per bucketing chunk (16 MB of fp32)
# Activation tensors above this many elements are scored on a seeded random subset (min/max, and
# so the candidate grid, always come from the whole tensor). On the shared 2-core CPU the exact
# objective over all 2.7 G calibration elements takes ~10 min; ``None`` restores it.
DEFAULT_MAX_ELEMENTS = 1 << 20


def candidate_bounds(lo: float, hi: float, search: Search,
                     num: int = NUM_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's candidate grid: two-sided shrinks both ends by (M-m)/200 per step about
    the midpoint; one-sided keeps l = min and moves u down by (M-m)/100 per step."""
    i = torch.arange(num, dtype=torch.float64)
    if search == "two_sided":
        d = (hi - lo) / (2 * num)
        return lo + i * d, hi - i * d
    if search == "one_sided":
        d = (hi - lo) / num
        return torch.full_like(i, lo), hi - i * d
    raise ValueError(f"search must be 'two_sided' or 'one_sided', got {search!r}")


def _cut_points(lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """(C, n+2) cut points per candidate: l, the n rounding midpoints, u (n = 2^b - 1)."""
    n = 2**bits - 1
    step = (upper - lower) / n
    k = torch.arange(1, n + 1, dtype=torch.float64)
    mids = lower[:, None] + (k[None, :] - 0.5) * step[:, None]
    return torch.cat([lower[:, None], mids, upper[:, None]], dim=1)


def interval_stats(x: torch.Tensor, thresholds: torch.Tensor, center: float,
                   chunk: int = CHUNK) -> torch.Tensor:
    """Count, sum and sum of squares of ``x - center`` per interval of sorted ``thresholds``.

    Returns (3, T+1) float64; column j covers T[j-1] < x <= T[j].
    """
    flat = x.detach().reshape(-1)
    t32 = thresholds.to(flat.dtype)
    nb = thresholds.numel() + 1
    acc = torch.zeros(3, nb, dtype=torch.float64)
    for start in range(0, flat.numel(), chunk):
        c = flat[start:start + chunk]
        idx = torch.bucketize(c, t32)
        cd = c.double() - center
        acc[0].index_add_(0, idx, torch.ones_like(cd))
        acc[1].index_add_(0, idx, cd)
        acc[2].index_add_(0, idx, cd * cd)
    return acc


def candidate_errors_multi(x: torch.Tensor,
                           grids: list[tuple[torch.Tensor, torch.Tensor, int]]) -> list[torch.Tensor]:
    """Exact sum of squared fake-quant errors of ``x`` for every candidate of every grid.

    ``grids`` holds (lower, upper, bits) candidate sets; all their cut points share one bucketing
    pass over ``x`` (so searching 2, 3 and 4 bits together costs about as much as one).
    """
    # bucketing uses fp32 thresholds: evaluate with the same rounded values
    cuts_list = [_cut_points(lo.double(), up.double(), b).float().double() for lo, up, b in grids]
    center = float((cuts_list[0][0, 0] + cuts_list[0][0, -1]) / 2)
    sorted_cuts, order = torch.sort(torch.cat([c.reshape(-1) for c in cuts_list]))
    prefix = torch.cumsum(interval_stats(x, sorted_cuts, center), dim=1)  # x <= sorted_cuts[j]
    total = prefix[:, -1]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel())
    out, offset = [], 0
    for cuts, (_, _, bits) in zip(cuts_list, grids):
        at = prefix[:, pos[offset:offset + cuts.numel()]].reshape(3, *cuts.shape)
        offset += cuts.numel()
        out.append(_errors_from_prefix(at, total, cuts - center, bits))
    return out


def _errors_from_prefix(at: torch.Tensor, total: torch.Tensor, cuts: torch.Tensor,
                        bits: int) -> torch.Tensor:
    cnt, s1, s2 = at[0], at[1], at[2]  # (C, n+2): stats of elements <= each cut point

    def sq_err(c, a, b, g):  # sum (x - g)^2 over elements with count c, sum a, sum of squares b
        return b - 2 * g * a + c * g * g

    n = 2**bits - 1
    lo, up = cuts[:, 0], cuts[:, -1]
    step = (up - lo) / n
    err = sq_err(cnt[:, 0], s1[:, 0], s2[:, 0], lo)  # below l: clipped to l
    err = err + sq_err(total[0] - cnt[:, -1], total[1] - s1[:, -1], total[2] - s2[:, -1], up)
    # cut points [l, m_1, ..., m_n, u]: the interval between cut j and cut j+1 rounds to level j
    g = lo[:, None] + torch.arange(n + 1, dtype=torch.float64)[None, :] * step[:, None]
    err = err + sq_err(cnt.diff(dim=1), s1.diff(dim=1), s2.diff(dim=1), g).sum(dim=1)
    return err.clamp_min(0)


def candidate_errors(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                     bits: int) -> torch.Tensor:
    """Exact sum of squared fake-quant errors of ``x`` for every candidate (l_i, u_i)."""
    return candidate_errors_multi(x, [(lower, upper, bits)])[0]


def brute_force_errors(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                       bits: int) -> torch.Tensor:
    """Reference objective, one fake-quant pass per candidate (tests only)."""
    xd = x.double()
    return torch.stack([((xd - fake_quant_nograd(xd, lo, up, bits)) ** 2).sum()
                        for lo, up in zip(lower.tolist(), upper.tolist())])


def subsample(x: torch.Tensor, max_elements: int | None, seed: int = 0) -> torch.Tensor:
    """A seeded uniform random subset of ``max_elements`` elements (all of ``x`` if None/smaller).

    Random, not strided: a stride would alias with the channel dimension.
    """
    flat = x.detach().reshape(-1)
    if max_elements is None or flat.numel() <= max_elements:
        return flat
    g = torch.Generator().manual_seed(seed)
    return flat[torch.randint(flat.numel(), (max_elements,), generator=g)]


def constrain_candidates(lower: torch.Tensor, upper: torch.Tensor, bits: int, grid: Grid
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate (l, u) as the constrained grid that runs (``quantizer.grid_bounds``).

    ``"symmetric"`` takes the step that keeps both ends on the grid,
    ``s = max(-l / 2^(b-1), u / (2^(b-1) - 1))``, so a candidate still covers its range; the
    result is a fixed point of ``grid_bounds`` (what the quantizer then applies unchanged).
    """
    if grid == "symmetric":
        half = 2 ** (bits - 1)
        s = torch.maximum(-lower / half, upper / (half - 1)).clamp_min(1e-12)
        return -half * s, (half - 1) * s
    return grid_bounds(lower, upper, bits, grid)


def search_bounds_multi(x: torch.Tensor, bits_list: list[int], search: Search,
                        num: int = NUM_CANDIDATES, max_elements: int | None = None,
                        grid: Grid = "real") -> dict[int, tuple[float, float]]:
    """DOBI for one tensor at several bit widths: least squared error, ties -> widest range.

    The candidate grid always comes from the whole tensor's min/max; with ``max_elements`` the
    error is scored on a seeded random subset of that many elements (exact when None). With a
    constrained ``grid`` (beyond the paper), every candidate is first moved onto it, so the
    search scores the grids that will run.
    """
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
        if grid == "real":  # the reference's degenerate range
            return {b: (lo, hi) for b in bits_list}
        # a constant tensor on a grid that holds 0: a range from 0 to the constant
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        return {b: tuple(float(v) for v in constrain_candidates(
            torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64), b,
            grid)) for b in bits_list}
    lower, upper = candidate_bounds(lo, hi, search, num)
    cands = {b: constrain_candidates(lower, upper, b, grid) for b in bits_list}
    errs = candidate_errors_multi(subsample(x, max_elements),
                                  [(cands[b][0], cands[b][1], b) for b in bits_list])
    # argmin returns the first minimum: the widest range, as the reference's strict '<'
    return {b: (float(cands[b][0][int(e.argmin())]), float(cands[b][1][int(e.argmin())]))
            for b, e in zip(bits_list, errs)}


def search_bounds(x: torch.Tensor, bits: int, search: Search,
                  num: int = NUM_CANDIDATES) -> tuple[float, float]:
    """DOBI for one tensor (spec §3)."""
    return search_bounds_multi(x, [bits], search, num)[bits]


# --- one FP pass, any bound rule -------------------------------------------------------------

Rule = Callable[[torch.Tensor, Search], Any]


@dataclass
class CollectReport:
    seconds: float
    rule_seconds: float
    quantizers: int
    tap_seconds: float = 0.0  # the ``tap``'s share of ``seconds`` (not in ``rule_seconds``)


def per_row(rule: Rule, w: torch.Tensor, search: Search, *extra) -> dict:
    """``rule`` on every row of ``w`` (a per-channel quantizer's rows), merged per key.

    ``rule`` returns {key: (lower, upper)}; the result is {key: ([lower per row], [upper per
    row])}, what ``BoundFakeQuantizer.set_bounds`` takes for a per-channel grid.
    """
    rows = [rule(r, search, *extra) for r in w]
    return {k: ([r[k][0] for r in rows], [r[k][1] for r in rows]) for k in rows[0]}


@torch.no_grad()
def collect(student: nn.Module, calib_lr: torch.Tensor, rule: Rule,
            names: set[str] | None = None, pass_name: bool = False,
            rule_arg: Callable[[str], Any] | None = None,
            tap: Callable[[str, torch.Tensor], None] | None = None
            ) -> tuple[dict[str, Any], CollectReport]:
    """Apply ``rule(tensor, search)`` to every quantizer's FP input in one forward pass
    (or only to the quantizers in ``names``); with ``pass_name``, ``rule(tensor, search, name)``;
    with ``rule_arg``, ``rule(tensor, search, rule_arg(name))`` (quantizers that see one tensor
    and give the same ``rule_arg`` share one call). ``tap(name, tensor)``, when given, also sees
    every activation quantizer's input (e.g. ``calibrate.gptq.HessianTap``), in the same pass;
    its time is the report's ``tap_seconds``.

    Quantizers are disabled (identity) during the pass, so every tensor is the FP network's
    activation (spec §7.12); weight quantizers see their weight blocks directly. Each tensor is
    reduced as soon as it is captured and then dropped, so memory stays at one activation. On a
    GPU the forward pass runs there and ``rule`` gets a host copy, so the bounds are computed by
    the same (CPU) code on every device.
    """
    t0 = time.perf_counter()
    qs = {n: q for n, q in quantizers(student) if names is None or n in names}
    results: dict[str, Any] = {}
    cache: dict[tuple, Any] = {}
    rule_time = [0.0]
    tap_time = [0.0]

    def run_rule(name: str, q: BoundFakeQuantizer, x: torch.Tensor) -> None:
        t = time.perf_counter()
        extra = (name,) if pass_name else (rule_arg(name),) if rule_arg else ()
        key = (x.data_ptr(), tuple(x.shape), q.search) + extra
        host = None
        if tap is not None:
            host = x.detach().cpu()
            tap(name, host)
            tap_time[0] += time.perf_counter() - t
            t = time.perf_counter()
        if key not in cache or pass_name:  # qkv separation: three quantizers see one tensor
            cache.clear()
            # keep ``x`` alive with its result: once freed, a later tensor of the same shape
            # could reuse its address and be given this result
            args = (x.detach().cpu() if host is None else host, q.search) + extra
            cache[key] = (x, rule(*args))
        results[name] = cache[key][1]
        rule_time[0] += time.perf_counter() - t

    for name, m in student.named_modules():
        if isinstance(m, QuantLinear):
            for i, w in enumerate(m.weight_blocks()):
                wq = m.weight_quantizers[i]
                wname = f"{name}.weight_quantizers.{i}"
                if wname in qs:
                    extra = (wname,) if pass_name else (rule_arg(wname),) if rule_arg else ()
                    results[wname] = (
                        per_row(rule, w.detach().cpu(), wq.search, *extra) if wq.per_channel
                        else rule(w.detach().cpu(), wq.search, *extra))
    hooks = [q.register_forward_hook(lambda mod, inp, out, name=name: run_rule(name, mod, inp[0]))
             for name, q in qs.items() if name not in results]
    set_quant_enabled(student, False)
    try:
        student(calib_lr.to(next(student.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        set_quant_enabled(student, True)
    missing = [n for n in qs if n not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers saw no data during calibration, "
                           f"e.g. {missing[0]}")
    total = time.perf_counter() - t0
    return results, CollectReport(total, rule_time[0], len(results), tap_time[0])


def apply_bounds(student: nn.Module, bounds: dict[str, tuple[float, float]]) -> None:
    """Set every quantizer's (lower, upper); every quantizer must be covered."""
    qs = dict(quantizers(student))
    if set(qs) != set(bounds):
        extra, missing = sorted(set(bounds) - set(qs)), sorted(set(qs) - set(bounds))
        raise ValueError(f"bounds do not match the model's quantizers: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, (lo, up) in bounds.items():
        qs[name].set_bounds(lo, up)


def dobi_bounds(student: nn.Module, calib_lr: torch.Tensor, bits_list: list[int],
                max_elements: int | None = DEFAULT_MAX_ELEMENTS,
                tap: Callable[[str, torch.Tensor], None] | None = None
                ) -> tuple[dict[int, dict[str, tuple[float, float]]], CollectReport]:
    """DOBI bounds for several bit widths from one FP pass: {bits: {quantizer: (l, u)}}.
    ``tap``: ``collect``'s, on the same pass.

    A quantizer whose width differs from the student's recipe (``QuantRecipe.wide_inputs``) keeps
    its own width in every entry. Every tensor is searched at the union of the widths (one extra
    width costs ~20 s for SwinIR-light; cheaper than a second FP pass).
    """
    recipe = getattr(student, "quant_recipe", None)
    fixed = {n: q.bits for n, q in quantizers(student)
             if recipe is not None and q.bits != recipe.bits}
    search = sorted(set(bits_list) | set(fixed.values()))
    grids = {n: q.grid for n, q in quantizers(student)}
    res, rep = collect(student, calib_lr,
                       lambda x, s, grid: search_bounds_multi(
                           x, search, s, max_elements=max_elements, grid=grid),
                       rule_arg=grids.get, tap=tap)
    out = {b: {name: r[fixed.get(name, b)] for name, r in res.items()} for b in bits_list}
    log.info("DOBI: %d quantizers x %d bit widths in %.1f s (search %.1f s%s)", rep.quantizers,
             len(bits_list), rep.seconds, rep.rule_seconds,
             f", GPTQ's Hessians on the same pass {rep.tap_seconds:.1f} s" if tap else "")
    return out, rep


def init_bounds(student: nn.Module, calib_lr: torch.Tensor,
                max_elements: int | None = DEFAULT_MAX_ELEMENTS) -> CollectReport:
    """Run DOBI at the student's own bit width(s) and set its bounds."""
    recipe = getattr(student, "quant_recipe", None)
    bits = {q.bits for _, q in quantizers(student)}
    if recipe is None and len(bits) != 1:
        raise ValueError(f"init_bounds expects one bit width, found {sorted(bits)}")
    b = recipe.bits if recipe is not None else bits.pop()
    bounds, rep = dobi_bounds(student, calib_lr, [b], max_elements)
    apply_bounds(student, bounds[b])
    return rep
