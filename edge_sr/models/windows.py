"""Window helpers shared by the windowed-attention models (SwinIR-light, NGswin): partition and
reverse as pure reshapes, Swin's relative-position index, and the shifted-window mask
(Liu et al., "Swin Transformer", ICCV 2021, Sec. 3.2)."""

from __future__ import annotations

import torch


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
