"""Where the shared data lives: ``$EDGE_SR_DATA``, else ``../shared/data`` beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

from edge_sr.errors import EdgeSRError

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root(required: bool = True) -> Path | None:
    env = os.environ.get("EDGE_SR_DATA")
    candidates = [Path(env)] if env else []
    for c in (REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if c not in candidates:  # run from the checkout itself, both are the same folder
            candidates.append(c)
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    if required:
        raise EdgeSRError(
            "data folder not found: set EDGE_SR_DATA to the folder holding benchmark/, train/ and "
            f"models/ (tried {', '.join(str(c) for c in candidates)})"
        )
    return None


def benchmark_dir() -> Path:
    return data_root() / "benchmark"


def train_dir() -> Path:
    return data_root() / "train" / "BSD200"


def models_dir() -> Path:
    return data_root() / "models"
