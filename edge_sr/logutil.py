"""Logging set-up shared by the CLI commands (``--quiet`` / ``--verbose``)."""

from __future__ import annotations

import logging
import os


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if quiet:
        os.environ["EDGE_SR_QUIET"] = "1"


def progress_disabled() -> bool:
    """tqdm bars are hidden under ``--quiet``."""
    return os.environ.get("EDGE_SR_QUIET") == "1"
