"""glibc malloc settings for PyTorch inference on large CPU activations.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold (32 MB at
most) with fresh ``mmap``s and unmaps them on free, so every out-of-place op on a 100 MB window
attention tensor page-faults its whole output in again. Keeping freed blocks in the heap instead
(no mmap for big blocks, no trimming) removes those faults; the arithmetic is untouched, so
results are bit for bit the same. Measured in docs/results/eval.md, "CPU inference speed".

Process-wide, so only entry points call it: the CLI, the benchmarks and the test session. Set
``EDGE_SR_MALLOC_TUNING=0`` to keep glibc's defaults (e.g. when many processes share a small
memory and each should hand memory back as soon as it can), or ``EDGE_SR_MALLOC_TUNING=lean`` for
the opposite trade (``return_freed_memory``: training in the least memory, at the price of page
faults; with it, ``THP_MEM_ALLOC_ENABLE=1`` lets PyTorch back big tensors with huge pages).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers from <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
TOP_PAD_BYTES = 256 << 20
LEAN_MMAP_THRESHOLD = 1 << 20  # return_freed_memory: blocks from 1 MB up are mmapped

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc malloc for this process, once; False where not glibc or turned off."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    mode = os.environ.get("EDGE_SR_MALLOC_TUNING", "1")
    if mode not in ("0", "1", "lean"):
        log.warning("EDGE_SR_MALLOC_TUNING=%s: expected 1 (keep freed memory, the default), 0 "
                    "(glibc's defaults) or lean (return it); using 1", mode)
    if mode == "0":
        log.debug("malloc tuning off (EDGE_SR_MALLOC_TUNING=0)")
    elif mode == "lean":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch at its first allocation
        return_freed_memory()
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


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> bool:
    """The opposite trade, for memory-bound training (``EDGE_SR_MALLOC_TUNING=lean``, with DQC's
    ``recompute``): every block of 1 MB or more is its own ``mmap``, unmapped when freed, and
    glibc's dynamic threshold (which otherwise climbs to 32 MB and leaves freed tensors
    fragmenting the heap) is off. Measured on a DQC step at batch 16 of 64x64 with ``recompute``
    (docs/results/beyond.md): SwinIR-light x2 ref peaks at 1.5 GB instead of 7.7, NGswin x2 at
    1.4 GB instead of 4.8, but the steps take 2.2-2.5x as long (page faults; 1.8x with huge
    pages). Process-wide; False where not glibc."""
    global _applied
    libc = _libc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, 128 << 10), (M_TOP_PAD, 0)))
    libc.malloc_trim(0)
    _applied = False
    log.debug("malloc: freed memory returned to the system (%s)", "applied" if ok else "refused")
    return ok

