"""The accuracy bench's work queue: claim files (atomic create) so that several workers, on one
host or several sharing a results folder, never run the same cell, calibration or image twice."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path


class Busy(Exception):
    """Another worker is making the calibration (or statistics) this cell needs."""


def claim(path: Path) -> bool:
    """Take ``path``'s claim file (atomic create), so parallel workers never run the same cell or
    calibration twice; a claim left by a dead process on this host is taken over."""
    lock = path.with_name(path.name + ".claim")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
                alive = host != socket.gethostname() or _alive(int(pid))
            except (OSError, ValueError):  # being written: give it a moment, then read it as held
                time.sleep(0.5)              # unless it is gone or still empty (stale)
                try:
                    alive = lock.stat().st_size > 0
                except OSError:
                    alive = False
            if alive:
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        return True
    return False


def release(path: Path) -> None:
    path.with_name(path.name + ".claim").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so a stopped worker releases its claims (``finally``) and
    leaves no lock that a worker on another host would have to respect forever."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
