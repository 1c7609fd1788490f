"""NGswin (Choi, Lee, Yang, CVPR 2023), written for edge-sr.

State-dict compatible with the official ``pretrain/NGswin_x{2,3}.pth`` of rami0205/NGramSwin on
every learned parameter. The ``relative_position_index`` and ``attn_mask`` buffers are not part of
our state dict: they are recomputed from the input size (one mask per stage resolution, shared by
its shifted blocks), so any input size works and a fixed-shape ONNX export bakes them in.

Layout: shallow conv -> three encoder stages at H, H/2, H/4 (patch merging between them, with
max-pooled cascades of the earlier stages' inputs) -> SCDP bottleneck (pixel-shuffle each stage
back to H, concatenate, depth-wise conv, point-wise linear) -> one decoder stage at H ->
pixel-shuffle reconstruction. Input is RGB in [0, 1], normalised with per-scale mean/std.

Padding follows the official test script: symmetric (edge-including mirror) at the bottom and
right, to a multiple of 4 * window_size (32). We also pad to at least 8 * window_size (64): the
official N-gram padding needs two windows per side at the H/4 stage and fails below that (the
official code cannot run such inputs at all, so this changes no official result).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from edge_sr.models.base import QuantPoint, SizeRequirements, SRModel, window_attention_block_points
from edge_sr.models.ngswin.blocks import NSTB, dims, run_blocks
from edge_sr.models.windows import shift_attention_mask

MEAN = (0.4485, 0.4375, 0.4045)
STD = {2: (0.2397, 0.2290, 0.2389), 3: (0.2373, 0.2265, 0.2367), 4: (0.2352, 0.2244, 0.2349)}


def pad_symmetric(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad bottom/right by mirroring with the edge repeated (torchvision ``symmetric``).

    Works for pads larger than the image too (the mirror repeats with period 2 * size).
    """
    for dim, pad in ((2, pad_h), (3, pad_w)):
        if pad:
            size = int(x.shape[dim])
            period = torch.cat([x, torch.flip(x, [dim])], dim)
            reps = -(-(size + pad) // (2 * size))
            x = torch.cat([period] * reps, dim).narrow(dim, 0, size + pad)
    return x


def _tokens_to_image(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c = dims(t)
    return t.transpose(1, 2).reshape(b, c, h, w)


def _image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class ShallowExtractor(nn.Module):
    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (order TL, TR, BL, BR, as in NGswin), LayerNorm, linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        b, _, c = dims(x)
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        return self.reduction(self.norm(x.reshape(b, (h // 2) * (w // 2), 4 * c)))


class EncoderLayer(nn.Module):
    """A stage of NSTBs; stage i (1-based) first projects the i-fold cascade back to ``dim``."""

    def __init__(self, dim: int, depth: int, ngram: int, num_heads: int, window_size: int,
                 mlp_ratio: float, qkv_bias: bool, num_cas: int, downsample: bool) -> None:
        super().__init__()
        self.across_cascade_proj = nn.Linear(dim * num_cas, dim) if num_cas > 1 else nn.Identity()
        self.blocks = nn.ModuleList(
            NSTB(dim, ngram, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                 mlp_ratio, qkv_bias) for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, size: tuple[int, int],
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (stage output at this size, input of the next stage at half size or the same)."""
        out, last_in = run_blocks(self.blocks, self.across_cascade_proj(x), size, mask)
        if self.downsample is None:
            return out, out
        return out, self.downsample(out + last_in, size)


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, depth: int, ngram: int, num_heads: int, window_size: int,
                 mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            NSTB(dim, ngram, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                 mlp_ratio, qkv_bias) for i in range(depth))

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, x, size, mask)[0]


class SCDPBottleneck(nn.Module):
    """pixel-Shuffle, Concatenate, Depth-wise conv, Point-wise projection of the encoder outputs."""

    def __init__(self, num_stages: int, enc_dim: int, dec_dim: int) -> None:
        super().__init__()
        self.concat_dim = sum(enc_dim // 4 ** i for i in range(num_stages))
        self.depthwise = nn.Conv2d(self.concat_dim, self.concat_dim, 3, 1, 1,
                                   groups=self.concat_dim)
        self.act = nn.GELU()
        self.pointwise = nn.Linear(self.concat_dim, dec_dim)
        self.norm = nn.LayerNorm(dec_dim)

    def forward(self, shallow: torch.Tensor, feats: list[torch.Tensor],
                sizes: list[tuple[int, int]]) -> torch.Tensor:
        """shallow: (B, D, H, W); feats[i]: (B, H*W/4^i, D) -> (B, H*W, dec_dim)."""
        parts, pooled = [], shallow
        for i, (f, (h, w)) in enumerate(zip(feats, sizes, strict=True)):
            if i:
                pooled = F.max_pool2d(pooled, 2)
            y = _tokens_to_image(f, h, w) + F.leaky_relu(pooled)
            parts.append(F.pixel_shuffle(y, 2 ** i) if i else y)
        x = self.act(self.depthwise(torch.cat(parts, dim=1)))
        return self.norm(self.pointwise(_image_to_tokens(x)))


class NGswin(SRModel):
    """NGswin for lightweight SR (x2/x3/x4); ``scale`` s is the official ``target_mode='light_xs'``.

    ``training_img_size`` only sized the official pre-computed attention mask; it is recorded in
    ``config()`` but changes nothing here.
    """

    arch = "ngswin"

    def __init__(self, scale: int = 2, training_img_size: int = 64,
                 ngrams: tuple[int, ...] = (2, 2, 2, 2), embed_dim: int = 64,
                 depths: tuple[int, ...] = (6, 4, 4), num_heads: tuple[int, ...] = (6, 4, 4),
                 dec_dim: int = 64, dec_depths: int = 6, dec_num_heads: int = 6,
                 window_size: int = 8, mlp_ratio: float = 2.0, qkv_bias: bool = True,
                 img_norm: bool = True, in_chans: int = 3) -> None:
        super().__init__()
        if scale not in STD:
            raise ValueError(f"NGswin scale must be 2, 3 or 4, got {scale}")
        if len(depths) != 3 or len(num_heads) != 3 or len(ngrams) != 4:
            raise ValueError("NGswin needs 3 encoder stages (depths, num_heads) and 4 ngrams, got "
                             f"depths={depths}, num_heads={num_heads}, ngrams={ngrams}")
        self.scale, self.window_size, self.img_norm = scale, window_size, img_norm
        self._config = dict(scale=scale, training_img_size=training_img_size, ngrams=list(ngrams),
                            embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
                            dec_dim=dec_dim, dec_depths=dec_depths, dec_num_heads=dec_num_heads,
                            window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                            img_norm=img_norm, in_chans=in_chans)
        # Stages at H, H/2, H/4 must each hold whole windows; the N-gram padding needs at least
        # ngram windows per side at every stage (two at H/4 for the official ngram 2).
        unit = 4 * window_size
        need = window_size * max(ngrams[0], 2 * ngrams[1], 4 * ngrams[2], ngrams[3])
        self.size_requirements = SizeRequirements(multiple=unit, minimum=-(-need // unit) * unit)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD[scale]).view(1, 3, 1, 1), persistent=False)
        self.shallow_extract = ShallowExtractor(in_chans, embed_dim)
        for i in range(3):
            self.add_module(f"encoder_layer{i + 1}", EncoderLayer(
                embed_dim, depths[i], ngrams[i], num_heads[i], window_size, mlp_ratio, qkv_bias,
                num_cas=i + 1, downsample=i < 2))
        self.bottleneck = SCDPBottleneck(3, embed_dim, dec_dim)
        self.decoder_layer1 = DecoderLayer(dec_dim, dec_depths, ngrams[3], dec_num_heads,
                                           window_size, mlp_ratio, qkv_bias)
        self.norm = nn.LayerNorm(dec_dim)
        self.to_target = nn.Sequential(OrderedDict(
            before_shuffle=nn.Conv2d(dec_dim, in_chans * scale * scale, 3, 1, 1),
            shuffler=nn.PixelShuffle(scale),
            to_origin=nn.Conv2d(in_chans, in_chans, 3, 1, 1)))
        self._masks: dict[tuple, torch.Tensor] = {}
        self.apply(self._init_weights)

    @property
    def encoder_layers(self) -> list[EncoderLayer]:
        return [self.encoder_layer1, self.encoder_layer2, self.encoder_layer3]

    def _mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, device)
        if key not in self._masks:
            if len(self._masks) > 12:
                self._masks.clear()
            ws = self.window_size
            self._masks[key] = shift_attention_mask(h, w, ws, ws // 2).to(device)
        return self._masks[key]

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        req = self.size_requirements
        ph, pw = req.padding(h, w)
        return max(h + ph, req.minimum), max(w + pw, req.minimum)

    def forward_body(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised, padded image (B, 3, H, W) -> reconstruction, still normalised."""
        h, w = int(x.shape[2]), int(x.shape[3])  # constants under ONNX tracing
        sizes = [(h, w), (h // 2, w // 2), (h // 4, w // 4)]
        masks = [self._mask(sh, sw, x.device) for sh, sw in sizes]
        shallow = self.shallow_extract(x)
        c = _image_to_tokens(shallow)
        stage_out, cascade = [], c
        for i, layer in enumerate(self.encoder_layers):
            out, down = layer(cascade, sizes[i], masks[i])
            stage_out.append(out)
            if i < 2:
                pooled = _image_to_tokens(F.max_pool2d(_tokens_to_image(cascade, *sizes[i]), 2))
                cascade = torch.cat([pooled, down], dim=-1)
        y = self.bottleneck(shallow, stage_out, sizes)
        y = self.norm(self.decoder_layer1(y + stage_out[0], sizes[0], masks[0])) + c
        return self.to_target(_tokens_to_image(y, h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[2]), int(x.shape[3])  # constants under ONNX tracing: a fixed shape
        hp, wp = self.padded_size(h, w)
        x = pad_symmetric(x, hp - h, wp - w)
        if self.img_norm:
            x = (x - self.mean) / self.std
        x = self.forward_body(x)
        if self.img_norm:
            x = x * self.std + self.mean
        return x[:, :, : h * self.scale, : w * self.scale]

    def attention_blocks(self) -> list[str]:
        """Module paths of the NSTBs whose window attention and FFN are quantized."""
        paths = []
        for name in ("encoder_layer1", "encoder_layer2", "encoder_layer3", "decoder_layer1"):
            layer = self.get_submodule(name)
            paths += [f"{name}.blocks.{k}" for k in range(len(layer.blocks))]
        return paths

    def quant_points(self) -> list[QuantPoint]:
        """SwinIR-light's 2DQuant points in every NSTB; the N-gram context's attention stays FP."""
        return [point for p in self.attention_blocks()
                for point in window_attention_block_points(p, mlp="ffn")]

    def image_layers(self) -> list[str]:
        """The shallow extractor's convolution and the two around the pixel shuffle."""
        return ["shallow_extract.conv1", "to_target.before_shuffle", "to_target.to_origin"]

    def feature_modules(self) -> list[str]:
        """The last NSTB of each encoder stage (the e1, e2, e3 the bottleneck reads) and the
        decoder output after its LayerNorm: four tensors, like SwinIR-light's four RSTBs."""
        last = [f"{n}.blocks.{len(self.get_submodule(n).blocks) - 1}"
                for n in ("encoder_layer1", "encoder_layer2", "encoder_layer3")]
        return last + ["norm"]
