"""DOBI: the vectorised exact search against brute force and known optima; FP statistics."""

from __future__ import annotations

import pytest
import torch

from calibrate.dobi import (
    brute_force_errors,
    candidate_bounds,
    candidate_errors,
    collect,
    dobi_bounds,
    init_bounds,
    search_bounds,
    search_bounds_multi,
)
from calibrate.prepare import QuantRecipe, prepare, quantizers


def _dists():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(4000, generator=g)
    soft = (torch.randn(40, 64, generator=g) * 3).softmax(-1).flatten()
    gelu = torch.nn.functional.gelu(torch.randn(4000, generator=g) * 2)
    return {"normal": normal, "softmax": soft, "gelu": gelu}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("search", ["two_sided", "one_sided"])
@pytest.mark.parametrize("dist", ["normal", "softmax", "gelu"])
def test_vectorised_errors_equal_brute_force(bits, search, dist):
    x = _dists()[dist]
    lo, up = candidate_bounds(float(x.min()), float(x.max()), search)
    fast = candidate_errors(x, lo, up, bits)
    slow = brute_force_errors(x, lo, up, bits)
    torch.testing.assert_close(fast, slow, rtol=2e-6, atol=1e-9)
    # the chosen candidate is optimal under the brute-force objective
    best = int(fast.argmin())
    assert slow[best] <= slow.min() * (1 + 1e-6)


def test_candidate_grids_follow_the_reference():
    lo, up = candidate_bounds(-1.0, 3.0, "two_sided")
    assert lo.numel() == 100 and (lo[0], up[0]) == (-1.0, 3.0)
    assert float(lo[99]) == pytest.approx(-1 + 99 * 0.02) and float(up[99]) == pytest.approx(3 - 99 * 0.02)
    lo, up = candidate_bounds(-1.0, 3.0, "one_sided")
    assert torch.all(lo == -1.0) and float(up[99]) == pytest.approx(3 - 99 * 0.04)


@pytest.mark.parametrize("bits", [2, 4])
def test_uniform_data_optimum_is_half_a_cell_inside(bits):
    # levels on the bounds: for U(-1, 1) the MSE optimum puts them at the centers of 2^b cells
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = torch.cat([u, -u])
    lo, up = search_bounds(x, bits, "two_sided")
    delta = (float(x.max()) - float(x.min())) / 200
    assert abs(up - (1 - 1 / 2**bits)) <= delta and abs(lo + (1 - 1 / 2**bits)) <= delta


@pytest.mark.parametrize("bits,clip", [(2, 1.4935), (3, 2.051), (4, 2.514)])
def test_gaussian_recovers_max_quantizer_clipping(bits, clip):
    # MSE-optimal uniform quantizer of N(0,1) (Max, 1960): 4/8/16 levels -> range +-1.49/2.05/2.51
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    x = torch.cat([g, -g])  # symmetric: the two-sided grid shrinks about the midpoint of [m, M]
    lo, up = search_bounds(x, bits, "two_sided")
    delta = (float(x.max()) - float(x.min())) / 200
    assert abs(up - clip) < delta + 0.03 and abs(-lo - clip) < delta + 0.03


def test_multi_bit_search_matches_single():
    x = _dists()["gelu"]
    multi = search_bounds_multi(x, [2, 3, 4], "one_sided")
    assert multi == {b: search_bounds(x, b, "one_sided") for b in (2, 3, 4)}


def test_subsample_keeps_grid_from_whole_tensor():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(3))
    lo, up = search_bounds_multi(x, [3], "two_sided", max_elements=1000)[3]
    m, big_m = float(x.min()), float(x.max())
    i = (lo - m) / ((big_m - m) / 200)  # a candidate of the full tensor's grid
    assert abs(i - round(i)) < 1e-6 and up == pytest.approx(big_m - round(i) * (big_m - m) / 200)
    exact = search_bounds(x, 3, "two_sided")
    err = brute_force_errors(x, torch.tensor([lo, exact[0]]), torch.tensor([up, exact[1]]), 3)
    assert err[1] <= err[0] <= err[1] * 1.05  # the subset's choice is nearly as good


def test_collect_uses_fp_activations_and_sets_all_bounds(tiny_swinir):
    fp = tiny_swinir(2)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    student = prepare(fp, QuantRecipe(bits=4))
    seen = {}
    res, rep = collect(student, x, lambda t, s: seen.setdefault(id(t), t.clone()) is not None)
    assert rep.quantizers == len(dict(quantizers(student))) == 2 * 2 * 16
    # first block's qkv input is LayerNorm1 of the FP stream: compare with the FP model
    feats = {}
    h = fp.layers[0].residual_group.blocks[0].norm1.register_forward_hook(
        lambda m, i, o: feats.setdefault("n1", o))
    with torch.no_grad():
        fp(x)
    h.remove()
    assert any(t.numel() == feats["n1"].numel() and torch.equal(t.reshape(-1).sort()[0],
               feats["n1"].reshape(-1).sort()[0]) for t in seen.values())
    init_bounds(student, x)
    qs = dict(quantizers(student))
    assert all(bool(q.initialized) for q in qs.values())
    # qkv separation: three input quantizers on one tensor get identical bounds
    a = [qs[f"layers.0.residual_group.blocks.0.attn.qkv.act_quantizers.{i}"] for i in range(3)]
    assert len({(float(q.lower.detach()), float(q.upper.detach())) for q in a}) == 1
    # the paper assignment: softmax searched one-sided, so its lower bound is the FP minimum >= 0
    sm = qs["layers.0.residual_group.blocks.0.attn.attn_probs_quant"]
    assert sm.search == "one_sided" and float(sm.lower.detach()) >= 0


def test_released_assignment_is_two_sided_everywhere(tiny_swinir):
    student = prepare(tiny_swinir(2), QuantRecipe(bits=3, search_assignment="released"))
    assert {q.search for _, q in quantizers(student)} == {"two_sided"}
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    bounds, _ = dobi_bounds(student, x, [2, 3])
    assert set(bounds) == {2, 3} and len(bounds[2]) == 64
