"""``edge-sr build`` end to end on a tiny random SwinIR-light, plus engine-directory validation.

The calibration stage is swapped for a DOBI-only calibration (H3's real ``dobi.init_bounds``, a
few seconds) so the pipeline is tested without DQC's minutes; ``test_real_calibration_api``
runs the real ``calibrate.api`` when it is available.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

import runtime.build as rb
import runtime.calib_cache as cc
from edge_sr.errors import EdgeSRError
from runtime.engine import MANIFEST, MODEL_FILE, open_engine

pytestmark = pytest.mark.usefixtures("data_root")  # validation reads held-out BSD200 images

# The module-scoped ``env`` fixture swaps ``cc.run_calibration`` for a fast one while it lives;
# tests of the real function call it through this name.
REAL_RUN_CALIBRATION = cc.run_calibration


def _fast_calibration(calls):
    from calibrate.dobi import init_bounds
    from calibrate.prepare import QuantRecipe, prepare

    def run_calibration(lm, cfg, output):
        calls.append(cfg.bits)
        grid = cfg.resolved_grid()
        student = prepare(lm.model, QuantRecipe(bits=cfg.bits, grid=grid))
        init_bounds(student, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        torch.save({"bits": cfg.bits, "grid": grid, "state": student.state_dict()}, output)
        return output

    def load_student(path, lm):
        obj = torch.load(path)
        student = prepare(lm.model, QuantRecipe(bits=obj["bits"], grid=obj["grid"]))
        student.load_state_dict(obj["state"])
        return student.eval()

    return run_calibration, load_student


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from conftest import make_tiny_swinir

    d = tmp_path_factory.mktemp("build")
    ckpt = d / "tiny_x2.pth"
    torch.save({"params": make_tiny_swinir(2).state_dict()}, ckpt)
    calls: list[int] = []
    run_cal, load_student = _fast_calibration(calls)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cc, "run_calibration", run_cal)
        mp.setattr(rb, "load_student", load_student)

        def cfg(**kw):
            base = dict(bits=4, scale=2, model=str(ckpt), tile=(32, 32), out=d / "eng",
                        cache_dir=d / "cache", threads=1, val_images=2, val_crop=40)
            return rb.BuildConfig(**(base | kw))

        res = rb.build(cfg())
        yield {"dir": d, "cfg": cfg, "res": res, "calls": calls, "mp": mp}


def test_build_writes_engine_and_manifest(env):
    res = env["res"]
    out = env["dir"] / "eng"
    assert res.path == out and {p.name for p in out.iterdir()} == {
        MANIFEST, MODEL_FILE, "model_fp32.onnx"}
    m = json.loads((out / MANIFEST).read_text())
    assert m["scale"] == 2 and m["bits"] == 4 and m["backend"] == "onnxruntime"
    assert m["tile"] == [32, 32] and m["overlap"] == 8 and m["precision"] == "w4a4-qdq"
    assert m["model"]["arch"] == "swinir-light" and len(m["model"]["sha256"]) == 64
    assert len(m["calibration"]["sha256"]) == 64 and m["calibration"]["cached"] is False
    assert set(m["stage_seconds"]) == {"checkpoint", "calibrate", "export", "build", "validate",
                                       "speed"}
    # the quick speed check: the engine against its FP32 graph, interleaved, on one tile
    sp = m["speed"]
    assert sp["runs"] == 5 and sp["input_hw"] == [32, 32] and sp["threads"] == 1 and sp["cpu"]
    assert sp["engine_ms"] > 0 and sp["fp32_ms"] > 0
    assert sp["speed_vs_fp32"] == pytest.approx(sp["fp32_ms"] / sp["engine_ms"], rel=1e-2)
    assert "onnxruntime" in m["versions"] and m["created"]
    v = m["validation"]
    assert len(v["per_image"]) == 2 and "BSD200" in v["images"]
    # The QDQ engine reproduces the fake-quant model through the same tiles (export is exact
    # to float noise: a few pixels may differ by one grey level after rounding).
    assert v["fidelity_psnr_y_db"] > 60
    assert all(r["max_abs_diff_vs_fake_quant"] <= 2 for r in v["per_image"])
    # no hidden staging directories are left beside the engine
    assert not [p for p in env["dir"].iterdir() if p.name.startswith(".eng")]
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def test_speed_check_can_be_skipped(env):
    from click.testing import CliRunner

    from edge_sr.cli import main

    res = rb.build(env["cfg"](speed_runs=0, out=env["dir"] / "nospeed"))
    m = json.loads((res.path / MANIFEST).read_text())
    assert m["speed"] is None and "speed" not in m["stage_seconds"]
    shutil.rmtree(res.path)
    with pytest.raises(EdgeSRError, match="--speed-runs: expected a number of calls >= 0"):
        env["cfg"](speed_runs=-1)
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--speed-runs", "0",
                                  "--print-config"])
    assert r.exit_code == 0 and json.loads(r.output)["speed_runs"] == 0


def test_speed_check_warns_when_the_engine_is_the_slower(env, caplog, monkeypatch):
    """A ratio under 1 is a warning naming the profile command; over 1 it is not."""
    def fake(ratio):
        return lambda eng, runs, threads: {
            "engine_ms": 10.0, "fp32_ms": 10.0 * ratio, "speed_vs_fp32": ratio,
            "input_hw": [32, 32], "runs": runs, "threads": threads, "runtime": "onnxruntime",
            "device": "CPU (test)", "cpu": "test"}

    for ratio, warned in ((0.8, True), (1.25, False)):
        caplog.clear()
        monkeypatch.setattr(rb, "speed_check", fake(ratio))
        res = rb.build(env["cfg"](out=env["dir"] / "speedwarn", force=True))
        assert res.manifest.speed["speed_vs_fp32"] == ratio
        slower = [r for r in caplog.records if r.levelname == "WARNING"
                  and "slower than its FP32 graph" in r.getMessage()]
        assert bool(slower) == warned
        if warned:
            assert "edge-sr profile --engine" in slower[0].getMessage()
    shutil.rmtree(env["dir"] / "speedwarn")


def test_w8a8_frame_engine_on_the_ort_grid(env):
    """--bits 8 --grid ort --input-size WxH: one frame-shaped engine of fused integer linears
    that stays exact to its fake-quant model."""
    import onnx

    res = rb.build(env["cfg"](bits=8, grid="ort", input_size=(36, 20), tile=None,
                              out=env["dir"] / "w8"))
    m = json.loads((res.path / MANIFEST).read_text())
    assert m["bits"] == 8 and m["tile"] == [24, 40]  # 20x36 (HxW) padded to the window (8)
    assert m["build_config"]["tile"] == [24, 40] and "tile_fitted" not in m["build_config"]
    # profile's default frame is the one the engine was built for: one call, no tiles
    from runtime.profile import ProfileConfig, profile

    r = profile(ProfileConfig(engine=res.path, runs=1, warmup=0, max_seconds=None,
                              json_path=env["dir"] / "w8.json"))
    assert r["input_size"] == {"width": 36, "height": 20} and r["tiles_per_frame"] == 1
    ops = {n.op_type for n in onnx.load(str(res.path / MODEL_FILE)).graph.node}
    assert "MatMulIntegerToFloat" in ops and "ReduceSum" not in ops
    assert m["validation"]["fidelity_psnr_y_db"] > 60
    from edge_sr.models.base import SizeRequirements

    assert SizeRequirements(multiple=8, minimum=64).fit(180, 320) == (184, 320)
    assert SizeRequirements(multiple=8, minimum=64).fit(20, 36) == (64, 64)
    shutil.rmtree(res.path)


def test_dynamic_engine_runs_any_size_whole(env, tmp_path, capfd):
    """--dynamic: one engine (symbolic height and width) upscales any size in one padded call,
    like its fake-quant model on the whole image; upscale and profile run it untiled."""
    import numpy as np
    import onnxruntime as ort

    from edge_sr.checkpoints import load_model
    from runtime.engine import FP32_FILE
    from runtime.predictors import engine_predictor
    from runtime.profile import ProfileConfig, profile, table

    n = len(env["calls"])
    capfd.readouterr()
    res = rb.build(env["cfg"](tile=None, dynamic=True, out=env["dir"] / "dyn"))
    assert len(env["calls"]) == n  # the fixed-shape build's calibration, reused
    # the traced linears carry their type: the exporter has no shape to warn about
    assert "shape inference of edge_sr::QLinear" not in capfd.readouterr().err
    m = res.manifest
    assert m.dynamic and m.tile == [64, 64] and m.overlap == 0
    assert m.size_requirements == {"multiple": 8, "minimum": 8}
    assert json.loads((res.path / MANIFEST).read_text())["dynamic"] is True
    for f in (MODEL_FILE, FP32_FILE):
        shape = ort.InferenceSession(str(res.path / f)).get_inputs()[0].shape
        assert shape[2:] == ["h", "w"], f
    assert m.validation["fidelity_psnr_y_db"] > 60

    lm = load_model(str(env["dir"] / "tiny_x2.pth"), scale=2)
    student = rb.load_student(env["dir"] / "cache" / m.calibration["file"], lm)
    pred = engine_predictor(res.path, threads=1)
    assert pred.backend.tile is None
    calls = []
    run = pred.backend.run
    pred.backend.run = lambda t: calls.append(t.shape) or run(t)
    for hw in [(16, 24), (20, 36)]:
        x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(hw[1]))
        with torch.no_grad():
            ref = student(x).numpy()
        out = pred(x).numpy()
        assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-3, hw
    assert calls == [(1, 3, 16, 24), (1, 3, 24, 40)]  # one call each, padded to the window only
    pred.close()

    r = profile(ProfileConfig(engine=res.path, input_size=(20, 36), runs=1, max_seconds=None,
                              threads=1, json_path=tmp_path / "p.json"))
    assert r["dynamic"] is True and r["tiles_per_frame"] == 1
    assert "one call of the whole frame (dynamic engine)" in table(r)
    shutil.rmtree(res.path)


@pytest.mark.parametrize("bits", [1, 5, 6, 7, 9])
def test_engine_widths_are_2_3_4_or_8(bits):
    with pytest.raises(EdgeSRError, match=f"--bits: expected 2, 3, 4 or 8 for an engine, got "
                                          f"{bits} "):
        rb.BuildConfig(bits=bits, scale=2)


def test_dynamic_build_errors(env, monkeypatch):
    from click.testing import CliRunner

    from edge_sr.cli import main
    from edge_sr.models.swinir import SwinIRLight

    with pytest.raises(EdgeSRError, match="--tile: a --dynamic engine takes any input size"):
        rb.BuildConfig(bits=4, scale=2, dynamic=True, tile=(64, 64))
    with pytest.raises(EdgeSRError, match="--input-size: a --dynamic engine"):
        rb.BuildConfig(bits=4, scale=2, dynamic=True, input_size=(320, 180))
    with pytest.raises(EdgeSRError, match="--batch: a --dynamic engine runs one whole image"):
        rb.BuildConfig(bits=4, scale=2, dynamic=True, batch=2)
    with pytest.raises(EdgeSRError, match="--dynamic: expected --backend ort; TensorRT"):
        rb.BuildConfig(bits=4, scale=2, dynamic=True, backend="trt")
    with pytest.raises(EdgeSRError, match="--dynamic: expected the attention products in"):
        rb.BuildConfig(bits=4, scale=2, dynamic=True, grid="real", fp_sites=())
    assert rb.BuildConfig(bits=4, scale=2, dynamic=True, grid="real").dynamic  # qk, pv FP
    # a model whose padding needs fixed sizes (as NGswin): refused before any calibration
    n = len(env["calls"])
    monkeypatch.setattr(SwinIRLight, "dynamic_export", False)
    with pytest.raises(EdgeSRError, match="--dynamic: swinir-light has no dynamic-shape export"):
        rb.build(env["cfg"](tile=None, dynamic=True, out=env["dir"] / "dyn_bad"))
    assert len(env["calls"]) == n and not (env["dir"] / "dyn_bad").exists()
    # the CLI: one line, exit 2
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--dynamic", "--tile",
                                  "64", "--print-config"])
    assert r.exit_code == 2 and "--tile: a --dynamic engine" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--dynamic",
                                  "--print-config"])
    assert r.exit_code == 0 and json.loads(r.output)["dynamic"] is True


def test_manifest_without_dynamic_field_still_opens(env, tmp_path):
    """Manifests written before ``dynamic`` / ``size_requirements`` read as fixed-shape engines."""
    old = tmp_path / "old"
    shutil.copytree(env["dir"] / "eng", old)
    d = json.loads((old / MANIFEST).read_text())
    for k in ("dynamic", "size_requirements"):
        d.pop(k, None)
    (old / MANIFEST).write_text(json.dumps(d))
    eng = open_engine(old)
    assert eng.manifest.dynamic is False and eng.manifest.size_requirements is None
    assert eng.backend(threads=1).tile == (32, 32)
    d["dynamic"] = "yes"
    (old / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(EdgeSRError, match="expected dynamic as true or false"):
        open_engine(old)


def test_calibration_is_cached(env):
    n = len(env["calls"])
    res = rb.build(env["cfg"](out=env["dir"] / "eng2", backend="ort"))
    assert len(env["calls"]) == n  # no new calibration
    assert res.manifest.calibration["cached"] is True
    assert res.manifest.calibration["sha256"] == env["res"].manifest.calibration["sha256"]
    shutil.rmtree(res.path)


def test_existing_out_needs_force(env):
    out = env["dir"] / "eng"
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(EdgeSRError, match="already exists; pass --force"):
        rb.build(env["cfg"]())
    assert (out / MANIFEST).read_bytes() == before


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_leaves_nothing(env, monkeypatch, how):
    import signal

    out = env["dir"] / "eng_interrupted"

    def boom(student, lm, cfg, backend, work):
        (work / MODEL_FILE).write_bytes(b"half an export")
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # turned into KeyboardInterrupt by build()
        raise KeyboardInterrupt

    monkeypatch.setattr(rb, "stage_export", boom)
    with pytest.raises(KeyboardInterrupt):
        rb.build(env["cfg"](out=out))
    assert not out.exists()
    assert not [p for p in env["dir"].iterdir() if p.name.startswith(".eng_interrupted")]


def test_force_replaces_only_after_success(env, monkeypatch):
    out = env["dir"] / "eng"
    before = (out / MANIFEST).read_bytes()

    def fail(student, lm, cfg, backend, work):
        (work / MODEL_FILE).write_bytes(b"half an export")
        raise EdgeSRError("export failed on purpose")

    monkeypatch.setattr(rb, "stage_export", fail)
    with pytest.raises(EdgeSRError, match="on purpose"):
        rb.build(env["cfg"](force=True))
    assert (out / MANIFEST).read_bytes() == before  # the old engine is intact


def test_build_config_errors(env):
    with pytest.raises(EdgeSRError, match="--backend"):
        rb.BuildConfig(bits=4, scale=2, backend="cuda")
    with pytest.raises(EdgeSRError, match="--scale"):
        rb.BuildConfig(bits=4, scale=5)
    with pytest.raises(EdgeSRError, match="--tile: tile 30x30 is not a multiple of 8"):
        rb.build(env["cfg"](tile=(30, 30), out=env["dir"] / "eng_badtile"))
    with pytest.raises(EdgeSRError, match="x2"):  # an x2 checkpoint asked for x3
        rb.build(env["cfg"](scale=3, out=env["dir"] / "eng_x3"))
    assert rb.resolve_backend("ort") == "onnxruntime"
    if not torch.cuda.is_available():
        assert rb.resolve_backend("auto") == "onnxruntime"
    assert rb.BuildConfig(bits=4, scale=3).out_dir().as_posix() == \
        "engines/swinir-light-x3-ref-w4a4"
    with pytest.raises(EdgeSRError, match="--wide-inputs: unknown linear roles \\['mlp'\\]"):
        rb.BuildConfig(bits=4, scale=2, wide_inputs=("mlp",))
    with pytest.raises(EdgeSRError, match="--rotate: unknown linear roles \\['bogus'\\]"):
        rb.BuildConfig(bits=4, scale=2, rotate=("qkv", "bogus"))
    with pytest.raises(EdgeSRError, match="--avg-bits"):
        rb.BuildConfig(bits=4, scale=2, avg_bits=3.0)
    # the 8-bit-input option is its own calibration; the default keeps the old cache key
    base, wide = rb.BuildConfig(bits=4, scale=2), rb.BuildConfig(bits=4, scale=2,
                                                                 wide_inputs=["fc1"])
    assert wide.wide_inputs == ("fc1",)
    assert cc.calibration_key("0" * 64, base) != cc.calibration_key("0" * 64, wide)


def test_open_engine_validation(env):
    src = env["dir"] / "eng"
    eng = open_engine(src, scale=2)
    assert eng.manifest.scale == 2 and eng.file("model") == src / MODEL_FILE
    with pytest.raises(EdgeSRError, match="x2 engine.*manifest.json says scale 2"):
        open_engine(src, scale=3)
    with pytest.raises(EdgeSRError, match="no such directory"):
        open_engine(env["dir"] / "missing")
    bad = env["dir"] / "eng_bad"
    shutil.copytree(src, bad)
    (bad / MODEL_FILE).write_bytes((bad / MODEL_FILE).read_bytes()[:-10])
    with pytest.raises(EdgeSRError, match="does not match the SHA-256"):
        open_engine(bad)
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(EdgeSRError, match="expected valid JSON"):
        open_engine(bad)
    (bad / MANIFEST).write_text(json.dumps({"name": "x"}))
    with pytest.raises(EdgeSRError, match="expected the keys"):
        open_engine(bad)
    os.remove(bad / MANIFEST)
    with pytest.raises(EdgeSRError, match="expected manifest.json"):
        open_engine(bad)


def test_cli_print_config_and_errors(env):
    from click.testing import CliRunner

    from edge_sr.cli import main

    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--print-config"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.output)
    assert cfg["model"] == "swinir-light-x2-ref" and cfg["out"] == "engines/swinir-light-x2-ref-w4a4"
    assert cfg["cache_dir"].endswith("calibrations")  # resolved, not null
    assert cfg["tile"] == [192, 192] and cfg["budget"] == "cpu" and cfg["wide_inputs"] == []
    # the default grid is the backend's native one: ORT here (no TensorRT, no GPU)
    assert cfg["grid"] == "auto" and rb.BuildConfig(bits=4, scale=2).resolved_grid() == "ort"
    # ... and --print-config says what "auto" and the method's defaults become here
    res = cfg["resolved"]
    assert (res["backend"], res["grid"], res["fp_sites"]) == ("onnxruntime", "ort", ["qk", "pv"])
    assert res["rotate"] == ["auto"] and res["weight_grid"] == "channel" and res["smooth"] == 0.65
    assert rb.BuildConfig(bits=4, scale=2, backend="trt").resolved_grid() == "trt"
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--wide-inputs",
                                  "fc1,qkv", "--print-config"])
    assert json.loads(r.output)["wide_inputs"] == ["fc1", "qkv"]
    r = CliRunner().invoke(main, ["build", "--bits", "8", "--scale", "2", "--grid", "ort",
                                  "--input-size", "320x180", "--shared-qkv-input",
                                  "--print-config"])
    cfg = json.loads(r.output)
    assert (cfg["bits"], cfg["grid"], cfg["input_size"], cfg["shared_qkv_input"]) == (
        8, "ort", [320, 180], True)
    # the engine's shape is the frame padded to the model's window, known once the model loads,
    # not the default tile
    assert cfg["tile"] == "input_size, padded to the model's window at build"
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--input-size",
                                  "320x180", "--tile", "64", "--print-config"])
    assert r.exit_code == 2 and "give one of --tile and --input-size" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--grid", "int"])
    assert r.exit_code == 2 and "--grid" in r.output
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--out",
                                  str(env["dir"] / "eng")])
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "-o", "x/eng",
                                  "--print-config"])  # -o as in calibrate, export and upscale
    assert r.exit_code == 0 and json.loads(r.output)["out"] == "x/eng"


@pytest.mark.slow
def test_real_calibration_api(tmp_path, env, caplog):
    """With the real calibrate.api: DOBI + 2 DQC iterations on the tiny model (an ImportError
    in calibrate is a failure here, not a skip)."""
    import calibrate.api  # noqa: F401
    import calibrate.calibfile  # noqa: F401

    env["mp"].undo()
    caplog.set_level(logging.INFO, logger="calibrate.api")
    try:
        res = rb.build(env["cfg"](out=tmp_path / "eng_real", cache_dir=tmp_path / "cache",
                                  calib_iterations=2))
    finally:
        run_cal, load_student = _fast_calibration(env["calls"])
        env["mp"].setattr(cc, "run_calibration", run_cal)
        env["mp"].setattr(rb, "load_student", load_student)
    assert res.manifest.validation["fidelity_psnr_y_db"] > 40
    # the manifest records what was calibrated: build's default method is edge-sr
    recipe = res.manifest.calibration["quant_recipe"]
    # (the rotation sites are chosen per site by measurement: on the tiny model, possibly none)
    assert recipe["weight_grid"] == "channel" and isinstance(recipe["rotate"], list)
    assert recipe["smooth"] == 0.65
    # ONNX Runtime's measured defaults: attention products FP; at 4 bits the weights kept out of
    # W4A4 are weight-only grids, INT4 where held-out data says it costs nothing, else INT8
    assert recipe["fp_sites"] == ["qk", "pv"] and recipe["fp_weights"] == "auto"
    assert isinstance(recipe["kept_int4"], list)
    # the calibration wrote straight to its cache file (atomically), and its log names that
    # file, not a temporary one; nothing else is left beside it
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(cached) == 1 and cached[0].suffix == ".pt", cached
    wrote = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote ")]
    assert len(wrote) == 1 and wrote[0].startswith(f"wrote {cached[0]} "), wrote


def test_eval_scores_an_engine_directory(env, tmp_path):
    """``edge-sr eval --engine D``: the engine as upscale runs it (tiled), on a benchmark set;
    with another source as well it is one error line."""
    from click.testing import CliRunner

    from edge_sr.cli import main
    from tests.test_eval import _toy_set

    toy = _toy_set(tmp_path)
    eng = env["dir"] / "eng"
    r = CliRunner().invoke(main, ["eval", "--engine", str(eng), "--datasets", str(toy),
                                  "--json", str(tmp_path / "e.json"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    js = json.loads((tmp_path / "e.json").read_text())
    assert 10 < js["datasets"]["Toy"]["psnr"] < 60
    r = CliRunner().invoke(main, ["eval", "--engine", str(eng), "--onnx", "x.onnx",
                                  "--datasets", str(toy)])
    assert r.exit_code == 2 and "--engine: give either" in r.output


def test_build_from_a_given_calibration_file(env, tmp_path, monkeypatch):
    """``build --calibration F``: the engine of ``edge-sr calibrate``'s file (no calibration,
    no cache), with --bits, --scale and --model taken from it; its method is the manifest's, and
    a build asking other bits is one error line."""
    from click.testing import CliRunner

    from calibrate.api import CalibrationConfig, calibrate
    from edge_sr.cli import main

    monkeypatch.setattr(rb, "load_student", cc.load_student)  # the real reader, this test only
    ckpt = env["dir"] / "tiny_x2.pth"
    calib = calibrate(CalibrationConfig(model=str(ckpt), bits=4, output=tmp_path / "c.pt",
                                        method="dobi", grid="ort", calib_patches=2))
    calls = len(env["calls"])
    out = tmp_path / "eng"
    r = CliRunner().invoke(main, ["build", "--calibration", str(calib), "--tile", "32",
                                  "--speed-runs", "0", "--threads", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert len(env["calls"]) == calls  # nothing calibrated
    m = json.loads((out / MANIFEST).read_text())
    assert (m["bits"], m["scale"], m["method"], m["budget"]) == (4, 2, "dobi", "calibration file")
    assert m["calibration"]["given"] is True and m["model"]["path"] == str(ckpt)
    assert m["validation"]["fidelity_psnr_y_db"] > 60  # the engine is the file's student
    r = CliRunner().invoke(main, ["build", "--calibration", str(calib), "--bits", "8",
                                  "--tile", "32", "-o", str(tmp_path / "eng8")])
    assert r.exit_code == 2 and "calibrated at --bits 4, but the build asks for --bits 8" \
        in r.output
    r = CliRunner().invoke(main, ["build", "--calibration", str(tmp_path / "none.pt")])
    assert r.exit_code == 2 and "none.pt" in r.output and len(r.output.strip().splitlines()) == 1


def test_an_interrupted_builds_calibration_is_continued(tmp_path, monkeypatch):
    """The state an interrupted build's calibration left in the cache is resumed by the same
    build; state that cannot be continued is dropped and the calibration starts over."""
    from types import SimpleNamespace

    calls: list[bool] = []

    def fake(cfg, lm=None):
        calls.append(cfg.resume)
        if cfg.resume and fail:
            raise EdgeSRError("--resume: the interrupted run used another recipe")
        return cfg.output

    monkeypatch.setattr(cc, "calibrate", fake)
    lm, cfg, out = SimpleNamespace(path="m.pth"), rb.BuildConfig(bits=4, scale=2), tmp_path / "c.pt"
    fail = False
    REAL_RUN_CALIBRATION(lm, cfg, out)
    state = cc.dqc_state_path(out)
    state.write_bytes(b"state")
    REAL_RUN_CALIBRATION(lm, cfg, out)
    assert calls == [False, True]
    fail = True
    REAL_RUN_CALIBRATION(lm, cfg, out)
    assert calls[2:] == [True, False] and not state.exists()


def test_trt_backend_without_tensorrt_is_refused_before_any_work(tmp_path, monkeypatch):
    import runtime.backends.tensorrt as trt_backend
    from edge_sr.errors import MissingDependencyError

    def absent():
        raise MissingDependencyError("TensorRT is not installed (No module named 'tensorrt')")

    def no_work(cfg):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(trt_backend, "import_tensorrt", absent)
    monkeypatch.setattr(rb, "stage_checkpoint", no_work)
    with pytest.raises(MissingDependencyError, match="--backend trt.*not usable.*--backend ort"):
        rb.build(rb.BuildConfig(bits=4, scale=2, backend="trt", out=tmp_path / "e"))
    assert not (tmp_path / "e").exists()
