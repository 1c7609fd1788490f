"""The step-by-step option study of docs/results/beyond.md (held-out PSNR, never a test set).

    python scripts/options_study.py --model ngswin-x2 --bits 4 \\
        --kw '{"rotate": ["qkv", "proj", "fc1", "fc2"], "weight_grid": "channel"}' \\
        [--gptq] [--iters 60 --batch 4 --patch 64 --bound-lr relative] --threads 2

Calibration: 16 BSD200 patches of 64x64 LR; validation: 16 held-out 48x48 LR patches of the
pool's validation split. Prints one JSON line: held-out PSNR after DOBI, after GPTQ, and after
DQC with its validation history. ``--kw`` holds a ``QuantRecipe``'s options as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from calibrate.api import dqc_sampler, pool_data
from calibrate.dobi import apply_bounds, dobi_bounds
from calibrate.dqc import DQCConfig, run_dqc, val_psnr
from calibrate.gptq import apply_gptq
from calibrate.prepare import QuantRecipe, prepare
from edge_sr.checkpoints import load_model
from edge_sr.data.pool import PatchSampler, pool_split
from edge_sr.paths import train_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ngswin-x2")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--kw", default="{}", help="QuantRecipe options as JSON")
    ap.add_argument("--gptq", action="store_true")
    ap.add_argument("--iters", type=int, default=0, help="DQC iterations (0: none)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--bound-lr", default="absolute", choices=["absolute", "relative"])
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    data = pool_data(lm.scale, "fast", 0, lr_patch=a.patch, calib_patches=16, calib_patch=64)
    split = pool_split(train_dir(), n_val=20, seed=0)
    val = PatchSampler(48, lm.scale, flips=False, rot=False, seed=1,
                       images=list(split.val[:10])).sample(16)
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(a.kw).items()}
    student = prepare(lm.model, QuantRecipe(bits=a.bits, **kw))
    t0 = time.time()
    bounds, _ = dobi_bounds(student, data.calib_lr, [a.bits])
    apply_bounds(student, bounds[a.bits])
    res = {"dobi": val_psnr(student, *val, lm.scale)}
    if a.gptq:
        apply_gptq(student, data.calib_lr)
        res["gptq"] = val_psnr(student, *val, lm.scale)
    res["init_s"] = time.time() - t0
    if a.iters:
        t = time.time()
        cfg = DQCConfig(iterations=a.iters, batch=a.batch, lr_patch=a.patch,
                        val_every=max(1, a.iters // 6), ckpt_every=10**9, bound_lr=a.bound_lr,
                        lr=a.lr)
        r = run_dqc(student, lm.model, dqc_sampler(data.sampler, 0), val, cfg)
        res |= {"dqc_best": r.best_val_psnr, "best_it": r.best_iteration,
                "dqc_s": time.time() - t,
                "history": [(h["iteration"], round(h["val_psnr"], 3)) for h in r.history]}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
