"""A calibration file from the best-validated bounds of an unfinished DQC run's state file.

For reporting a paper-recipe run that a GPU lease cut short (docs/results/accuracy.md): the
bench's ``2dquant-paper-cut`` cells score such a file. The iteration it stopped at, the
held-out validation history and the source state's path go into the file's stats. A user with
an interrupted run should resume it instead (``edge-sr calibrate --resume``).

    python scripts/calib_from_dqc_state.py STATE.pt --model ngswin-x2 --bits 4 -o OUT.pt
"""

from __future__ import annotations

import argparse
import pickle

import torch

from calibrate.calibfile import CalibrationMeta, save_calibration, state_checksum
from calibrate.dqc import load_bounds
from calibrate.prepare import QuantRecipe, prepare
from edge_sr.checkpoints import load_model
from edge_sr.errors import EdgeSRError
from edge_sr.fileio import versions

STATE_KEYS = ("best_bounds", "config", "iteration", "best_iteration", "best_val_psnr", "history")


def read_state(path: str) -> dict:
    """The DQC state file, with every key this script reads; a clear error otherwise."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise SystemExit(f"{path}: expected a DQC state file (*.dqc-state.pt), could not read "
                         f"one ({type(e).__name__}: {e})") from None
    missing = [k for k in STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise SystemExit(f"{path}: not a DQC state file (*.dqc-state.pt): no {', '.join(missing)}")
    if "iterations" not in st["config"]:
        raise SystemExit(f"{path}: not a DQC state file (*.dqc-state.pt): its config has no "
                         "'iterations'")
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("state")
    ap.add_argument("--model", required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--device-name", default="", help="where the DQC iterations ran")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    try:
        recipe = QuantRecipe(args.bits)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    st = read_state(args.state)
    try:
        lm = load_model(args.model)
    except EdgeSRError as e:
        raise SystemExit(str(e)) from None
    student = prepare(lm.model, recipe)
    try:
        load_bounds(student, st["best_bounds"])
    except KeyError as e:
        raise SystemExit(f"{args.state}: its bounds do not fit {args.model} at {args.bits} bits "
                         f"(no {e})") from None
    cfg = st["config"]
    stats = {"dqc_iterations": st["iteration"], "dqc_planned_iterations": cfg["iterations"],
             "dqc_best_iteration": st["best_iteration"], "val_psnr": st["best_val_psnr"],
             "dqc_history": st["history"], "dqc_config": cfg, "source_state": args.state,
             "device": args.device_name, "note": "paper recipe cut short by the GPU lease"}
    meta = CalibrationMeta(bits=args.bits, scale=lm.scale, method="2dquant",
                           recipe=recipe.to_dict(), checkpoint_name=lm.name,
                           checkpoint_sha256=lm.sha256, state_sha256=state_checksum(lm.model),
                           arch=lm.arch, config={"recipe": "paper", "cut_at": st["iteration"]},
                           stats=stats, versions=versions())
    print(save_calibration(args.output, student, meta))


if __name__ == "__main__":
    main()
