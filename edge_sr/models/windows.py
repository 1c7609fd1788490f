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
