"""``python -m benchmarks.accuracy``: parse the arguments, set what this process runs, work
through the plan and rewrite the table (see the package docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path

import torch

from benchmarks.accuracy import __doc__ as DOC
from benchmarks.accuracy.claims import exit_on_sigterm
from benchmarks.accuracy.plan import FAMILIES, METHODS, ORDER, SETS, SETTINGS, plan
from benchmarks.accuracy.report import write_table
from benchmarks.accuracy.run import work
from edge_sr.allocator import keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="swinir")
    ap.add_argument("--scales", default=None, help="default: the family's (2,4,3 / 2,3)")
    ap.add_argument("--bits", default="4,2,3", help="weight and activation widths (WbAb)")
    ap.add_argument("--datasets", default=",".join(SETS), help="restrict the plan to these sets")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"some of {', '.join(ORDER[1:])} (FP always runs)")
    ap.add_argument("--threads", type=int, default=2, help="PyTorch threads of this worker")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda[:N]; several workers may share one results folder")
    ap.add_argument("--out", default=None,
                    help="results folder instead of the family's (its table goes there too)")
    ap.add_argument("--table", action="store_true", help="only rewrite the table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    family = FAMILIES[args.family]
    if args.out:
        family = dataclasses.replace(family, out=Path(args.out), doc=Path(args.out) / "table.md")
    SETTINGS.family, SETTINGS.device = family, args.device
    scales = _int_list(ap, "--scales", args.scales, SETTINGS.family.scales) if args.scales \
        else list(SETTINGS.family.scales)
    bits_list = _int_list(ap, "--bits", args.bits, range(2, 9))
    datasets = tuple(d for d in args.datasets.split(",") if d)
    if unknown := set(datasets) - set(SETS):
        ap.error(f"--datasets: unknown {sorted(unknown)}; expected some of {', '.join(SETS)}")
    methods = tuple(m for m in args.methods.split(",") if m)
    if unknown := set(methods) - set(ORDER[1:]):
        ap.error(f"--methods: unknown {sorted(unknown)}; expected some of {', '.join(ORDER[1:])}")
    cells = plan(scales, bits_list, datasets, methods)
    flags = [a for a in sys.argv[1:] if a != "--table"]  # the command that makes the cells
    if not any(a == "--family" or a.startswith("--family=") for a in flags):
        flags = ["--family", args.family, *flags]
    SETTINGS.cells = cells
    SETTINGS.command = shlex.join(["python", "-m", "benchmarks.accuracy", *flags])
    if not args.table:
        from calibrate.api import check_device

        check_device(SETTINGS.device)
        if torch.device(SETTINGS.device).type == "cuda":  # plain FP32 like the CPU cells: no TF32 convs
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        torch.set_num_threads(args.threads)
        keep_freed_memory()
        exit_on_sigterm()
        work(cells, bits_list)
    write_table()


def _int_list(ap: argparse.ArgumentParser, flag: str, text: str, allowed) -> list[int]:
    """A comma-separated list of integers from ``allowed``, or an argparse error naming ``flag``."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ap.error(f"{flag} {text!r}: expected comma-separated integers")
    if not vals or any(v not in allowed for v in vals):
        ap.error(f"{flag} {text!r}: expected some of {', '.join(map(str, allowed))}")
    return vals


if __name__ == "__main__":
    main()
