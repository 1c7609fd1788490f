"""Logging set-up shared by the CLI commands (``--quiet`` / ``--verbose``)."""

from __future__ import annotations

import logging
import os
import time

# a redirected log gets a progress line this often while a long loop runs (it shows no bar)
LOG_EVERY_S = 30.0


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("PIL", "matplotlib"):  # their debug lines (PNG chunks, font lookups) bury ours
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    if quiet:
        os.environ["EDGE_SR_QUIET"] = "1"


def progress_disabled() -> bool | None:
    """tqdm's ``disable``: True under ``--quiet``; otherwise None, with which tqdm shows its bars
    only when stderr is a terminal, so a log file gets the log lines instead of carriage-return
    updates and cursor-movement escapes. ``EDGE_SR_PROGRESS=1`` shows the bars anyway."""
    if os.environ.get("EDGE_SR_QUIET") == "1":
        return True
    if os.environ.get("EDGE_SR_PROGRESS") == "1":
        return False
    return None


class QuietBarLog:
    """A progress line for a redirected log, where the tqdm ``bar`` is hidden: ``due()`` is
    True at most once every ``every_s`` seconds (``LOG_EVERY_S`` by default, read at each call),
    and never while the bar shows. ``elapsed()``: seconds since it was made."""

    def __init__(self, bar, every_s: float | None = None) -> None:
        self.bar, self.every_s = bar, every_s
        self.t0 = self.last = time.perf_counter()

    def due(self) -> bool:
        if not self.bar.disable:
            return False
        now = time.perf_counter()
        if now - self.last < (LOG_EVERY_S if self.every_s is None else self.every_s):
            return False
        self.last = now
        return True

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
