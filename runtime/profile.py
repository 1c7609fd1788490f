"""``edge-sr profile``: latency, throughput and memory of an engine on one frame size.

A frame is the whole user-visible path: tiling, the backend calls, blending (a dynamic engine:
padding, one call, the crop; every baseline then runs the whole frame too). After ``warmup``
frames, ``runs`` frames are timed; p50/p90/p99 and frames/s (1 / p50) are reported.
With ``compare`` the engine's FP32 graph runs on the same backend, interleaved frame by frame with
the quantized one so machine noise hits both alike, and the FP32/quantized latency ratio is given.
For an ONNX Runtime engine ``compare`` also times, in the same loop, on the same frame and thread
count, what a user would run instead (``runtime.ort_baseline``; ``baselines`` picks them): the
graph ORT's own ``quantize_static`` makes of the FP32 graph (INT8 QDQ, cached in the engine
directory; making it takes about a minute for SwinIR-light at 320x180) and the FP checkpoint in
PyTorch eager FP32. Each row gets ``speed_vs_fp32_p50`` (FP32 p50 / its p50) and
``speed_vs_fp32_rounds`` (the quartiles of the per-round ratios: when they straddle 1 the
verdict is "about as fast", not faster or slower); a
baseline that cannot be made here (no checkpoint, no pool data) is skipped with a warning and
listed under ``skipped``, unless ``require_baselines`` (baselines the user named): then it is an
``EdgeSRError`` before the timed runs.

``speed_check`` is ``build``'s quick version: the engine against its FP32 graph on one tile, a
few interleaved calls, recorded in the manifest.

Peak memory is the peak resident set size (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) during session creation and warm-up, minus the RSS just before: it
counts the graph, the runtime's arenas and the activations (native allocations that
``tracemalloc`` cannot see). The variants load one after the other in one process, so the first
also pays the runtime's one-time set-up and later ones may reuse memory freed before them;
``process_peak_rss_mib`` is the process's own peak RSS so far. Where the peak cannot be reset it
falls back to ``ru_maxrss``, a process-lifetime peak, and says so.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_sr.errors import EdgeSRError
from edge_sr.fileio import atomic_path, check_writable, write_json
from edge_sr.hardware import cpu_model
from edge_sr.logutil import progress_disabled
from runtime.backends.onnxruntime import OrtBackend, default_threads
from runtime.engine import open_engine
from runtime.ort_baseline import (
    EAGER_LABEL,
    STATIC_LABEL,
    STATIC_PRECISION,
    BaselineUnavailable,
    EagerBackend,
    eager_model,
    ort_static_graph,
)
from runtime.predictors import BackendPredictor
from runtime.tiling import TilePlan, pad_to_min

log = logging.getLogger(__name__)
MIN_RUNS = 3  # timed rounds kept even when the time budget is spent
DEFAULT_FRAME = (180, 320)  # LR (height, width) profiled when neither the user nor the engine says


def engine_frame(m) -> tuple[int, int]:
    """The LR (height, width) an engine's manifest says it was built for: ``build
    --input-size``'s frame, else ``DEFAULT_FRAME``."""
    size = (m.build_config or {}).get("input_size")
    if isinstance(size, list | tuple) and len(size) == 2:
        return int(size[1]), int(size[0])  # build_config keeps (width, height)
    return DEFAULT_FRAME
# what ``compare`` may add beside the FP32 graph (ONNX Runtime engines), and their rows' labels
BASELINES: tuple[str, ...] = ("quantize_static", "eager")
_LABELS = {"quantize_static": STATIC_LABEL, "eager": EAGER_LABEL}


def parse_baselines(text: str) -> tuple[str, ...]:
    """``--baselines``: ``all``, ``none`` or a comma-separated list of ``BASELINES`` (any case).

    Raises ``EdgeSRError`` (one line) on an empty list, an unknown name, or ``all``/``none``
    combined with names."""
    names = [t.strip().lower() for t in text.split(",")]
    expected = f"expected all, none, or some of {', '.join(BASELINES)} (comma-separated)"
    if not any(names) or "" in names:
        raise EdgeSRError(f"--baselines: {expected}, got {text!r}")
    if len(names) == 1 and names[0] in ("all", "none"):
        return BASELINES if names[0] == "all" else ()
    bad = [n for n in names if n not in BASELINES]
    if bad:
        raise EdgeSRError(f"--baselines: {expected}; 'all' and 'none' stand alone; got "
                          f"{', '.join(bad)}")
    return tuple(dict.fromkeys(names))


@dataclass
class ProfileConfig:
    engine: str | Path
    # LR (height, width); None: the frame the engine was built for (``build --input-size``),
    # else DEFAULT_FRAME
    input_size: tuple[int, int] | None = None
    runs: int = 20
    warmup: int = 1
    # the timed loop stops after the round that passes this many seconds (at least MIN_RUNS
    # rounds), so a default run stays under a minute; None times all ``runs``
    max_seconds: float | None = 30.0
    compare: bool = False
    # which of BASELINES ``compare`` adds for an ONNX Runtime engine (the FP32 graph always)
    baselines: tuple[str, ...] = BASELINES
    # the user named ``baselines`` (``--baselines LIST``): one that cannot be made here is an
    # error, not a skip with a warning (the default, for ``all``)
    require_baselines: bool = False
    threads: int | None = None
    scale: int | None = None
    json_path: str | Path | None = None  # default results/profile/<engine folder>_<W>x<H>.json
    plot_path: str | Path | None = None  # default: the JSON path with .png
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise EdgeSRError(f"--max-seconds: expected a positive number, got {self.max_seconds}")
        if self.runs < 1 or self.warmup < 0:
            raise EdgeSRError(f"--runs/--warmup: expected runs >= 1 and warmup >= 0, got "
                              f"{self.runs} and {self.warmup}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise EdgeSRError(f"--baselines: expected some of {', '.join(BASELINES)} (or all, "
                              f"none), got {', '.join(bad)}")
        if self.input_size is not None and min(self.input_size) < 1:
            raise EdgeSRError(f"--input-size: expected a positive size, got {self.input_size}")
        if self.threads is not None and self.threads < 1:
            raise EdgeSRError(f"--threads: expected a positive number of threads, got "
                              f"{self.threads}")


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak RSS increase over a block, in MiB (see the module docstring for the method)."""

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "peak RSS (VmHWM, reset before) minus RSS before"
        except OSError:
            self.method = "ru_maxrss (process-lifetime peak) minus RSS before"
        self.before = _status_kb("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kb("VmHWM") if self.method.startswith("peak RSS") else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mib = peak / 1024
        self.delta_mib = max(0, peak - self.before) / 1024


# the fewest runs behind a printed p90 / p99 (the JSON keeps them all): with fewer, the
# percentile is the slowest run or an interpolation next to it, not a tail
MIN_RUNS_P90, MIN_RUNS_P99 = 10, 50


def latency_stats(seconds: list[float], frame_hw: tuple[int, int]) -> dict:
    """p50/p90/p99/mean/min in ms of per-frame ``seconds``; frames/s and LR megapixels/s from
    the median (p50), as every speed ratio here is."""
    ms = np.asarray(seconds) * 1000.0
    p50 = float(np.percentile(ms, 50))
    return {"runs": len(ms), "p50_ms": p50,
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "fps": 1000.0 / p50,
            "megapixels_per_s": frame_hw[0] * frame_hw[1] / 1e6 / (p50 / 1000.0),
            "latencies_ms": [round(float(v), 3) for v in ms]}


def round_ratios(fp32_s: list[float], other_s: list[float]) -> dict:
    """The FP32 / variant time ratio of each interleaved round, and its quartiles: the spread
    the machine's noise gives the p50 ratio. ``clear``: the middle half of the rounds is all on
    one side of 1 (else the two are too close to call on this run)."""
    r = np.asarray(fp32_s) / np.asarray(other_s)
    q25, q75 = (float(v) for v in np.percentile(r, [25, 75]))
    return {"q25": q25, "q75": q75, "clear": bool(q25 > 1.0 or q75 < 1.0)}


def speed_verdict(ratio: float, spread: dict, what: str = "quantized") -> str:
    """``faster`` / ``slower`` when the per-round ratios agree, else ``about as fast``."""
    if not spread["clear"]:
        return (f"{what} about as fast: the rounds' ratios span {spread['q25']:.2f}-"
                f"{spread['q75']:.2f}x (middle half), within this machine's noise")
    return f"{what} {'faster' if ratio > 1 else 'slower'}"


def default_paths(cfg: ProfileConfig, engine_name: str) -> tuple[Path, Path]:
    h, w = cfg.input_size
    js = Path(cfg.json_path) if cfg.json_path else Path("results/profile") / (
        f"{engine_name}_{w}x{h}.json")
    png = Path(cfg.plot_path) if cfg.plot_path else js.with_suffix(".png")
    return js, png


def profile(cfg: ProfileConfig) -> dict:
    """Profile the engine (with ``compare``: its FP32 graph, ORT's ``quantize_static`` graph of it
    and PyTorch eager FP32 too, interleaved); write JSON and a PNG plot."""
    eng = open_engine(cfg.engine, scale=cfg.scale)
    m = eng.manifest
    if cfg.input_size is None:
        cfg = dataclasses.replace(cfg, input_size=engine_frame(m))
    for path, option in zip(default_paths(cfg, Path(eng.path).resolve().name), ("--json", "--plot")):
        check_writable(path, option)  # before the timing, not after it
    h, w = cfg.input_size
    frame = np.random.default_rng(cfg.seed).random((1, 3, h, w), dtype=np.float32)
    if m.dynamic:  # the whole frame in one call
        n_tiles = 1
    else:
        padded = pad_to_min(frame, *m.tile).shape[-2:]
        n_tiles = len(TilePlan.make(*padded, tuple(m.tile), m.overlap))
    factories = {"quantized": lambda: eng.backend(threads=cfg.threads),
                 "fp32": lambda: eng.backend(threads=cfg.threads, fp32=True)}
    if not cfg.compare:
        del factories["fp32"]
    baselines: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    torch_threads = None
    if cfg.compare and cfg.baselines:
        if m.backend == "onnxruntime":
            torch_threads = _add_baselines(cfg, eng, factories, baselines, skipped)
        else:
            for k in (_LABELS[b] for b in cfg.baselines):
                _skip(cfg, skipped, k, f"the engine runs on {m.backend}; the ORT quantize_static "
                      "and PyTorch CPU baselines are timed for onnxruntime engines only")
    preds, memory, infos, threads = {}, {}, {}, {}
    try:
        for label, make in factories.items():
            try:
                with PeakMemory() as mem:
                    backend = make()
                    preds[label] = BackendPredictor(backend, label, overlap=m.overlap)
                    infos[label], threads[label] = backend.info(), getattr(backend, "threads",
                                                                           None)
                    for _ in range(cfg.warmup):
                        preds[label].run_numpy(frame)
            except BaselineUnavailable as e:
                _skip(cfg, skipped, label, str(e))
                baselines.pop(label, None)
                continue
            memory[label] = {"peak_rss_increase_mib": round(mem.delta_mib, 1),
                             "process_peak_rss_mib": round(mem.peak_mib, 1),
                             "method": mem.method}
        times = time_interleaved(preds, frame, cfg.runs, cfg.max_seconds)
    finally:
        for p in preds.values():
            p.close()
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
    info = infos["quantized"]
    result = {
        "engine": str(eng.path), "engine_name": m.name, "backend": info.name,
        "device": info.device, "scale": m.scale, "bits": m.bits,
        "input_size": {"width": w, "height": h},
        "output_size": {"width": w * m.scale, "height": h * m.scale},
        "tile": list(m.tile), "overlap": m.overlap, "batch": m.batch, "dynamic": m.dynamic,
        "tiles_per_frame": n_tiles, "warmup": cfg.warmup, "max_seconds": cfg.max_seconds,
        "threads": threads["quantized"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "variants": {k: {"precision": infos[k].precision, "runtime": infos[k].name,
                         **latency_stats(times[k], (h, w)), "memory": memory[k]} for k in preds},
    }
    if cfg.compare:
        f = result["variants"]["fp32"]
        for k, v in result["variants"].items():
            v["speed_vs_fp32_p50"] = f["p50_ms"] / v["p50_ms"]
            v["speed_vs_fp32_rounds"] = round_ratios(times["fp32"], times[k])
        result["ratio_fp32_over_quantized_p50"] = result["variants"]["quantized"][
            "speed_vs_fp32_p50"]
        result["baselines"] = baselines
        result["skipped"] = skipped
    # the folder's name, as the user sees it: a copied or renamed engine keeps its manifest's
    # name, and two such engines would write one default file
    js, png = default_paths(cfg, Path(eng.path).resolve().name)
    write_json(js, result)
    plot(result, png)
    result["json"], result["plot"] = str(js), str(png)
    return result


def time_interleaved(preds: dict, frame: np.ndarray, runs: int,
                     max_seconds: float | None = None, desc: str = "profile"
                     ) -> dict[str, list[float]]:
    """Seconds per ``run_numpy(frame)`` of each predictor, run in turn within every round so
    that the machine's noise hits every variant alike; stops after ``max_seconds`` (at least
    ``MIN_RUNS`` rounds)."""
    times: dict[str, list[float]] = {k: [] for k in preds}
    start = time.perf_counter()
    for r in tqdm(range(runs), desc=desc, unit="run", disable=progress_disabled()):
        for label, pred in preds.items():
            t0 = time.perf_counter()
            pred.run_numpy(frame)
            times[label].append(time.perf_counter() - t0)
        if (max_seconds is not None and MIN_RUNS <= r + 1 < runs
                and time.perf_counter() - start > max_seconds):
            log.info("%s: time budget of %.0f s reached after %d of %d runs", desc, max_seconds,
                     r + 1, runs)
            break
    return times


def speed_check(eng, runs: int = 5, threads: int | None = None, seed: int = 0) -> dict:
    """A quick speed check of an engine against its own FP32 graph on this machine: the median
    of ``runs`` interleaved calls of each on one input of the engine's tile shape (one call;
    a dynamic engine: its trace shape), after one warm-up call each.

    ``eng``: a ``runtime.engine.Engine``. Returns ``engine_ms`` and ``fp32_ms`` (medians, ms per
    call), ``speed_vs_fp32`` (fp32_ms / engine_ms: > 1 means the engine is faster) with
    ``speed_vs_fp32_rounds`` (``round_ratios``: is the difference clear of the noise), the input
    (height, width), runs, threads, the runtime, its device and the CPU's model name. A few
    calls on a busy machine move by 10-30 %: ``edge-sr profile --compare`` measures a frame
    properly."""
    h, w = eng.manifest.tile
    frame = np.random.default_rng(seed).random((1, 3, h, w), dtype=np.float32)
    preds = {}
    try:
        for label, fp32 in (("engine", False), ("fp32", True)):
            preds[label] = BackendPredictor(eng.backend(threads=threads, fp32=fp32), label,
                                            overlap=eng.manifest.overlap)
            preds[label].run_numpy(frame)
        times = time_interleaved(preds, frame, max(runs, 1), desc="speed check")
        used = getattr(preds["engine"].backend, "threads", threads)
        info = preds["engine"].backend.info()
    finally:
        for p in preds.values():
            p.close()
    med = {k: 1000.0 * float(np.median(v)) for k, v in times.items()}
    spread = round_ratios(times["fp32"], times["engine"])
    return {"engine_ms": round(med["engine"], 2), "fp32_ms": round(med["fp32"], 2),
            "speed_vs_fp32": round(med["fp32"] / med["engine"], 3),
            "speed_vs_fp32_rounds": {k: round(v, 3) if isinstance(v, float) else v
                                     for k, v in spread.items()},
            "input_hw": [h, w], "runs": len(times["engine"]), "threads": used,
            "runtime": info.name, "device": info.device, "cpu": cpu_model()}


def _skip(cfg: ProfileConfig, skipped: dict, label: str, why: str) -> None:
    """Note a baseline that cannot be made here: a warning and ``skipped[label]``, or, when the
    user named the baselines (``require_baselines``), an ``EdgeSRError``."""
    if cfg.require_baselines:
        named = {v: k for k, v in _LABELS.items()}.get(label, label)  # the name the user typed
        raise EdgeSRError(f"--baselines: {named} ({label}) cannot be timed here: {why}")
    log.warning("profile --compare: skipping %s: %s", label, why)
    skipped[label] = why


def _add_baselines(cfg: ProfileConfig, eng, factories: dict, baselines: dict,
                   skipped: dict) -> int:
    """Add the ORT ``quantize_static`` and PyTorch eager rows to ``factories`` (or note why not in
    ``skipped``); set torch's threads to the engine's and return the previous count."""
    import torch


    m = eng.manifest
    threads = cfg.threads or default_threads()
    req = m.size_requirements or {}
    pads = {"pad_multiple": req.get("multiple", 1), "min_side": req.get("minimum", 1)}
    path = None
    try:
        if "quantize_static" in cfg.baselines:
            path, baselines[STATIC_LABEL] = ort_static_graph(eng)
    except Exception as e:  # a baseline that cannot be made must not sink the profile
        _skip(cfg, skipped, STATIC_LABEL, f"{type(e).__name__}: {e}")
    if path is not None:
        factories[STATIC_LABEL] = lambda: OrtBackend(
            path, threads=threads, tile=None if m.dynamic else tuple(m.tile), max_batch=m.batch,
            precision=STATIC_PRECISION, **({"scale": m.scale, **pads} if m.dynamic else {}))

    def eager():
        model, baselines[EAGER_LABEL] = eager_model(m)
        baselines[EAGER_LABEL]["input"] = (
            "the whole frame in one call, padded like the dynamic engine" if m.dynamic else
            f"the engine's {m.tile[0]}x{m.tile[1]} tiles, {m.batch} per call, tiled and "
            "blended like it")
        baselines[EAGER_LABEL]["threads"] = threads
        backend = EagerBackend(model, m.scale, None if m.dynamic else tuple(m.tile), m.batch)
        if m.dynamic:
            backend.pad_multiple, backend.min_side = pads["pad_multiple"], pads["min_side"]
        return backend

    if "eager" in cfg.baselines:
        factories[EAGER_LABEL] = eager
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    return before


def plot(result: dict, path: str | Path) -> Path:
    """Box plot of per-frame latency for each variant (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    labels = list(result["variants"])
    data = [result["variants"][k]["latencies_ms"] for k in labels]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(labels)), 3.8), dpi=100)
    ax.boxplot(data, whis=(1, 99))
    ticks = []
    for k in labels:
        v = result["variants"][k]
        speed = f", {v['speed_vs_fp32_p50']:.2f}x" if "speed_vs_fp32_p50" in v else ""
        ticks.append(f"{k}\n{v['precision']}\np50 {v['p50_ms']:.0f} ms{speed}")
    ax.set_xticks(range(1, len(labels) + 1), ticks, fontsize=8)
    ax.set_ylabel("latency per frame (ms)")
    i, o = result["input_size"], result["output_size"]
    ax.set_title(f"{result['engine_name']}: {i['width']}x{i['height']} -> "
                 f"{o['width']}x{o['height']}\n{result['device']}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def table(result: dict) -> str:
    """The printed profile: one row per variant (and the FP32/quantized ratio)."""
    i, o, n_tiles = result["input_size"], result["output_size"], result["tiles_per_frame"]
    speed = any("speed_vs_fp32_p50" in v for v in result["variants"].values())
    lines = [f"{result['engine_name']} on {result['backend']}, {result['device']}",
             f"frame {i['width']}x{i['height']} -> {o['width']}x{o['height']}, "
             + ("one call of the whole frame (dynamic engine)" if result.get("dynamic") else
                f"{n_tiles} tile{'s' if n_tiles != 1 else ''} of "
                f"{result['tile'][1]}x{result['tile'][0]}"
                + (f" (overlap {result['overlap']})" if n_tiles > 1 else
                   " (the frame padded to it)" if tuple(result["tile"]) != (i["height"], i["width"])
                   else "")
                ) + f", {result['warmup']} warm-up",
             f"{'variant':<20} {'precision':<30} {'runs':>4} {'p50 ms':>9} {'p90 ms':>9} "
             f"{'p99 ms':>9} {'frames/s':>9} {'peak MiB':>9}" + (f" {'vs fp32':>8}" if speed
                                                                    else "")]
    def pct(v: dict, key: str, least: int) -> str:
        return f"{v[key]:>9.1f}" if v["runs"] >= least else f"{'-':>9}"

    for k, v in result["variants"].items():
        lines.append(f"{k:<20} {v['precision']:<30} {v['runs']:>4} {v['p50_ms']:>9.1f} "
                     f"{pct(v, 'p90_ms', MIN_RUNS_P90)} {pct(v, 'p99_ms', MIN_RUNS_P99)} "
                     f"{v['fps']:>9.3f} {v['memory']['peak_rss_increase_mib']:>9.1f}"
                     + (f" {v['speed_vs_fp32_p50']:>7.2f}x" if speed else ""))
    if "ratio_fp32_over_quantized_p50" in result:
        r = result["ratio_fp32_over_quantized_p50"]
        spread = result["variants"]["quantized"].get("speed_vs_fp32_rounds")
        lines.append(f"FP32 / quantized p50 latency: {r:.2f}x ("
                     + (speed_verdict(r, spread) if spread else
                        "quantized faster" if r > 1 else "quantized slower") + ")")
    if speed:
        lines.append("vs fp32: the ORT FP32 graph's p50 / the row's p50 (> 1: faster); "
                     "frames/s: 1000 / p50")
    if any(v["runs"] < MIN_RUNS_P99 for v in result["variants"].values()):
        lines.append(f"p90 / p99: printed from {MIN_RUNS_P90} / {MIN_RUNS_P99} runs up (--runs, "
                     "--max-seconds); the JSON has every latency")
    st = (result.get("baselines") or {}).get(STATIC_LABEL)
    if st:
        lines.append(f"{STATIC_LABEL}: {st['graph']} ("
                     + ("cached" if st["cached"] else f"made in {st['seconds']:.1f} s") + ")")
    for k, why in (result.get("skipped") or {}).items():
        lines.append(f"skipped {k}: {why}")
    lines.append("peak MiB: " + next(iter(result["variants"].values()))["memory"]["method"]
                 + ", while the variant was loaded and warmed up, in the order of the rows "
                 "(the first also pays the runtime's one-time set-up)")
    return "\n".join(lines)
