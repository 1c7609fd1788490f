"""``edge-sr profile --compare``: the ORT ``quantize_static`` and PyTorch eager baselines, on a tiny
engine whose FP checkpoint is on disk (``conftest.make_tiny_engine`` plus a saved state dict)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.profile import ProfileConfig, profile, table

ROWS = ("quantized", "fp32", "ort_quantize_static", "torch_eager_fp32")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from conftest import make_tiny_engine, make_tiny_swinir

    from runtime.engine import read_manifest, write_manifest

    d = make_tiny_engine(tmp_path_factory.mktemp("cmp") / "tiny")
    ckpt = d.parent / "tiny_x2.pth"
    torch.save({"params": make_tiny_swinir(2).state_dict()}, ckpt)
    m = read_manifest(d)
    m.model = {"name": "tiny", "path": str(ckpt)}
    write_manifest(d, m)
    return d


@pytest.fixture
def count_quantize(monkeypatch, tmp_path):
    """Calls of ``quantize_static_graph``, with a user cache of the test's own (the tiny engines
    share one FP32 graph, so a shared cache would answer for them)."""
    import runtime.ort_baseline as ob

    monkeypatch.setenv("EDGE_SR_CACHE", str(tmp_path / "user-cache"))

    calls = []
    real = ob.quantize_static_graph

    def counted(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(ob, "quantize_static_graph", counted)
    return calls


def _cfg(engine, tmp_path, name):
    return ProfileConfig(engine=engine, input_size=(24, 40), runs=2, warmup=1, compare=True,
                         threads=1, json_path=tmp_path / f"{name}.json")


def test_compare_rows_and_cache(engine, tmp_path, data_root, count_quantize):
    before = torch.get_num_threads()
    res = profile(_cfg(engine, tmp_path, "a"))
    assert torch.get_num_threads() == before  # restored after the eager row
    assert list(res["variants"]) == list(ROWS)
    for k in ROWS:
        v = res["variants"][k]
        assert v["runs"] == 2 and 0 < v["p50_ms"] <= v["p99_ms"] and v["speed_vs_fp32_p50"] > 0
    assert res["variants"]["fp32"]["speed_vs_fp32_p50"] == 1.0
    assert res["variants"]["torch_eager_fp32"]["runtime"] == "pytorch-eager"
    assert res["skipped"] == {} and res["threads"] == 1
    st = res["baselines"]["ort_quantize_static"]
    from edge_sr.checkpoints import cache_dir

    # in the user cache: the engine directory keeps only what a device needs
    assert st["cached"] is False and st["graph"] == str(
        cache_dir() / "ort_quantize_static" / f"{st['key']}.onnx")
    assert not (engine / "ort_quantize_static.onnx").exists()
    assert st["settings"]["per_channel"] and st["calibration"]["patches"] == 8
    assert len(st["calibration"]["images"]) == 8
    assert res["baselines"]["torch_eager_fp32"]["matches_manifest"] is True
    assert len(count_quantize) == 1
    on_disk = json.loads((tmp_path / "a.json").read_text())
    assert set(on_disk["variants"]) == set(ROWS)
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = table(res)
    assert all(k in text for k in ROWS) and "vs fp32" in text
    th, tw = res["tile"]
    one = {**res, "tiles_per_frame": 1, "input_size": {"width": tw, "height": th}}
    assert f"1 tile of {tw}x{th}, " in table(one)  # no overlap, nothing padded
    one["input_size"] = {"width": tw, "height": th - 4}
    assert f"1 tile of {tw}x{th} (the frame padded to it)" in table(one)

    res2 = profile(_cfg(engine, tmp_path, "b"))  # second run: the cached graph, no quantization
    assert len(count_quantize) == 1
    assert res2["baselines"]["ort_quantize_static"]["cached"] is True
    assert res2["baselines"]["ort_quantize_static"]["key"] == st["key"]
    assert res2["baselines"]["ort_quantize_static"]["calibration"] == st["calibration"]
    assert "cached" in table(res2)


def test_static_graph_is_qdq_and_close_to_fp32(engine, data_root):
    import onnx

    from runtime.backends.onnxruntime import OrtBackend
    from runtime.engine import open_engine
    from runtime.ort_baseline import ort_static_graph

    path, _ = ort_static_graph(open_engine(engine))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = np.random.default_rng(1).random((4, 3, 16, 16), dtype=np.float32)
    ref = OrtBackend(engine / "model_fp32.onnx", threads=1).run(x)
    out = OrtBackend(path, threads=1).run(x)
    mse = float(np.mean((out - ref) ** 2))
    psnr = 10 * np.log10(float(np.ptp(ref)) ** 2 / max(mse, 1e-12))
    assert psnr > 25, psnr  # int8 of a random tiny net: close, not exact


def test_missing_checkpoint_skips_eager_row(tmp_path, data_root, caplog):
    from conftest import make_tiny_engine

    eng = make_tiny_engine(tmp_path / "nockpt")  # manifest.model names no checkpoint file
    with caplog.at_level("WARNING"):
        res = profile(_cfg(eng, tmp_path, "c"))
    assert "torch_eager_fp32" not in res["variants"]
    assert "checkpoint" in res["skipped"]["torch_eager_fp32"]
    assert "torch_eager_fp32" not in res["baselines"]
    assert "skipping torch_eager_fp32" in caplog.text
    assert set(res["variants"]) == {"quantized", "fp32", "ort_quantize_static"}
    assert "skipped torch_eager_fp32" in table(res)
    # named explicitly (--baselines eager), the missing baseline is an error before any timing
    from edge_sr.errors import EdgeSRError

    strict = _cfg(eng, tmp_path, "strict")
    strict.baselines, strict.require_baselines = ("eager",), True
    with pytest.raises(EdgeSRError, match=r"--baselines: eager \(torch_eager_fp32\) cannot be "
                                          "timed here: .*checkpoint"):
        profile(strict)


def test_stale_or_corrupt_cache_is_rebuilt(tmp_path, data_root, count_quantize):
    from conftest import make_tiny_engine

    from runtime.engine import open_engine
    from runtime.ort_baseline import STATIC_FILE, ort_static_graph

    eng = make_tiny_engine(tmp_path / "stale")
    (eng / STATIC_FILE).write_bytes(b"not a graph")  # an earlier version's place, corrupt
    path, info = ort_static_graph(open_engine(eng))
    assert path.parent.name == "ort_quantize_static" and path.name == f"{info['key']}.onnx"
    assert info["cached"] is False and len(count_quantize) == 1
    shutil.move(path, eng / STATIC_FILE)  # a good one there is used
    assert ort_static_graph(open_engine(eng))[0] == eng / STATIC_FILE
    _, info = ort_static_graph(open_engine(eng), n_calib=4)  # other settings: another key
    assert info["cached"] is False and len(count_quantize) == 2
    assert ort_static_graph(open_engine(eng), n_calib=4)[1]["cached"] is True


def test_time_budget_keeps_three_rounds(engine, tmp_path, caplog):
    """--max-seconds stops the timed loop after the round that passes it, never before 3, and
    says so only when it cut the runs short."""
    caplog.set_level("INFO", logger="runtime.profile")
    res = profile(ProfileConfig(engine=engine, input_size=(24, 40), runs=10, warmup=0,
                                max_seconds=1e-6, json_path=tmp_path / "p.json"))
    assert all(v["runs"] == 3 for v in res["variants"].values())
    assert "reached after 3 of 10 runs" in caplog.text
    caplog.clear()
    res = profile(ProfileConfig(engine=engine, input_size=(24, 40), runs=3, warmup=0,
                                max_seconds=1e-6, json_path=tmp_path / "p.json"))
    assert all(v["runs"] == 3 for v in res["variants"].values())
    assert "time budget" not in caplog.text  # every run asked for ran
    res = profile(ProfileConfig(engine=engine, input_size=(24, 40), runs=4, warmup=0,
                                max_seconds=None, json_path=tmp_path / "q.json"))
    assert all(v["runs"] == 4 for v in res["variants"].values())


def test_compare_on_a_dynamic_engine(tmp_path, data_root):
    """A dynamic engine (``build --dynamic``): every row runs the whole frame in one call, the
    quantize_static baseline included (made from the dynamic FP32 graph)."""
    from conftest import make_tiny_engine, make_tiny_swinir

    from runtime.engine import read_manifest, write_manifest

    d = make_tiny_engine(tmp_path / "dyn", dynamic=True)
    ckpt = tmp_path / "tiny_x2.pth"
    torch.save({"params": make_tiny_swinir(2).state_dict()}, ckpt)
    m = read_manifest(d)
    m.model = {"name": "tiny", "path": str(ckpt)}
    write_manifest(d, m)
    res = profile(ProfileConfig(engine=d, input_size=(20, 36), runs=1, warmup=1, compare=True,
                                threads=1, json_path=tmp_path / "d.json"))
    assert list(res["variants"]) == list(ROWS) and res["skipped"] == {}
    assert res["dynamic"] is True and res["tiles_per_frame"] == 1
    assert res["baselines"]["torch_eager_fp32"]["input"].startswith("the whole frame")
    assert "one call of the whole frame (dynamic engine)" in table(res)


def test_baselines_none_times_the_fp32_graph_only(engine, tmp_path, count_quantize):
    """``--baselines none`` (make demo): the engine against its FP32 graph, and no
    quantize_static graph is made."""
    cfg = _cfg(engine, tmp_path, "none")
    cfg.baselines = ()
    res = profile(cfg)
    assert list(res["variants"]) == ["quantized", "fp32"]
    assert res["baselines"] == {} and res["skipped"] == {} and count_quantize == []
    assert res["variants"]["quantized"]["speed_vs_fp32_p50"] > 0


def test_baselines_pick_one(engine, tmp_path, count_quantize):
    cfg = _cfg(engine, tmp_path, "eager")
    cfg.baselines = ("eager",)
    res = profile(cfg)
    assert list(res["variants"]) == ["quantized", "fp32", "torch_eager_fp32"]
    assert count_quantize == []


def test_an_unknown_baseline_is_one_clear_error(engine):
    from edge_sr.errors import EdgeSRError

    with pytest.raises(EdgeSRError, match="--baselines: expected some of quantize_static, eager"):
        ProfileConfig(engine=engine, baselines=("static",))


def test_cli_baselines_option(engine, tmp_path, count_quantize):
    from click.testing import CliRunner

    from edge_sr.cli import main

    out = tmp_path / "cli.json"
    r = CliRunner().invoke(main, ["profile", "--engine", str(engine), "--input-size", "40x24",
                                  "--runs", "1", "--compare", "--baselines", "none",
                                  "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert set(json.loads(out.read_text())["variants"]) == {"quantized", "fp32"}
    for args in (["--compare", "--baselines", "static,eager"], ["--baselines", "none"],
                 ["--compare", "--baselines", ","], ["--compare", "--baselines", "none,eager"]):
        r = CliRunner().invoke(main, ["profile", "--engine", str(engine), *args])
        assert r.exit_code == 2, (args, r.output)
        assert "--baselines:" in r.output and "Traceback" not in r.output


def test_parse_baselines():
    from edge_sr.errors import EdgeSRError
    from runtime.profile import BASELINES, parse_baselines

    assert parse_baselines("ALL") == BASELINES and parse_baselines(" none ") == ()
    assert parse_baselines("Eager, eager") == ("eager",)
    assert parse_baselines("eager,quantize_static") == ("eager", "quantize_static")
    for bad in ("", ",", "eager,", "all,eager", "foo"):
        with pytest.raises(EdgeSRError, match="--baselines: expected all, none"):
            parse_baselines(bad)


def test_default_json_is_named_after_the_engine_folder(engine, tmp_path, monkeypatch):
    """A copied engine keeps its manifest's name; its default JSON follows the folder, so two
    copies do not write one file."""
    import shutil

    copy = tmp_path / "camera_copy"
    shutil.copytree(engine, copy)
    monkeypatch.chdir(tmp_path)
    res = profile(ProfileConfig(engine=copy, input_size=(24, 40), runs=1, warmup=0))
    assert res["json"] == str(Path("results/profile") / "camera_copy_40x24.json")
    assert (tmp_path / res["json"]).is_file() and (tmp_path / res["plot"]).is_file()
    assert res["engine_name"] == "tiny"  # the manifest's name, still in the record
