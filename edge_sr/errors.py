"""User-facing errors.

Anything a user can cause (a wrong path, a wrong scale, a corrupt file) raises ``EdgeSRError`` with a
sentence that names the file or option, what was expected and what was found. The CLI prints it on
one line and exits non-zero; other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class EdgeSRError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    exit_code = 2


class MissingDependencyError(EdgeSRError):
    """An optional dependency (tensorrt, pycuda, opencv) is not installed."""

    exit_code = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, a container stopping), raised where Ctrl-C's
    ``KeyboardInterrupt`` would be, so it unwinds the same way: temporary files removed,
    resumable state kept. The CLI exits 143 (128 + SIGTERM) instead of Ctrl-C's 130."""

    exit_code = 143


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (in the main thread only: elsewhere Python
    cannot set a signal handler, and the block runs unchanged); the previous handler comes back
    after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
