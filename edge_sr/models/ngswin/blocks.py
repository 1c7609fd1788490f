"""The N-Gram Swin Transformer Block (NSTB) of NGswin, with its window attention and N-gram context.

Written for edge-sr from the paper (Choi et al., CVPR 2023) and the public code of
rami0205/NGramSwin, whose parameter names we keep so the official checkpoints load strictly.

Differences from SwinIR's block that matter for quantization:

- Attention is *scaled cosine* attention (Swin V2): q and k are L2-normalised per head, their dot
  product is multiplied by a learned per-head ``logit_scale`` (clamped at log 100), then the
  relative position bias is added. There is no ``q * head_dim**-0.5``; the ``q`` and ``k`` slots
  therefore sit on the *normalised* q and k, which are the inputs of the q @ k^T matmul, as in
  SwinIR-light. The per-head logit scale stays FP (it multiplies the matmul output).
- The block is post-norm: ``x + norm1(attn(x))``, ``x + norm2(ffn(x))``.
- Before partitioning, each window receives an N-gram context vector (``NGramContext``): a strided
  depth-wise conv makes one "unigram" per window, a small window attention runs over each
  ngram x ngram neighbourhood of unigrams (forward and backward), and a 1x1 conv merges the two.
  That attention stays FP, so it is built without ``ActSlot``s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_sr.models.base import ActSlot, Mlp
from edge_sr.models.windows import (
    logits_in_place,
    relative_position_index,
    window_logits,
    window_partition,
    window_reverse,
)

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)


def dims(x: torch.Tensor) -> tuple[int, ...]:
    """The shape as Python ints: under ONNX tracing the sizes become constants (fixed-shape export),
    which keeps the graph free of Shape/Gather chains."""
    return tuple(int(d) for d in x.shape)


def _slot(role: str, quantizable: bool) -> nn.Module:
    return ActSlot(role) if quantizable else nn.Identity()


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=-1)``: each row over the last axis scaled to unit L2 norm (norms below
    ``eps`` divided by ``eps``). Shape and dtype of ``x``.

    In bfloat16 (DQC under bf16 autocast) it is ``x * rsqrt(max(sum(x^2), eps^2))``, the squared
    norm rounded to bfloat16 as ``F.normalize``'s norm is: PyTorch's bfloat16 division by the
    expanded norm that ``F.normalize`` uses takes a slow path on the CPU (a bf16 DQC step on
    NGswin x2, 16 x 32^2: 5.3 s against 5.9 s). In any other dtype it is ``F.normalize`` itself.
    """
    if x.dtype != torch.bfloat16:
        return F.normalize(x, dim=-1, eps=eps)
    n2 = (x * x).sum(-1, keepdim=True).float()  # accumulated in float32, the sum in bfloat16
    return x * n2.clamp_min(eps * eps).rsqrt().to(x.dtype)


class WindowAttention(nn.Module):
    """Multi-head scaled cosine self-attention in (ws x ws) windows with relative position bias.

    ``quantizable=False`` (the N-gram context's attention) puts plain identities where the
    quantizable version has its ``q``/``k``/``v``/``attn_probs`` slots.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, head_dim: int | None = None,
                 qkv_bias: bool = True, quantizable: bool = True) -> None:
        super().__init__()
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        attn_dim = (head_dim or dim // num_heads) * num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size),
                             persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim)
        self.q_quant, self.k_quant = _slot("q", quantizable), _slot("k", quantizable)
        self.v_quant = _slot("v", quantizable)
        self.attn_probs_quant = _slot("attn_probs", quantizable)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, _ = dims(x)
        nh = self.num_heads
        qkv = self.qkv(x).reshape(b_, n, 3, nh, -1).permute(2, 0, 3, 1, 4)
        q = self.q_quant(unit_rows(qkv[0]))
        k = self.k_quant(unit_rows(qkv[1]))
        v = self.v_quant(qkv[2])
        ip = logits_in_place(self.logit_scale, self.relative_position_bias_table)
        nw = None if mask is None else int(mask.shape[0])
        attn = window_logits(q, k, nw, ip)  # (B, nW, nh, n, n) when in place with a mask
        # scale, bias and mask in the logits' dtype: under bf16 autocast a float32 operand would
        # make each in-place op write through a float32 copy of the whole logits tensor
        scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp().to(attn.dtype)
        attn = attn.mul_(scale) if ip else attn * scale
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, nh).permute(2, 0, 1).contiguous().unsqueeze(0).to(attn.dtype)
        attn = attn.add_(bias) if ip else attn + bias
        if mask is not None:
            m = mask.unsqueeze(1).to(attn.dtype)  # (nW, 1, n, n)
            attn = attn.add_(m) if ip else attn.view(b_ // nw, nw, nh, n, n) + m
        attn = self.attn_probs_quant(attn.view(-1, nh, n, n).softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, -1))


def _pad_forward(u: torch.Tensor, n: int) -> torch.Tensor:
    """Official ``seq_refl_win_pad`` (forward): append rows/cols h-n..h-2 at the bottom/right."""
    h = int(u.shape[2])
    u = torch.cat([u, u[:, :, h - n: h - 1]], dim=2)
    w = int(u.shape[3])
    return torch.cat([u, u[:, :, :, w - n: w - 1]], dim=3)


def _pad_backward(u: torch.Tensor, n: int) -> torch.Tensor:
    """Official ``seq_refl_win_pad`` (backward): prepend rows/cols 1..n-1 at the top/left."""
    u = torch.cat([u[:, :, 1:n], u], dim=2)
    return torch.cat([u[:, :, :, 1:n], u], dim=3)


class NGramContext(nn.Module):
    """One context vector per window from its ngram x ngram neighbourhood of window summaries."""

    def __init__(self, dim: int, window_size: int, ngram: int, num_heads: int) -> None:
        super().__init__()
        self.dim, self.window_size, self.ngram = dim, window_size, ngram
        self.unigram_embed = nn.Conv2d(dim, dim // 2, window_size, window_size, groups=dim // 2)
        self.ngram_attn = WindowAttention(dim // 2, num_heads, ngram, quantizable=False)
        self.merge = nn.Conv2d(dim, dim, 1)

    def _slide(self, u: torch.Tensor) -> torch.Tensor:
        """Attention over each ngram x ngram patch of the padded unigrams, averaged: (B, C, h, w)."""
        n = self.ngram
        b, c, hp, wp = dims(u)
        h, w = hp - n + 1, wp - n + 1
        # Token a*n + j of window (y, x) is unigram (y + a, x + j): the official unfold layout.
        tokens = torch.stack([u[:, :, a: a + h, j: j + w] for a in range(n) for j in range(n)], -1)
        tokens = tokens.permute(0, 2, 3, 4, 1).reshape(b * h * w, n * n, c)
        ctx = self.ngram_attn(tokens).mean(dim=1)
        return ctx.view(b, h, w, c).permute(0, 3, 1, 2)

    def unigrams(self, x: torch.Tensor) -> torch.Tensor:
        """``unigram_embed(x)``: (B, D, H, W) -> (B, D/2, H/ws, W/ws), one summary per window.

        Under CPU autocast (DQC with ``precision="bf16"``) it runs in float32: PyTorch's bfloat16
        backward of this grouped, strided convolution is about 4x slower on the CPU than the
        float32 one (16 x 64 x 64^2 input: 47 against 11 ms forward + backward), while the
        forward costs the same. Elsewhere (float32, export, CUDA) it is the plain module call.
        """
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.unigram_embed(x.float())
        return self.unigram_embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) features -> (B, D, H/ws, W/ws) context."""
        uni = self.unigrams(x)
        if self.ngram == 1:
            fwd = bwd = self._slide(uni)
        else:
            fwd = self._slide(_pad_forward(uni, self.ngram))
            bwd = self._slide(_pad_backward(uni, self.ngram))
        return self.merge(torch.cat([fwd, bwd], dim=1))


class NGramWindowPartition(nn.Module):
    """Adds each window's N-gram context to its pixels, then applies the cyclic shift."""

    def __init__(self, dim: int, window_size: int, ngram: int, num_heads: int,
                 shift_size: int) -> None:
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.ngram_context = NGramContext(dim, window_size, ngram, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) -> (B, H, W, D), context added and (if shifted) rolled."""
        b, h, w, c = dims(x)
        ws = self.window_size
        ctx = self.ngram_context(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x.view(b, h // ws, ws, w // ws, ws, c) + ctx.reshape(b, h // ws, 1, w // ws, 1, c)
        x = x.view(b, h, w, c)
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        return x


class NSTB(nn.Module):
    """N-Gram Swin Transformer Block: context injection, (shifted) window attention, FFN; post-norm."""

    def __init__(self, dim: int, ngram: int, num_heads: int, window_size: int, shift_size: int,
                 mlp_ratio: float, qkv_bias: bool = True, head_dim: int | None = None) -> None:
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.ngram_window_partition = NGramWindowPartition(dim, window_size, ngram, num_heads,
                                                           shift_size)
        self.attn = WindowAttention(dim, num_heads, window_size, head_dim, qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int],
                mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, H*W, D); ``mask`` is the shifted-window mask for this size (used iff shifted)."""
        h, w = size
        b, _, c = dims(x)
        ws, s = self.window_size, self.shift_size
        y = self.ngram_window_partition(x.view(b, h, w, c))
        y = self.attn(window_partition(y, ws), mask=mask if s else None)
        y = window_reverse(y, ws, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.norm1(y.reshape(b, h * w, c))
        return x + self.norm2(self.ffn(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, size: tuple[int, int],
               mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """NGswin's within-stage residual: block i+1 gets (output_i + input_i).

    Returns the last block's output and its input (the patch merging reads their sum).
    """
    prev_in: torch.Tensor | None = None
    for blk in blocks:
        inp = x if prev_in is None else x + prev_in
        x, prev_in = blk(inp, size, mask), inp
    assert prev_in is not None
    return x, prev_in
