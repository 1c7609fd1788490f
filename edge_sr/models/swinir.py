"""SwinIR-light (Liang et al., 2021), written for edge-sr.

State-dict compatible with the official release (``002_lightweightSR_DIV2K_s64w8_SwinIR-S_x*.pth``)
for every learned parameter. The ``attn_mask`` and ``relative_position_index`` buffers are not part
of our state dict: they are recomputed from the input size, so any input size works and export to
a fixed shape bakes them in as constants. Window partitioning is pure reshapes (no Python loop over
windows). Quantization points are ``ActSlot`` identities and plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import torch
from torch import nn

from edge_sr.errors import EdgeSRError
from edge_sr.models.base import (
    ActSlot,
    Architecture,
    Mlp,
    QuantPoint,
    SizeRequirements,
    SRModel,
    pad_flip,
    pad_flip_traced,
    tracing_dynamic,
    window_attention_block_points,
)
from edge_sr.models.state_dict import unwrap_state_dict
from edge_sr.models.windows import (
    logits_in_place,
    relative_position_index,
    shift_attention_mask,
    window_logits,
    window_partition,
    window_reverse,
)

RGB_MEAN = (0.4488, 0.4371, 0.4040)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.q_quant, self.k_quant, self.v_quant = ActSlot("q"), ActSlot("k"), ActSlot("v")
        self.attn_probs_quant = ActSlot("attn_probs")
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, c = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(b_, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
        q = self.q_quant(qkv[0] * self.scale)
        k = self.k_quant(qkv[1])
        v = self.v_quant(qkv[2])
        ip = logits_in_place(self.relative_position_bias_table)
        nw = None if mask is None else mask.shape[0]
        attn = window_logits(q, k, nw, ip)  # (B, nW, nh, n, n) when in place with a mask
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        # in the logits' dtype: under bf16 autocast a float32 operand would make the in-place
        # add write through a float32 copy of the whole (windows x heads x n x n) tensor
        bias = bias.view(n, n, nh).permute(2, 0, 1).contiguous().unsqueeze(0).to(attn.dtype)
        attn = attn.add_(bias) if ip else attn + bias
        if mask is not None:
            m = mask.unsqueeze(1).to(attn.dtype)  # (nW, 1, n, n)
            attn = attn.add_(m) if ip else attn.view(b_ // nw, nw, nh, n, n) + m
        attn = self.attn_probs_quant(attn.view(-1, nh, n, n).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b_, n, c)
        return self.proj(x)


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def _mask(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor | None:
        """The shifted-window mask on ``like``'s device in its dtype (FP16 runs add it to FP16
        scores; a float32 mask would promote them)."""
        if self.shift_size == 0:
            return None
        if tracing_dynamic():  # a dynamic-shape export: the mask is computed in the graph
            return shift_attention_mask(h, w, self.window_size, self.shift_size).to(like.dtype)
        h, w = int(h), int(w)  # under ONNX tracing these are tensors; the mask is a constant
        key = (h, w, like.device, like.dtype)
        if key not in self._mask_cache:
            if len(self._mask_cache) > 8:
                self._mask_cache.clear()
            self._mask_cache[key] = shift_attention_mask(h, w, self.window_size,
                                                         self.shift_size).to(like.device,
                                                                             like.dtype)
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, s = self.window_size, self.shift_size
        y = self.norm1(x).view(b, h, w, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, ws), mask=self._mask(h, w, x))
        y = window_reverse(y, ws, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size,
                                 0 if i % 2 == 0 else window_size // 2, mlp_ratio)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, x_size)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer Block: 6 Swin blocks, a 3x3 conv, a residual."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, num_heads, window_size, mlp_ratio)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        h, w = x_size
        b, _, c = x.shape
        y = self.residual_group(x, x_size).transpose(1, 2).reshape(b, c, h, w)
        return self.conv(y).flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


class SwinIRLight(SRModel):
    """SwinIR-light: embed 60, depths [6,6,6,6], 6 heads, window 8, ``pixelshuffledirect``."""

    arch = "swinir-light"
    dynamic_export = True

    def __init__(self, scale: int = 2, embed_dim: int = 60, depths: tuple[int, ...] = (6, 6, 6, 6),
                 num_heads: tuple[int, ...] = (6, 6, 6, 6), window_size: int = 8,
                 mlp_ratio: float = 2.0, in_chans: int = 3) -> None:
        super().__init__()
        if scale not in (2, 3, 4):
            raise ValueError(f"SwinIR-light scale must be 2, 3 or 4, got {scale}")
        self.scale, self.window_size = scale, window_size
        self._config = dict(scale=scale, embed_dim=embed_dim, depths=list(depths),
                            num_heads=list(num_heads), window_size=window_size,
                            mlp_ratio=mlp_ratio, in_chans=in_chans)
        self.size_requirements = SizeRequirements(multiple=window_size, minimum=window_size)
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim)
        self.layers = nn.ModuleList(
            RSTB(embed_dim, d, nh, window_size, mlp_ratio)
            for d, nh in zip(depths, num_heads, strict=True)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        self.upsample = nn.Sequential(
            nn.Conv2d(embed_dim, in_chans * scale * scale, 3, 1, 1), nn.PixelShuffle(scale)
        )
        self.apply(self._init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.patch_embed(x)
        for layer in self.layers:
            t = layer(t, (h, w))
        return self.norm(t).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # To the next multiple of the window, not the official script's extra full window when
        # already a multiple: this reproduces shared/data/README.md's reference PSNRs exactly
        # (Set5 x2 35.2966, x4 28.9153; the official variant gives 35.2978 and 28.9219).
        if tracing_dynamic():
            x = pad_flip_traced(x, self.size_requirements.multiple)
        else:
            x = pad_flip(x, *self.size_requirements.padding(h, w))
        x = x - self.mean
        feat = self.conv_first(x)
        x = self.upsample(self.conv_after_body(self.forward_features(feat)) + feat) + self.mean
        return x[:, :, : h * self.scale, : w * self.scale]

    def image_layers(self) -> list[str]:
        """The first convolution and the upsampler's (``conv_first``, ``upsample.*``)."""
        return ["conv_first"] + [f"upsample.{n}" for n, m in self.upsample.named_children()
                                 if isinstance(m, nn.Conv2d)]

    def body_convs(self) -> list[str]:
        """Each RSTB's 3x3 convolution and ``conv_after_body`` (60 -> 60 channels)."""
        return [f"layers.{i}.conv" for i in range(len(self.layers))] + ["conv_after_body"]

    def quant_points(self) -> list[QuantPoint]:
        return [point for r, layer in enumerate(self.layers)
                for k in range(len(layer.residual_group.blocks))
                for point in window_attention_block_points(f"layers.{r}.residual_group.blocks.{k}")]

    def feature_modules(self) -> list[str]:
        return [f"layers.{r}.residual_group" for r in range(len(self.layers))]


# --------------------------------------------------------------------------------------------
# Loading official-format state dicts: hyper-parameters come from the tensors themselves.

BUFFER_SUFFIXES = ("attn_mask", "relative_position_index")
_BLOCK0 = "layers.0.residual_group.blocks.0."


def is_swinir(sd: dict) -> bool:
    """Any SwinIR variant (light, classical, real-world); ``build`` rejects the unsupported ones."""
    return all(k in sd for k in ("conv_first.weight", "conv_after_body.weight",
                                 _BLOCK0 + "attn.relative_position_bias_table",
                                 _BLOCK0 + "attn.qkv.weight"))


def infer_swinir_config(sd: dict, source: str = "checkpoint") -> dict:
    """SwinIR-light constructor arguments read from tensor shapes (no scale check here)."""
    if "conv_before_upsample.0.weight" in sd or "conv_last.weight" in sd:
        dim = sd["conv_first.weight"].shape[0]
        raise EdgeSRError(
            f"{source} is a classical/real-world SwinIR (embed_dim {dim}, has "
            "conv_before_upsample/conv_last), not SwinIR-light; edge-sr supports only "
            "SwinIR-light (upsampler pixelshuffledirect)"
        )
    if "upsample.0.weight" not in sd or sd["upsample.0.weight"].dim() != 4:
        raise EdgeSRError(f"{source}: SwinIR without a pixelshuffledirect upsampler "
                          "(no 4-D upsample.0.weight); only SwinIR-light is supported")
    if "layers.0.conv.weight" not in sd:
        raise EdgeSRError(f"{source}: SwinIR with resi_connection other than '1conv' "
                          "(no layers.0.conv.weight); only SwinIR-light is supported")
    embed_dim, in_chans = sd["conv_first.weight"].shape[:2]
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    depths, heads = [], []
    for i in range(n_layers):
        blocks = {int(k.split(".")[4]) for k in sd if k.startswith(f"layers.{i}.residual_group.")}
        depths.append(1 + max(blocks) if blocks else 0)
        heads.append(sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"]
                     .shape[1])
    table = sd[_BLOCK0 + "attn.relative_position_bias_table"].shape[0]
    side = round(table ** 0.5)
    if side * side != table or side % 2 == 0:
        raise EdgeSRError(f"{source}: relative_position_bias_table has {table} rows, "
                          "expected (2*window-1)^2")
    hidden = sd[_BLOCK0 + "mlp.fc1.weight"].shape[0]
    out = sd["upsample.0.weight"].shape[0]
    scale = round((out / in_chans) ** 0.5)
    if scale * scale * in_chans != out:
        raise EdgeSRError(f"{source}: upsample.0.weight has {out} output channels, "
                          f"expected {in_chans}*scale^2")
    return dict(scale=scale, embed_dim=int(embed_dim), depths=tuple(depths),
                num_heads=tuple(heads), window_size=(side + 1) // 2,
                mlp_ratio=hidden / embed_dim, in_chans=int(in_chans))


def swinir_from_state_dict(sd: object, scale: int | None = None,
                           source: str = "checkpoint") -> SwinIRLight:
    """Build a SwinIR-light from an official-format checkpoint, strict on every learned tensor.

    Accepts whatever ``edge_sr.models.state_dict.unwrap_state_dict`` unwraps (``params_ema``,
    ``params``, ``state_dict``, ``model_state_dict``, ``module.``/``_orig_mod.`` prefixes), with or
    without the ``attn_mask``/``relative_position_index`` buffers (we recompute them). A scale
    that disagrees with the upsampler is an error, never a silent reshape.
    """
    sd = unwrap_state_dict(sd, source)
    if not is_swinir(sd):
        raise EdgeSRError(f"{source} is not a SwinIR checkpoint (no {_BLOCK0}attn.qkv.weight)")
    cfg = infer_swinir_config(sd, source)
    if scale is not None and scale != cfg["scale"]:
        out = sd["upsample.0.weight"].shape[0]
        raise EdgeSRError(
            f"{source} is x{cfg['scale']} (upsample.0.weight has {out} output channels) "
            f"but --scale {scale} was requested"
        )
    if cfg["scale"] not in (2, 3, 4):
        raise EdgeSRError(f"{source} is x{cfg['scale']}; SwinIR-light supports x2, x3, x4")
    model = SwinIRLight(**cfg)
    learned = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in BUFFER_SUFFIXES}
    load_strict(model, learned, source)
    return model.eval()


def load_strict(model: nn.Module, learned: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-sentence error naming the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in learned]
    unexpected = [k for k in learned if k not in own]
    wrong = [f"{k} {tuple(learned[k].shape)} vs {tuple(v.shape)}"
             for k, v in own.items() if k in learned and learned[k].shape != v.shape]
    problems = []
    for what, names in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape (checkpoint vs model)", wrong)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{what}: {', '.join(names[:3])}{more}")
    if problems:
        raise EdgeSRError(f"{source} does not match {type(model).__name__}: "
                          + "; ".join(problems))
    model.load_state_dict(learned, strict=True)


ARCHITECTURE = Architecture(name="swinir-light", detect=is_swinir,
                            build=lambda sd, scale: swinir_from_state_dict(sd, scale))
