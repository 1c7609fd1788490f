"""glibc malloc tuning: applied once per process on glibc, and off when asked."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from edge_sr.allocator import keep_freed_memory as k; print(k(), k())"


def _probe(**env: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is glibc-only")
def test_applied_on_glibc_and_idempotent() -> None:
    assert _probe(EDGE_SR_MALLOC_TUNING="1") == "True True"


def test_turned_off_by_the_environment() -> None:
    assert _probe(EDGE_SR_MALLOC_TUNING="0") == "False False"


RETURN_PROBE = """
from edge_sr import allocator
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
allocator.keep_freed_memory()  # as the CLI does first
blocks = [bytearray(8 << 20) for _ in range(16)]
del blocks
kept = rss()
ok = allocator.return_freed_memory()
before = rss()
blocks = [bytearray(8 << 20) for _ in range(16)]  # 128 MB in 8 MB blocks, touched
grown = rss() - before
del blocks
print(ok, round(grown), round(rss() - before))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_return_freed_memory_unmaps_big_blocks():
    out = subprocess.run([sys.executable, "-c", RETURN_PROBE], capture_output=True, text=True,
                         check=True, env={**os.environ, "EDGE_SR_MALLOC_TUNING": "1"}).stdout
    ok, grown, left = out.split()
    assert ok == "True" and int(grown) > 100
    assert int(left) < 20  # unmapped on free, not kept in the heap


LEAN_PROBE = """
import os
from edge_sr import allocator
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
allocator.keep_freed_memory()  # EDGE_SR_MALLOC_TUNING=lean: return_freed_memory instead
before = rss()
blocks = [bytearray(8 << 20) for _ in range(16)]
del blocks
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), round(rss() - before))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_lean_mode_returns_freed_memory_and_asks_for_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", LEAN_PROBE], capture_output=True, text=True,
                         check=True, env={**env, "EDGE_SR_MALLOC_TUNING": "lean"}).stdout
    thp, left = out.split()
    assert thp == "1" and int(left) < 20
