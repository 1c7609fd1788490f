"""Logging set-up shared by the CLI commands (``--quiet`` / ``--verbose``)."""

from __future__ import annotations

import logging
import os


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
