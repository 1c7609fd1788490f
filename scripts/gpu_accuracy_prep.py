"""Stage the data a lent GPU machine needs for ``scripts/gpu_accuracy.sh`` under ``.gpu/data``.

The device tool sends the checkout and at most 64 MiB, not ``../shared``: so this copies the
checkpoints and benchmark sets the run scores, and of the training pool only the images that
calibration reads (the 32 DOBI images are among the 64 DQC images; plus the 10 held-out ones).
Every other pool image is an empty file of the same name, so ``pool_split`` (which sees names
only) gives the same split there; ``used.txt`` lists the real ones and the device script checks
them. ``.gpu`` is git-ignored.

    python scripts/gpu_accuracy_prep.py [--sets Set5,Set14] [--models NGswin_x2.pth,...]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from calibrate.api import DQC_IMAGES, VAL_IMAGES
from edge_sr.data.images import list_images
from edge_sr.data.pool import pool_split
from edge_sr.paths import data_root

ROOT = Path(__file__).resolve().parent.parent


def used_pool_images(pool: Path, seed: int = 0) -> list[Path]:
    """The pool images ``calibrate.api.pool_data`` reads (same split and seeded order)."""
    n = len(list_images(pool))
    split = pool_split(pool, n_val=min(20, max(1, n // 10)), seed=0)
    order = np.random.default_rng(seed).permutation(len(split.calib))
    return sorted({split.calib[i] for i in order[:DQC_IMAGES]} | set(split.val[:VAL_IMAGES]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", default="Set5,Set14")
    ap.add_argument("--models", default="NGswin_x2.pth,NGswin_x3.pth,swinir_light_x4_ref.pth")
    ap.add_argument("--no-pool", action="store_true",
                    help="no training images (the run only scores existing calibrations)")
    ap.add_argument("--out", default=str(ROOT / ".gpu" / "data"))
    args = ap.parse_args()
    src, out = data_root(), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "models").mkdir(parents=True)
    for m in args.models.split(","):
        shutil.copy2(src / "models" / m, out / "models" / m)
    for s in args.sets.split(","):
        shutil.copytree(src / "benchmark" / s, out / "benchmark" / s)
    pool = src / "train" / "BSD200"
    used = [] if args.no_pool else used_pool_images(pool)
    dst = out / "train" / "BSD200"
    dst.mkdir(parents=True)
    for f in list_images(pool) if used else []:
        if f in used:
            shutil.copy2(f, dst / f.name)
        else:
            (dst / f.name).touch()
    (out / "used.txt").write_text("".join(f"{f.name}\n" for f in used))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB, {len(used)} of {len(list_images(pool))} pool images")


if __name__ == "__main__":
    main()
