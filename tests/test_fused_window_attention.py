"""The fused window attention (``edge_sr.models.windows.window_attention``): the same outputs as
the unfused products, and taken only where nothing observes or differentiates the attention."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_swinir
from test_ngswin import make_tiny_ngswin

import edge_sr.models.ngswin.blocks as ngswin_blocks
import edge_sr.models.swinir as swinir_mod
from edge_sr.models import windows


@pytest.fixture(autouse=True)
def _fused_on(monkeypatch):
    monkeypatch.setattr(windows, "FUSED_ATTENTION", True)


def _count_fused(monkeypatch, module) -> list[int]:
    calls = [0]
    real = windows.window_attention

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(module, "window_attention", counting)
    return calls


def test_window_attention_equals_softmax_of_biased_and_masked_logits() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, w, ws, nh, d = 2, 24, 32, 8, 3, 5
    nw, n = (h // ws) * (w // ws), ws * ws
    q, k, v = (torch.randn(b * nw, nh, n, d, generator=g) for _ in range(3))
    bias = torch.randn(1, nh, n, n, generator=g)
    mask = windows.shift_attention_mask(h, w, ws, ws // 2)
    touched = mask.flatten(1).ne(0).any(1)
    assert 0 < int(touched.sum()) < nw  # some windows masked, some not
    ref = ((q @ k.transpose(-2, -1)).view(b, nw, nh, n, n) + bias.unsqueeze(0)
           + mask.unsqueeze(1)).view(b * nw, nh, n, n).softmax(-1) @ v
    out = windows.window_attention(q, k, v, bias, mask)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-5
    unmasked = ((q @ k.transpose(-2, -1)) + bias).softmax(-1) @ v
    assert (windows.window_attention(q, k, v, bias, None) - unmasked).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["swinir", "ngswin"])
def test_models_give_the_unfused_outputs_within_float_rounding(arch, monkeypatch) -> None:
    """Batch 2 at a size that is not a multiple of the window (padded) with shifted blocks."""
    model, module = ((make_tiny_swinir(2), swinir_mod) if arch == "swinir"
                     else (make_tiny_ngswin(2), ngswin_blocks))
    x = torch.rand(2, 3, 36, 44, generator=torch.Generator().manual_seed(1))
    calls = _count_fused(monkeypatch, module)
    with torch.no_grad():
        fused = model(x)
        n_fused = calls[0]
        assert n_fused > 0
        monkeypatch.setattr(windows, "FUSED_ATTENTION", False)
        unfused = model(x)
    assert calls[0] == n_fused  # the unfused run made no further calls
    assert (fused - unfused).abs().max() < 2e-5


def test_taken_only_for_float32_inference_with_nothing_observing_the_probabilities(
        monkeypatch) -> None:
    model = make_tiny_swinir(2)
    x = torch.rand(1, 3, 16, 16)
    calls = _count_fused(monkeypatch, swinir_mod)

    def fused_calls(fn) -> int:
        calls[0] = 0
        fn()
        return calls[0]

    blocks = model.layers[0].residual_group.blocks
    with torch.no_grad():
        assert fused_calls(lambda: model(x)) == len(model.layers) * len(blocks)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # measured slower there
            assert fused_calls(lambda: model(x)) == 0
        slot = blocks[0].attn.attn_probs_quant
        handle = slot.register_forward_hook(lambda *a: None)  # DOBI / DQC observing
        assert fused_calls(lambda: model(x)) == len(model.layers) * len(blocks) - 1
        handle.remove()
        blocks[1].attn.attn_probs_quant = torch.nn.Hardtanh()  # a quantizer stands there
        assert fused_calls(lambda: model(x)) == len(model.layers) * len(blocks) - 1
    # with autograd through the attention (a DQC student, an input gradient): unfused
    assert fused_calls(lambda: model(x.requires_grad_(True)).sum().backward()) == 0
    # export traces the unfused products, which the ONNX passes rewrite
    assert fused_calls(lambda: torch.jit.trace(model, torch.rand(1, 3, 16, 16),
                                                        check_trace=False)) == 0
