"""Data for edge-sr: image IO, the MATLAB bicubic, benchmark sets and the training pool.

- ``load_image`` / ``save_image``: uint8 RGB HxWx3 whatever the file's mode.
- ``imresize`` / ``bicubic_downscale`` / ``bicubic_upscale``: MATLAB-compatible bicubic.
- ``load_benchmark(name, scale)``: list of ``SRPair(name, lr, hr)`` (uint8 HxWx3).
- ``pool_split()`` / ``PatchSampler(lr_patch, scale, flips, rot, seed)``: the BSD200 pool.
"""

from edge_sr.data.datasets import BENCHMARKS, POOL_VAL, SRPair, center_crop, load_benchmark
from edge_sr.data.images import list_images, load_image, save_image
from edge_sr.data.matlab_resize import bicubic_downscale, bicubic_upscale, imresize
from edge_sr.data.pool import PatchSampler, PoolSplit, pool_pairs, pool_split

__all__ = [
    "BENCHMARKS", "POOL_VAL", "SRPair", "center_crop", "load_benchmark", "list_images", "load_image",
    "save_image", "bicubic_downscale", "bicubic_upscale", "imresize", "PatchSampler",
    "PoolSplit", "pool_pairs", "pool_split",
]
