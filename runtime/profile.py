"""``edge-sr profile``: latency, throughput and memory of an engine on one frame size.

A frame is the whole user-visible path: tiling, the backend calls, blending. After ``warmup``
frames, ``runs`` frames are timed; p50/p90/p99 and frames/s (1 / mean latency) are reported.
With ``compare`` the engine's FP32 graph runs on the same backend, interleaved frame by frame with
the quantized one so machine noise hits both alike, and the FP32/quantized latency ratio is given.

Peak memory is the peak resident set size (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) during session creation and warm-up, minus the RSS just before: it
counts the graph, the runtime's arenas and the activations (native allocations that
``tracemalloc`` cannot see). Where the peak cannot be reset it falls back to ``ru_maxrss``, a
process-lifetime peak, and says so.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_sr.errors import EdgeSRError
from edge_sr.fileio import atomic_path, write_json
from edge_sr.logutil import progress_disabled

log = logging.getLogger(__name__)


@dataclass
class ProfileConfig:
    engine: str | Path
    input_size: tuple[int, int] = (180, 320)  # LR (height, width)
    runs: int = 20
    warmup: int = 3
    compare: bool = False
    threads: int | None = None
    scale: int | None = None
    json_path: str | Path | None = None  # default results/profile/<engine>_<W>x<H>.json
    plot_path: str | Path | None = None  # default: the JSON path with .png
    seed: int = 0

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0:
            raise EdgeSRError(f"--runs/--warmup: expected runs >= 1 and warmup >= 0, got "
                              f"{self.runs} and {self.warmup}")
        if min(self.input_size) < 1:
            raise EdgeSRError(f"--input-size: expected a positive size, got {self.input_size}")


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


def latency_stats(seconds: list[float], frame_hw: tuple[int, int]) -> dict:
    ms = np.asarray(seconds) * 1000.0
    return {"runs": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "fps": float(1000.0 / ms.mean()),
            "megapixels_per_s": float(frame_hw[0] * frame_hw[1] / 1e6 / (ms.mean() / 1000.0)),
            "latencies_ms": [round(float(v), 3) for v in ms]}


def default_paths(cfg: ProfileConfig, engine_name: str) -> tuple[Path, Path]:
    h, w = cfg.input_size
    js = Path(cfg.json_path) if cfg.json_path else Path("results/profile") / (
        f"{engine_name}_{w}x{h}.json")
    png = Path(cfg.plot_path) if cfg.plot_path else js.with_suffix(".png")
    return js, png


def profile(cfg: ProfileConfig) -> dict:
    """Profile the engine (and its FP32 graph with ``compare``); write JSON and a PNG plot."""
    from runtime.engine import open_engine
    from runtime.predictors import BackendPredictor
    from runtime.tiling import TilePlan, pad_to_min

    eng = open_engine(cfg.engine, scale=cfg.scale)
    m = eng.manifest
    h, w = cfg.input_size
    frame = np.random.default_rng(cfg.seed).random((1, 3, h, w), dtype=np.float32)
    padded = pad_to_min(frame, *m.tile).shape[-2:]
    n_tiles = len(TilePlan.make(*padded, tuple(m.tile), m.overlap))
    variants = {"quantized": False} | ({"fp32": True} if cfg.compare else {})
    preds, memory = {}, {}
    for label, fp32 in variants.items():
        with PeakMemory() as mem:
            backend = eng.backend(threads=cfg.threads, fp32=fp32)
            preds[label] = BackendPredictor(backend, label, overlap=m.overlap)
            for _ in range(cfg.warmup):
                preds[label].run_numpy(frame)
        memory[label] = {"peak_rss_increase_mib": round(mem.delta_mib, 1),
                         "peak_rss_mib": round(mem.peak_mib, 1), "method": mem.method}
    times: dict[str, list[float]] = {k: [] for k in preds}
    for _ in tqdm(range(cfg.runs), desc="profile", unit="run", disable=progress_disabled()):
        for label, pred in preds.items():  # interleaved: noise hits every variant alike
            t0 = time.perf_counter()
            pred.run_numpy(frame)
            times[label].append(time.perf_counter() - t0)
    info = preds["quantized"].backend.info()
    result = {
        "engine": str(eng.path), "engine_name": m.name, "backend": info.name,
        "device": info.device, "scale": m.scale, "bits": m.bits,
        "input_size": {"width": w, "height": h},
        "output_size": {"width": w * m.scale, "height": h * m.scale},
        "tile": list(m.tile), "overlap": m.overlap, "batch": m.batch,
        "tiles_per_frame": n_tiles, "warmup": cfg.warmup,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "variants": {k: {"precision": preds[k].backend.info().precision,
                         **latency_stats(times[k], (h, w)), "memory": memory[k]} for k in preds},
    }
    if cfg.compare:
        q, f = result["variants"]["quantized"], result["variants"]["fp32"]
        result["ratio_fp32_over_quantized_p50"] = f["p50_ms"] / q["p50_ms"]
    for p in preds.values():
        p.close()
    js, png = default_paths(cfg, m.name)
    write_json(js, result)
    plot(result, png)
    result["json"], result["plot"] = str(js), str(png)
    return result


def plot(result: dict, path: str | Path) -> Path:
    """Box plot of per-frame latency for each variant (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    labels = list(result["variants"])
    data = [result["variants"][k]["latencies_ms"] for k in labels]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.boxplot(data, whis=(1, 99))
    ax.set_xticks(range(1, len(labels) + 1),
                  [f"{k}\np50 {result['variants'][k]['p50_ms']:.0f} ms" for k in labels])
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
    i, o = result["input_size"], result["output_size"]
    lines = [f"{result['engine_name']} on {result['backend']}, {result['device']}",
             f"frame {i['width']}x{i['height']} -> {o['width']}x{o['height']}, "
             f"{result['tiles_per_frame']} tiles of {result['tile'][1]}x{result['tile'][0]} "
             f"(overlap {result['overlap']}), {result['warmup']} warm-up",
             f"{'variant':<10} {'precision':<12} {'runs':>4} {'p50 ms':>9} {'p90 ms':>9} "
             f"{'p99 ms':>9} {'frames/s':>9} {'peak MiB':>9}"]
    for k, v in result["variants"].items():
        lines.append(f"{k:<10} {v['precision']:<12} {v['runs']:>4} {v['p50_ms']:>9.1f} "
                     f"{v['p90_ms']:>9.1f} {v['p99_ms']:>9.1f} {v['fps']:>9.3g} "
                     f"{v['memory']['peak_rss_increase_mib']:>9.1f}")
    if "ratio_fp32_over_quantized_p50" in result:
        r = result["ratio_fp32_over_quantized_p50"]
        lines.append(f"FP32 / quantized p50 latency: {r:.2f}x "
                     f"({'quantized faster' if r > 1 else 'quantized slower'})")
    lines.append("peak MiB: " + next(iter(result["variants"].values()))["memory"]["method"])
    return "\n".join(lines)
