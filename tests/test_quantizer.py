"""The fake quantizer's grid and its straight-through gradients (spec §2), by hand."""

from __future__ import annotations

import pytest
import torch

from calibrate.quantizer import (
    BoundFakeQuantizer,
    QParams,
    check_bits,
    fake_quant,
    fake_quant_nograd,
    fake_quant_reference,
)


def test_grid_levels_and_rounding():
    # l = -1, u = 2, 2 bits: step 1, grid {-1, 0, 1, 2}
    x = torch.tensor([-5.0, -1.0, -0.6, -0.5, -0.4, 0.5, 1.49, 1.5, 2.0, 7.0])
    y = fake_quant_nograd(x, -1.0, 2.0, 2)
    # codes (x+1): 0.4 -> 0, 0.5 -> 0 (half to even), 0.6 -> 1, 1.5 -> 2, 2.49 -> 2, 2.5 -> 2
    assert y.tolist() == [-1.0, -1.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0]


def test_grid_matches_module_and_qparams():
    q = BoundFakeQuantizer(3)
    q.set_bounds(-0.3, 1.1)
    x = torch.linspace(-1, 2, 101)
    p = q.qparams()
    assert isinstance(p, QParams) and p.bits == 3
    assert (p.lower, p.upper) == (pytest.approx(-0.3), pytest.approx(1.1))
    assert p.levels == 8 and p.scale == pytest.approx(1.4 / 7)
    assert p.zero_point == pytest.approx(0.3 / (1.4 / 7))
    y = q(x)
    assert torch.equal(y, fake_quant_nograd(x, q.lower.detach(), q.upper.detach(), 3))
    assert y.unique().numel() == 8


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_on_grid_inputs_unchanged(bits):
    lo, up = torch.tensor(-0.75), torch.tensor(1.25)
    grid = lo + (up - lo) / (2**bits - 1) * torch.arange(2**bits, dtype=torch.float32)
    torch.testing.assert_close(fake_quant_nograd(grid, lo, up, bits), grid, atol=1e-6, rtol=0)
    torch.testing.assert_close(fake_quant(grid, lo, up, bits), grid, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fq", [fake_quant, fake_quant_reference])
def test_ste_gradients_hand_derived(fq):
    # l = 0, u = 3, 2 bits: s = 1, N = 3. Inputs: below, inside (two), above.
    x = torch.tensor([-1.0, 0.4, 1.7, 5.0], requires_grad=True)
    lo = torch.tensor(0.0, requires_grad=True)
    up = torch.tensor(3.0, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = fq(x, lo, up, 2)
    assert y.tolist() == [0.0, 0.0, 2.0, 3.0]
    y.backward(g)
    # dx: 1 inside, 0 outside
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 0.0]
    # inside: d/du = (q - (x-l)/s)/N, d/dl = -(q - (x-l)/s)/N; x<l -> l gets g; x>u -> u gets g
    du = 2.0 * (0 - 0.4) / 3 + 3.0 * (2 - 1.7) / 3 + 4.0
    dl = 1.0 + 2.0 * (-(0 - 0.4) / 3) + 3.0 * (-(2 - 1.7) / 3)
    assert up.grad.item() == pytest.approx(du, abs=1e-6)
    assert lo.grad.item() == pytest.approx(dl, abs=1e-6)


def test_disabled_quantizer_is_identity_and_forward_keeps_state():
    q = BoundFakeQuantizer(2)
    q.set_bounds(0.0, 1.0)
    x = torch.randn(100)
    q.enabled = False
    assert q(x) is x
    q.enabled = True
    q(x)
    assert (float(q.lower), float(q.upper)) == (0.0, 1.0)


@pytest.mark.parametrize("bad", [1, 9, 0, 2.5, True, "4"])
def test_bits_outside_range_rejected(bad):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        check_bits(bad)


def test_fused_matches_reference_composition():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(500, generator=g) * 2
    x0[:3] = torch.tensor([-0.5, 1.25, 0.0])  # exactly on the bounds
    grads = []
    for fq in (fake_quant, fake_quant_reference):
        x = x0.clone().requires_grad_(True)
        lo = torch.tensor(-0.5, requires_grad=True)
        up = torch.tensor(1.25, requires_grad=True)
        y = fq(x, lo, up, 3)
        y.backward(torch.linspace(-1, 1, 500))
        grads.append((y.detach(), x.grad, lo.grad, up.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
