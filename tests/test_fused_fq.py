"""The fused CPU fake-quant kernels (calibrate.fused_fq) against the eager ops they replace."""

from __future__ import annotations

import pytest
import torch

from calibrate import fused_fq
from calibrate.quantizer import BoundFakeQuantizer, fake_quant

needs_kernels = pytest.mark.skipif(fused_fq.library() is None,
                                   reason="no C compiler here: the eager ops run instead")


def _inputs(shape=(3, 5, 64, 37), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    flat = x.view(-1)
    flat[:4] = torch.tensor([-0.75, 1.5, -3.0, 9.0])  # on both bounds, and outside them
    return x, torch.randn(shape, generator=g)


def _run(x0, g, lower, upper, bits):
    x = x0.clone().requires_grad_(True)
    lo = torch.tensor(lower, requires_grad=True)
    up = torch.tensor(upper, requires_grad=True)
    y = fake_quant(x, lo, up, bits)
    y.backward(g)
    return y.detach(), x.grad, lo.grad, up.grad


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fused_forward_is_bit_identical_and_gradients_match_eager(bits, monkeypatch):
    x, g = _inputs()
    # ties: inputs exactly half a step from a level round to even in both
    step = (torch.tensor(1.5) - torch.tensor(-0.75)) / (2**bits - 1)
    x.view(-1)[4:8] = -0.75 + step * torch.tensor([0.5, 1.5, 2.5, 0.5])
    fused = _run(x, g, -0.75, 1.5, bits)
    monkeypatch.setitem(fused_fq._state, "lib", None)  # the eager ops
    eager = _run(x, g, -0.75, 1.5, bits)
    assert torch.equal(fused[0], eager[0])
    assert torch.equal(fused[1], eager[1])
    # bound gradients: float64 block sums against float32 ones
    for a, b in zip(fused[2:], eager[2:]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-3)


@needs_kernels
def test_fused_takes_strided_views_and_no_grad_inputs(monkeypatch):
    x, g = _inputs((4, 64, 3, 2, 10))
    view = x.permute(2, 0, 3, 1, 4)[0]  # like the q of a qkv reshape: not contiguous
    assert not view.is_contiguous()
    lo, up = torch.tensor(-1.0), torch.tensor(2.0)
    with torch.no_grad():
        got = fake_quant(view, lo, up, 4)
    want = fused_fq.forward(view.contiguous(), -1.0, 2.0, float((up - lo) / 15))
    assert torch.equal(got, want)
    fused = _run(view, g.permute(2, 0, 3, 1, 4)[0], -1.0, 2.0, 4)
    monkeypatch.setitem(fused_fq._state, "lib", None)
    eager = _run(view, g.permute(2, 0, 3, 1, 4)[0], -1.0, 2.0, 4)
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])


@needs_kernels
def test_any_thread_count_gives_the_same_outputs_and_sums():
    x, g = _inputs((1, 200_003))  # over the 65,536 elements a kernel needs to split
    old = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            runs.append((fused_fq.forward(x, -0.5, 1.0, 0.1),
                         *fused_fq.backward(g, x, -0.5, 1.0, 0.1)))
    finally:
        torch.set_num_threads(old)
    (y1, gx1, s1), (y3, gx3, s3) = runs
    assert torch.equal(y1, y3) and torch.equal(gx1, gx3)
    assert s1 == s3  # per-block sums added in block order: bit for bit, not just close


@needs_kernels
def test_bfloat16_is_the_float32_result_rounded_once():
    """bf16 in -> bf16 out and f32 in -> bf16 out: the float32 fake quant cast to bfloat16,
    bit for bit; the backward's gx is g (or 0) exactly, and its sums match float32 ones of the
    same values."""
    x32, g32 = _inputs((3, 70_001))
    xb, gb = x32.bfloat16(), g32.bfloat16()
    lo, up, step = -0.7, 1.1, 1.8 / 15
    want = fused_fq.forward(xb.float(), lo, up, step).bfloat16()
    assert torch.equal(fused_fq.forward(xb, lo, up, step).view(torch.int16),
                       want.view(torch.int16))
    mixed = fused_fq.forward(x32, lo, up, step, out_dtype=torch.bfloat16)
    assert mixed.dtype == torch.bfloat16
    assert torch.equal(mixed.view(torch.int16),
                       fused_fq.forward(x32, lo, up, step).bfloat16().view(torch.int16))
    gx, sums = fused_fq.backward(gb, xb, lo, up, step)
    ref_gx, ref_sums = fused_fq.backward(gb.float(), xb.float(), lo, up, step)
    assert gx.dtype == torch.bfloat16 and torch.equal(gx.float(), ref_gx)
    assert sums == pytest.approx(ref_sums, rel=1e-5, abs=1e-3)
    gx, sums = fused_fq.backward(gb, x32, lo, up, step)  # f32 input, bf16 output gradient
    ref_gx, ref_sums = fused_fq.backward(gb.float(), x32, lo, up, step)
    assert gx.dtype == torch.float32 and torch.equal(gx, ref_gx)
    assert sums == pytest.approx(ref_sums, rel=1e-5, abs=1e-3)


@needs_kernels
def test_a_quantizer_under_bf16_autocast_hands_its_gemm_bfloat16():
    q = BoundFakeQuantizer(4)
    q.set_bounds(-1.0, 2.0)
    x = torch.randn(4, 64, 60)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.float(), q(x).bfloat16().float())  # the cast F.linear would make


def test_without_a_compiler_the_eager_ops_run(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_fq, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert fused_fq.library() is None
    q = BoundFakeQuantizer(2)
    q.set_bounds(-1.0, 2.0)  # step 1: levels -1, 0, 1, 2; 1.5 is a tie and rounds to even
    x = torch.tensor([-5.0, -0.6, 0.4, 1.5, 7.0])
    assert torch.equal(q(x), torch.tensor([-1.0, -1.0, 0.0, 1.0, 2.0]))


def test_switch_off_keeps_the_eager_ops(monkeypatch):
    monkeypatch.setattr(fused_fq, "_state", {})
    monkeypatch.setenv(fused_fq.ENV_SWITCH, "0")
    assert fused_fq.library() is None
    assert not fused_fq.usable(torch.zeros(3), torch.tensor(0.0))


@needs_kernels
def test_a_damaged_cached_library_is_compiled_again(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_SR_CACHE", str(tmp_path))
    monkeypatch.setattr(fused_fq, "_state", {})
    path = fused_fq._build(fused_fq.shutil.which("cc"))
    path.write_bytes(b"not a shared library")  # e.g. a disk that filled up mid-copy
    monkeypatch.setattr(fused_fq, "_state", {})
    assert fused_fq.library() is not None
    x = torch.linspace(-2, 2, 9)
    lo, up, step = torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(0.25)
    eager = torch.round((torch.clamp(x, lo, up) - lo) / step) * step + lo
    assert torch.equal(fused_fq.forward(x, -1.0, 1.0, 0.25), eager)
