"""``edge-sr profile``: latency / throughput / memory of an engine (``runtime.profile``)."""

from __future__ import annotations

import click

from edge_sr.cli.options import echo_info, logging_options


@click.command("profile")
@click.option("--engine", type=click.Path(file_okay=False), required=True, metavar="DIRECTORY", help="Engine directory (edge-sr build).")
@click.option("--input-size", default=None, metavar="WxH",
              help="LR frame WIDTHxHEIGHT [default: the frame the engine was built for "
                   "(build --input-size), else 320x180].")
@click.option("--runs", type=int, default=20, show_default=True,
              help="Timed frames (at most; see --max-seconds).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed frames first.")
@click.option("--max-seconds", type=float, default=30.0, show_default=True,
              help="Stop timing after the round that passes this many seconds (at least 3 "
                   "rounds); 0 times all --runs.")
@click.option("--compare", is_flag=True,
              help="Also time, interleaved on the same frame and threads: the FP32 graph, ORT's "
                   "quantize_static INT8 graph of it (made once, cached in the engine "
                   "directory) and the FP model in PyTorch eager FP32.")
@click.option("--baselines", default=None, metavar="LIST|all|none",
              help="With --compare: what it times beside the FP32 graph (ONNX Runtime engines): "
                   "some of quantize_static, eager (comma-separated), all or none. 'none' skips "
                   "making the quantize_static graph (about a minute for SwinIR-light at "
                   "320x180). A baseline named here that cannot be timed is an error; with all it is "
                   "skipped with a warning. [default: all]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads [default: all cores].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="JSON output [default: results/profile/<engine folder>_<W>x<H>.json].")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG plot [default: the JSON path with .png].")
@logging_options
def profile_cmd(engine, input_size, runs, warmup, max_seconds, compare, baselines, threads,
                json_path, plot_path) -> None:
    """Profile an engine: p50/p90/p99 latency, frames/s and peak memory after warm-up."""
    from edge_sr.cli.options import parse_size
    from edge_sr.errors import EdgeSRError
    from runtime.profile import BASELINES, ProfileConfig, parse_baselines, profile, table

    if baselines is not None and not compare:
        raise EdgeSRError("--baselines: only with --compare (it picks what --compare times)")
    chosen = BASELINES if baselines is None else parse_baselines(baselines)

    res = profile(ProfileConfig(engine=engine, input_size=(None if input_size is None else
                                            parse_size(input_size, "--input-size", square=False)),
                                runs=runs, warmup=warmup, max_seconds=max_seconds or None,
                                compare=compare, baselines=chosen, threads=threads,
                                require_baselines=baselines is not None
                                and baselines.strip().lower() != "all",
                                json_path=json_path, plot_path=plot_path))
    click.echo(table(res))
    echo_info(f"wrote {res['json']} and {res['plot']}")
