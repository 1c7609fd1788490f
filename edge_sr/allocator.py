"""glibc malloc settings for PyTorch inference on large CPU activations.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold (32 MB at
most) with fresh ``mmap``s and unmaps them on free, so every out-of-place op on a 100 MB window
attention tensor page-faults its whole output in again. Keeping freed blocks in the heap instead
(no mmap for big blocks, no trimming) removes those faults; the arithmetic is untouched, so
results are bit for bit the same. Measured in docs/results/eval.md, "CPU inference speed".

Process-wide, so only entry points call it: the CLI, the benchmarks and the test session. Set
``EDGE_SR_MALLOC_TUNING=0`` to keep glibc's defaults (e.g. when many processes share a small
memory and each should hand memory back as soon as it can).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers from <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TOP_PAD_BYTES = 256 << 20

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc malloc for this process, once; False where not glibc or turned off."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("EDGE_SR_MALLOC_TUNING", "1") == "0":
        log.debug("malloc tuning off (EDGE_SR_MALLOC_TUNING=0)")
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.debug("malloc tuning skipped: not glibc")
    else:
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError as e:
            log.debug("malloc tuning skipped: %s", e)
        else:
            _applied = all(libc.mallopt(param, value) == 1 for param, value in (
                (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, TOP_PAD_BYTES)))
            log.debug("malloc tuning %s", "applied" if _applied else "refused by mallopt")
    return _applied
