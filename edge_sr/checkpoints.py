"""Named checkpoints: where they come from, where they are found, and loading them as models.

A name resolves, in order, from ``$EDGE_SR_MODELS/<file>``, the user cache
(``$XDG_CACHE_HOME/edge-sr`` or ``~/.cache/edge-sr``), the shared data folder (for the checkpoints
shipped there), and finally a verified download into the cache. ``EDGE_SR_OFFLINE=1`` forbids
downloads; then a missing file is an error that says where to put it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edge_sr.errors import EdgeSRError, MissingDependencyError
from edge_sr.fileio import atomic_path, sha256_file
from edge_sr.logutil import progress_disabled
from edge_sr.models import EXTRA_CHECKPOINTS, build_model
from edge_sr.models.base import CheckpointEntry, SRModel
from edge_sr.paths import data_root

log = logging.getLogger(__name__)

SWINIR_RELEASE = "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/"
# Known values of the official release (shared/data/README.md); x3/x4 checksums are unknown.
_OFFICIAL_X2 = dict(sha256="193b229909ca89cd8b55de9c9e7fce146ae759d59dfcd78d8feb9dd1d6fa0fd7",
                    size=17_147_989)
_REF_SHA256 = {
    2: "6c463809869535b253348fecd1ab90f5af6f5af5e23d0fc69ea16329c9fa96ad",
    3: "0a259fb385f3d9a78899406e76cefbbaee8a614a846dc857b3f6f5f2be0d666f",
    4: "79aa913b1d084af1aae9bd2a9de286bef70a6b523a76797b2f7356a11843425e",
}


def _official(s: int) -> CheckpointEntry:
    filename = f"002_lightweightSR_DIV2K_s64w8_SwinIR-S_x{s}.pth"
    return CheckpointEntry(name=f"swinir-light-x{s}", arch="swinir-light", scale=s,
                           filename=filename, url=SWINIR_RELEASE + filename,
                           **(_OFFICIAL_X2 if s == 2 else {}))


def _reference(s: int) -> CheckpointEntry:
    filename = f"swinir_light_x{s}_ref.pth"
    return CheckpointEntry(name=f"swinir-light-x{s}-ref", arch="swinir-light", scale=s,
                           filename=filename, sha256=_REF_SHA256[s],
                           shared_relpath=f"models/{filename}")


CHECKPOINTS: list[CheckpointEntry] = [_official(s) for s in (2, 3, 4)] + [
    _reference(s) for s in (2, 3, 4)
]


def list_checkpoints() -> list[CheckpointEntry]:
    """Every named checkpoint: SwinIR-light's and those the architecture modules contribute."""
    return CHECKPOINTS + [e for e in EXTRA_CHECKPOINTS if e.name not in _names(CHECKPOINTS)]


def _names(entries: list[CheckpointEntry]) -> set[str]:
    return {e.name for e in entries}


def get_entry(name: str) -> CheckpointEntry:
    for e in list_checkpoints():
        if e.name == name:
            return e
    known = ", ".join(e.name for e in list_checkpoints())
    raise EdgeSRError(f"unknown model {name!r}: expected a checkpoint file or one of {known}")


def cache_dir() -> Path:
    """edge-sr's user cache: ``$EDGE_SR_CACHE``, else ``$XDG_CACHE_HOME/edge-sr``, else ~/.cache."""
    if os.environ.get("EDGE_SR_CACHE"):
        return Path(os.environ["EDGE_SR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-sr"


def offline() -> bool:
    return os.environ.get("EDGE_SR_OFFLINE", "") not in ("", "0")


def candidate_paths(entry: CheckpointEntry) -> list[Path]:
    """Where a named checkpoint is looked for, in order (no download)."""
    paths = []
    if os.environ.get("EDGE_SR_MODELS"):
        paths.append(Path(os.environ["EDGE_SR_MODELS"]) / entry.filename)
    paths.append(cache_dir() / entry.filename)
    if entry.shared_relpath:
        root = data_root(required=False)
        if root is not None:
            paths.append(root / entry.shared_relpath)
    return paths


def find_local(entry: CheckpointEntry) -> Path | None:
    """The first existing candidate path, or None."""
    return next((p for p in candidate_paths(entry) if p.is_file()), None)


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, mtime, size) so repeated loads stay cheap."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def verify(entry: CheckpointEntry, path: Path) -> str:
    """Check size and sha256 where known; return the sha256."""
    if entry.size is not None and path.stat().st_size != entry.size:
        raise EdgeSRError(f"checkpoint {entry.name} at {path}: expected {entry.size} bytes, "
                          f"found {path.stat().st_size}; delete it and fetch it again")
    digest = file_sha256(path)
    if entry.sha256 is not None and digest != entry.sha256:
        raise EdgeSRError(f"checkpoint {entry.name} at {path}: expected sha256 {entry.sha256}, "
                          f"found {digest}; the file is corrupt or a different checkpoint")
    return digest


def download(entry: CheckpointEntry, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``entry.url`` to ``dest`` atomically, verifying size and sha256 where known."""
    from tqdm import tqdm

    log.info("downloading %s from %s", entry.name, entry.url)
    h = hashlib.sha256()
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(entry.url, timeout=timeout) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or entry.size
            with tqdm(total=total, unit="B", unit_scale=True, desc=entry.filename,
                      disable=progress_disabled()) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
        size = tmp.stat().st_size
        if entry.size is not None and size != entry.size:
            raise EdgeSRError(f"download of {entry.url}: expected {entry.size} bytes, got {size}")
        if entry.sha256 is not None and h.hexdigest() != entry.sha256:
            raise EdgeSRError(f"download of {entry.url}: expected sha256 {entry.sha256}, "
                              f"got {h.hexdigest()}")
    if entry.sha256 is None:
        log.warning("%s has no known checksum; downloaded file sha256 is %s",
                    entry.name, h.hexdigest())
    return dest


def _missing_message(entry: CheckpointEntry, why: str) -> str:
    where = ", ".join(str(p) for p in candidate_paths(entry))
    fetch = f"download {entry.url} and put" if entry.url else "put"
    shared = ""
    if entry.shared_relpath and data_root(required=False) is None:
        shared = (f"; it ships in the shared data folder as {entry.shared_relpath}, which was "
                  "not found: set EDGE_SR_DATA")
    return (f"checkpoint {entry.name} ({entry.filename}) was not found and {why}: {fetch} "
            f"{entry.filename} in $EDGE_SR_MODELS or {cache_dir()}, or pass its path "
            f"(searched: {where}){shared}")


def resolve_entry(entry: CheckpointEntry) -> Path:
    """Local file of a named checkpoint, downloading it into the cache if allowed."""
    found = find_local(entry)
    if found is not None:
        verify(entry, found)
        return found
    if entry.url is None:
        raise EdgeSRError(_missing_message(entry, "it cannot be downloaded"))
    if offline():
        raise EdgeSRError(_missing_message(entry, "downloads are off (EDGE_SR_OFFLINE=1)"))
    try:
        path = download(entry, cache_dir() / entry.filename)
    except OSError as e:  # URLError, timeouts, disk errors
        raise EdgeSRError(_missing_message(entry, f"the download failed ({e})")) from None
    verify(entry, path)
    return path


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.endswith(CHECKPOINT_SUFFIXES)


def resolve(name_or_path: str | os.PathLike) -> tuple[Path, CheckpointEntry | None]:
    """A checkpoint file and, when it was named, its registry entry."""
    s = os.fspath(name_or_path)
    if s in _names(list_checkpoints()):
        entry = get_entry(s)
        return resolve_entry(entry), entry
    p = Path(s).expanduser()
    if p.is_file():
        return p, None
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(s) or p.exists():
        raise EdgeSRError(f"checkpoint file {p} does not exist or is not a file")
    get_entry(s)  # raises: unknown name, with the known ones listed
    raise AssertionError("unreachable")


def checkpoint_scale(name_or_path: str | os.PathLike) -> int:
    """The upscaling factor of a registry name (from the registry, nothing read) or of a
    checkpoint file (read and recognised, as ``load_model`` does). Raises EdgeSRError as
    ``resolve`` and ``load_model`` do."""
    s = os.fspath(name_or_path)
    if s in _names(list_checkpoints()):
        return get_entry(s).scale
    return load_model(name_or_path).scale


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """Path of a registry name or an explicit checkpoint file."""
    return resolve(name_or_path)[0]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run (eval mode) and where it came from, for manifests."""

    model: SRModel
    name: str
    path: Path
    sha256: str
    arch: str
    scale: int


def read_checkpoint(path: Path) -> dict:
    """Read a checkpoint file (tensors only), with corrupt files reported as user errors.

    ``.safetensors`` files are read by the ``safetensors`` library itself (the format's reference
    reader: no pickle, no code runs); anything else by ``torch.load(weights_only=True)``. What the
    file holds is unwrapped later by ``edge_sr.models.state_dict.unwrap_state_dict``.
    """
    if path.suffix.lower() == ".safetensors" or _is_safetensors(path):
        return _read_safetensors(path)
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors of all kinds mean the same thing here
        log.debug("torch.load(%s): %s: %s", path, type(e).__name__, e)  # the detail under -v
        raise EdgeSRError(f"checkpoint {path} cannot be read: expected a PyTorch checkpoint "
                          f"(.pth, torch.save) or a .safetensors file; it is neither, or it is "
                          f"truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise EdgeSRError(f"checkpoint {path}: expected a dict of tensors, found "
                          f"{type(obj).__name__}")
    return obj


def _is_safetensors(path: Path) -> bool:
    """A safetensors file under another suffix: an 8-byte header length, then a JSON ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise MissingDependencyError(f"checkpoint {path} is a safetensors file, which needs the "
                                     "safetensors package: pip install safetensors") from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as e:  # SafetensorError, header/JSON errors, truncated files
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise EdgeSRError(f"checkpoint {path} cannot be read as a safetensors file "
                          f"({type(e).__name__}: {first})") from None


def load_model(name_or_path: str | os.PathLike, scale: int | None = None,
               device: str = "cpu") -> LoadedModel:
    """Resolve, read, recognise and build a checkpoint; ``scale`` must agree with its tensors."""
    path, entry = resolve(name_or_path)
    label = f"checkpoint {entry.name} ({path})" if entry else f"checkpoint {path}"
    obj = read_checkpoint(path)
    model, arch = build_model(obj, scale, source=label)
    if entry is not None and (arch.name != entry.arch or model.scale != entry.scale):
        raise EdgeSRError(f"{label}: registered as {entry.arch} x{entry.scale}, but the file "
                          f"holds {arch.name} x{model.scale}")
    return LoadedModel(model=model.to(device).eval(), name=entry.name if entry else str(path),
                       path=path, sha256=file_sha256(path), arch=arch.name, scale=model.scale)


__all__ = [
    "CHECKPOINTS",
    "LoadedModel",
    "cache_dir",
    "candidate_paths",
    "find_local",
    "get_entry",
    "list_checkpoints",
    "load_model",
    "resolve_checkpoint",
]
