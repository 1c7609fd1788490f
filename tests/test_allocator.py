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
