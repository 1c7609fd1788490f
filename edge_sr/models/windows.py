"""Window helpers shared by the windowed-attention models (SwinIR-light, NGswin): partition and
reverse as pure reshapes, Swin's relative-position index, and the shifted-window mask
(Liu et al., "Swin Transformer", ICCV 2021, Sec. 3.2)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# EDGE_SR_FUSED_ATTENTION=0 keeps every window attention on its unfused path (measurements)
FUSED_ATTENTION = os.environ.get("EDGE_SR_FUSED_ATTENTION", "1") != "0"


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B * nW, ws * ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) int64: row of the ((2 ws - 1)^2, heads) bias table for each token pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def shift_attention_mask(h, w, ws: int, shift: int) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) mask of 0 / -100 for shifted-window attention, as in Swin/SwinIR.

    Swin labels the (h, w) map by nine regions (rows and columns each split at ``-ws`` and
    ``-shift``) and masks token pairs of different regions. Computed with tensor operations only
    (no slice assignment, no Python loop), so ``h`` and ``w`` may also be traced sizes (0-d
    tensors) and a dynamic-shape ONNX export computes the mask in the graph.
    """
    def labels(n):
        r = torch.arange(n)
        return (r >= n - ws).to(torch.int64) + (r >= n - shift).to(torch.int64)

    img = (labels(h)[:, None] * 3 + labels(w)[None, :]).to(torch.float32)
    win = window_partition(img[None, :, :, None], ws)[..., 0]  # not squeeze: no ONNX If
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.where(mask != 0, torch.tensor(-100.0), torch.tensor(0.0))


def logits_in_place(*params: torch.Tensor) -> bool:
    """Whether a window attention may scale and bias its logits (the fresh output of q @ k^T) in
    place: bitwise the same result (the same operations in the same order) without allocating,
    and page-faulting in, three more (windows x heads x n x n) tensors: ~100 MB each for a
    batch of 16 64x64 patches, ~300 MB for a 512x384 image.

    Not while tracing for export, and not where autograd must differentiate through ``params``
    (the logit scale, the relative-position bias table). The logits themselves may require
    grad (a DQC student, or the input gradient of a plain forward + backward): q @ k^T keeps its
    inputs for the backward, not its output, and a multiply by a constant keeps the constant.
    """
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))


def window_logits(q: torch.Tensor, k: torch.Tensor, windows: int | None,
                  in_place: bool) -> torch.Tensor:
    """``q @ k^T`` of (B*nW, heads, n, d) queries and keys. With ``in_place`` (see
    ``logits_in_place``) and a shifted-window mask over ``windows`` windows the logits come out as
    (B, nW, heads, n, n), the same bmm, so that the mask is added in place to the tensor itself:
    an in-place add on a *view* would make autograd copy the whole tensor back in the backward.
    Otherwise (B*nW, heads, n, n)."""
    if in_place and windows is not None:
        b = q.shape[0] // windows
        q, k = q.unflatten(0, (b, windows)), k.unflatten(0, (b, windows))
    return q @ k.transpose(-2, -1)


def fused_attention_ok(probs_slot: nn.Module, *tensors: torch.Tensor) -> bool:
    """Whether a window attention may run as ``window_attention`` (``scaled_dot_product_attention``)
    instead of its unfused ``softmax(q @ k^T + bias [+ mask]) @ v``: inference only.

    Not while tracing for export (the export's graph passes read the unfused pattern), not where
    the attention probabilities are observed (``probs_slot`` holds a quantizer, or DOBI or DQC
    hooks it), and not where autograd must differentiate through ``tensors`` (PyTorch's CPU
    backward of the fused kernel is slower than the unfused one in bfloat16). Only for float32
    on the CPU, where it was measured (``tensors[0]``, the queries, gives the dtype and device):
    1.13-1.44x faster model forwards on SwinIR-light and NGswin; under CPU bfloat16 autocast the
    fused kernel is slower than the unfused products (0.55-0.93x).
    """
    if not FUSED_ATTENTION or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    q = tensors[0]
    if q.device.type != "cpu" or q.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if not isinstance(probs_slot, nn.Identity) or probs_slot._forward_hooks \
            or probs_slot._forward_pre_hooks:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q @ k^T + bias [+ mask]) @ v`` without the logits tensor: q, k, v (B*nW, heads,
    n, d), already scaled; ``bias`` (1, heads, n, n); ``mask`` (nW, n, n) (``shift_attention_mask``)
    or None. Returns (B*nW, heads, n, d) in q's dtype (or autocast's).

    One ``F.scaled_dot_product_attention`` call runs every window with the bias alone; the windows
    the shifted-window mask touches (the last row and column of windows) run again with it and
    overwrite theirs, as the ONNX export's ``Attention`` operators do (``edge_sr.onnx_tidy``), so
    no (windows x heads x n x n) tensor is made. Inference only (the second call writes in place).
    """
    dt = q.dtype
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(dt), scale=1.0)
    if mask is None:
        return out
    nw = int(mask.shape[0])
    b = q.shape[0] // nw
    sel = mask.flatten(1).ne(0).any(1).nonzero().squeeze(1)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(0, (b, nw))[:, sel].flatten(0, 1)

    m = (mask[sel].unsqueeze(1).to(dt) + bias.to(dt)).repeat(b, 1, 1, 1)
    sub = F.scaled_dot_product_attention(pick(q), pick(k), pick(v), attn_mask=m, scale=1.0)
    out.unflatten(0, (b, nw))[:, sel] = sub.unflatten(0, (b, -1)).to(out.dtype)
    return out
