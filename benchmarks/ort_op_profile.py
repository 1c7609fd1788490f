"""Where an ONNX graph's time goes in ONNX Runtime (CPU): kernel time per operator type.

    python -m benchmarks.ort_op_profile G.onnx [G2.onnx ...] [--threads 2] [--runs 4]
        [--pattern Rotate] [--by-shape] [--json F]

ORT's own profiler (``SessionOptions.enable_profiling``, ORT_ENABLE_ALL) records every node's
kernel time; this sums them per operator type over ``--runs`` runs of a random input at the
graph's fixed shape (after one warm-up run) and prints ms per run and the share of the total.
``--pattern`` also reports the share of the nodes whose name contains it (e.g. ``Rotate``: the
online Hadamard rotations of ``--rotate``). ``--by-shape`` sums per operator type *and output
shape* instead, with each group's node count and its ns per output element: an operator that is
cheap in total can hide a few slow nodes (the twenty-fourth session found 48 Transposes of
``(960, 6, 4, 1)`` tensors at 2 ms each this way; docs/results/grids.md). Run it on an otherwise
idle CPU. Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

from edge_sr.fileio import write_json


def _output_shape(args: dict) -> tuple[int, ...]:
    """The first output's shape from a node event's ``output_type_shape`` (empty if absent)."""
    outs = args.get("output_type_shape") or [{}]
    dims = next(iter(outs[0].values()), [])
    return tuple(int(d) for d in dims)


def op_profile(path: str, threads: int = 2, runs: int = 4, pattern: str | None = None,
               by_shape: bool = False) -> dict:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).random(inp.shape, dtype=np.float32)
    sess.run(None, {inp.name: x})  # warm-up, not profiled below
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "edge_sr_ortprof")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, {inp.name: x})
    trace = sess.end_profiling()
    events = json.loads(Path(trace).read_text())
    os.remove(trace)
    # the first run of the profiled session is its own warm-up: drop it
    run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    start = run_ends[0] if len(run_ends) > runs else 0
    per_op: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    elements: dict[str, int] = {}  # output elements of one node of the group (--by-shape)
    matched = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            key = e["args"]["op_name"]
            if by_shape:
                shape = _output_shape(e["args"])
                key = f"{key} {list(shape)}"
                elements[key] = int(np.prod(shape)) if shape else 1
            per_op[key] += e["dur"]
            calls[key] += 1
            if pattern and pattern in e["name"]:
                matched += e["dur"]
    total = sum(per_op.values())
    res = {"graph": path, "threads": threads, "runs": runs, "ms_per_run": total / runs / 1e3,
           "ops_ms": {k: v / runs / 1e3 for k, v in per_op.most_common()}}
    if by_shape:  # nodes per run, and ns per output element of one node
        res["nodes"] = {k: calls[k] // runs for k in res["ops_ms"]}
        res["ns_per_element"] = {k: per_op[k] * 1e3 / max(calls[k] * elements[k], 1)
                                 for k in res["ops_ms"]}
    if pattern:
        res["pattern"], res["pattern_share"] = pattern, matched / total
    return res


def main(argv=None) -> None:
    from benchmarks.dqc_step import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graphs", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--pattern", default=None)
    ap.add_argument("--by-shape", action="store_true",
                    help="group by operator type and output shape, with ns per output element")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = []
    print(f"[{cpu_model()}, {a.threads} threads]")
    for g in a.graphs:
        r = op_profile(g, a.threads, a.runs, a.pattern, a.by_shape)
        rows.append(r)
        print(f"{g}: {r['ms_per_run']:.1f} ms of kernels per run"
              + (f"; '{a.pattern}' nodes {100 * r['pattern_share']:.1f}%" if a.pattern else ""))
        for k, v in list(r["ops_ms"].items())[:a.top]:
            extra = (f"  x{r['nodes'][k]:<4d} {r['ns_per_element'][k]:6.2f} ns/element"
                     if a.by_shape else "")
            print(f"  {k:{42 if a.by_shape else 28}s} {v:9.1f} ms  "
                  f"{100 * v / r['ms_per_run']:5.1f}%{extra}")
    if a.json:
        write_json(a.json, {"cpu": cpu_model(), "rows": rows})


if __name__ == "__main__":
    main()
