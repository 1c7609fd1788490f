"""Recognise and build NGswin from a state dict; the official checkpoints as registry entries.

Every hyper-parameter is read from tensor shapes (scale from ``to_target.before_shuffle``), then
the weights load strictly on every learned parameter. The ``attn_mask`` and
``relative_position_index`` buffers the official training code saves in some files are ignored.
"""

from __future__ import annotations

import re

from edge_sr.errors import EdgeSRError
from edge_sr.models.base import Architecture, CheckpointEntry
from edge_sr.models.ngswin.model import STD, NGswin
from edge_sr.models.state_dict import unwrap_state_dict

BUFFER_SUFFIXES = ("attn_mask", "relative_position_index")
_DETECT_KEYS = (
    "shallow_extract.conv1.weight",
    "encoder_layer1.blocks.0.ngram_window_partition.ngram_context.unigram_embed.weight",
    "encoder_layer1.blocks.0.attn.qkv.weight",
    "bottleneck.pointwise.weight",
    "decoder_layer1.blocks.0.attn.qkv.weight",
    "to_target.before_shuffle.weight",
)
# Pinned to the commit the shared copies come from (data README); the default branch is not named
# anywhere in the repository, a commit is.
_UPSTREAM = ("https://github.com/rami0205/NGramSwin/raw/"
             "8d0d6490954ecb1ce6cf9bf5d2d511de44b1fb44/pretrain/")

CHECKPOINTS = [
    CheckpointEntry(
        name="ngswin-x2", arch="ngswin", scale=2, filename="NGswin_x2.pth",
        url=_UPSTREAM + "NGswin_x2.pth", size=4_156_753,
        sha256="99b8c315a6135f03e2c9b062b100e2601dc7b6bdc20d9a723fec7b3ef97619bb",
        shared_relpath="models/NGswin_x2.pth"),
    CheckpointEntry(
        name="ngswin-x3", arch="ngswin", scale=3, filename="NGswin_x3.pth",
        url=_UPSTREAM + "NGswin_x3.pth", size=4_191_377,
        sha256="8ebf328a540461477f30495da6d5303df18cd6db06b853640024951ed0e128ac",
        shared_relpath="models/NGswin_x3.pth"),
]


def _bare(sd: dict, source: str = "checkpoint") -> dict:
    """The bare state dict, by the one rule every architecture shares (``unwrap_state_dict``)."""
    return unwrap_state_dict(sd, source)


def detect(state_dict: dict) -> bool:
    """NGswin has an N-gram context in its blocks and an SCDP bottleneck; SwinIR has neither."""
    try:
        sd = _bare(state_dict)
    except EdgeSRError:
        return False
    return all(k in sd for k in _DETECT_KEYS)


def _count_blocks(sd: dict, layer: str) -> int:
    pat = re.compile(rf"^{layer}\.blocks\.(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def _side(table_rows: int) -> int:
    """(2 s - 1)^2 rows of a relative position bias table -> s."""
    return (round(table_rows ** 0.5) + 1) // 2


def infer_config(sd: dict, source: str = "checkpoint") -> dict:
    """NGswin constructor arguments from tensor shapes (scale included)."""
    out_ch, embed_dim = sd["to_target.before_shuffle.weight"].shape[:2]
    in_chans = sd["shallow_extract.conv1.weight"].shape[1]
    scale = round((out_ch / in_chans) ** 0.5)
    if scale * scale * in_chans != out_ch or scale not in STD:
        raise EdgeSRError(f"{source}: to_target.before_shuffle.weight has {out_ch} output "
                          f"channels, expected {in_chans} x scale^2 for scale 2, 3 or 4")
    layers = ["encoder_layer1", "encoder_layer2", "encoder_layer3", "decoder_layer1"]
    depths = [_count_blocks(sd, n) for n in layers]
    if 0 in depths:
        raise EdgeSRError(f"{source}: expected NGswin blocks in {', '.join(layers)}, found "
                          f"block counts {depths}")
    heads, ngrams = [], []
    for n in layers:
        b0 = f"{n}.blocks.0."
        heads.append(sd[b0 + "attn.relative_position_bias_table"].shape[1])
        ngrams.append(_side(sd[b0 + "ngram_window_partition.ngram_context.ngram_attn."
                               "relative_position_bias_table"].shape[0]))
    b0 = "encoder_layer1.blocks.0."
    dim = sd["shallow_extract.conv1.weight"].shape[0]
    return dict(
        scale=scale, ngrams=ngrams, embed_dim=dim, depths=depths[:3], num_heads=heads[:3],
        dec_dim=embed_dim, dec_depths=depths[3], dec_num_heads=heads[3],
        window_size=_side(sd[b0 + "attn.relative_position_bias_table"].shape[0]),
        mlp_ratio=sd[b0 + "ffn.fc1.weight"].shape[0] / dim,
        qkv_bias=b0 + "attn.qkv.bias" in sd, in_chans=in_chans,
    )


def build(state_dict: dict, scale: int | None = None, source: str = "checkpoint") -> NGswin:
    """An NGswin with the checkpoint's weights; ``scale`` (if given) must match the checkpoint."""
    sd = {k: v for k, v in _bare(state_dict, source).items()
          if not k.endswith(BUFFER_SUFFIXES)}
    if not detect(sd):
        missing = [k for k in _DETECT_KEYS if k not in sd]
        raise EdgeSRError(f"{source}: expected an NGswin state dict, missing {missing[0]}")
    cfg = infer_config(sd, source)
    if scale is not None and scale != cfg["scale"]:
        out_ch = sd["to_target.before_shuffle.weight"].shape[0]
        raise EdgeSRError(f"{source} is an x{cfg['scale']} NGswin (to_target.before_shuffle has "
                          f"{out_ch} output channels) but scale {scale} was requested")
    model = NGswin(**cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise EdgeSRError(f"{source}: expected the NGswin layout inferred from its shapes "
                          f"({cfg}), but loading failed: {detail}") from None
    return model.eval()


def load_file(path: str, scale: int | None = None) -> NGswin:
    """Build from a ``.pth`` or ``.safetensors`` file (weights only; no pickled code runs)."""
    from pathlib import Path

    from edge_sr.checkpoints import read_checkpoint

    return build(read_checkpoint(Path(path)), scale, source=f"checkpoint {path}")


ARCHITECTURE = Architecture(name="ngswin", detect=detect, build=build)
