"""What the machine offers: the CPU's model name and feature flags, and whether a device does
bfloat16 arithmetic natively. Linux reads /proc/cpuinfo; elsewhere the answers fall back to
``platform`` and to "no native bfloat16"."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), e.g. "AMD EPYC"."""
    for line in _cpuinfo():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (x86 ``flags``, Arm ``Features``); empty when unknown."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


# x86: AVX-512 BF16 or AMX; Arm: the BF16 extension (Neoverse V1/N2, the Jetson Orin's A78AE lacks it)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` ("cpu", "cuda", "cuda:N") has bfloat16 arithmetic in hardware, so that
    bfloat16 GEMMs are faster than float32 ones rather than emulated."""
    if str(device).startswith("cuda"):
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & BF16_FLAGS)
