"""Atomic writes and checksums: nothing a run writes is ever left half-written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix + ".tmp",
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp creates 0600; give the file the umask's usual mode
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def check_writable(path: str | os.PathLike, option: str) -> Path:
    """Fail early, before any work, when ``path`` could not be written: its nearest existing
    ancestor must be a writable folder (the folders below it are made at write time).

    Raises ``EdgeSRError`` naming ``option`` and the ancestor that is a file or not writable;
    returns ``path`` as a Path.
    """
    from edge_sr.errors import EdgeSRError

    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise EdgeSRError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgeSRError(f"{option} {path}: cannot write in {parent} (permission denied)")
    # os.access says yes to root everywhere: a probe file tells a read-only or pseudo file
    # system (/proc, a read-only mount) before the work, not after it
    try:
        fd, probe = tempfile.mkstemp(prefix=".edge-sr-probe-", dir=parent)
    except OSError as e:
        raise EdgeSRError(f"{option} {path}: cannot write in {parent} "
                          f"({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the packages that shape numerical results, for manifests."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("edge-sr", "torch", "numpy", "onnx", "onnxruntime", "tensorrt"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out
