"""``edge-sr upscale`` (images, folders, videos, streams) and ``edge-sr profile`` on a tiny engine.

The engine here is written by hand (a tiny random SwinIR-light exported at 16x16, FP graphs as
both model.onnx and model_fp32.onnx), so these tests do not depend on calibration.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edge_sr.errors import EdgeSRError, MissingDependencyError
from runtime.upscale import UpscaleConfig, upscale


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A real engine: a tiny random SwinIR-light exported at 16x16."""
    from conftest import make_tiny_engine

    return make_tiny_engine(tmp_path_factory.mktemp("engine") / "tiny")


def _png(path, h, w, seed=0):
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _video(path, n, h=20, w=24, fourcc="MJPG", noise=False):
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5, (w, h))
    assert wr.isOpened()
    rng = np.random.default_rng(0)
    for i in range(n):
        wr.write(rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if noise
                 else np.full((h, w, 3), 20 * i, np.uint8))
    wr.release()
    return path


def _frames(path):
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(f)
    cap.release()
    return out


def _cfg(engine, out, *inputs, **kw):
    return UpscaleConfig(engine=engine, inputs=[str(i) for i in inputs], output=out, threads=1,
                         **kw)


def test_images_and_folders(engine, tmp_path, capsys, caplog, monkeypatch):
    from edge_sr.data import load_image
    from runtime.predictors import engine_predictor
    from runtime.upscale import upscale_frame

    monkeypatch.delenv("EDGE_SR_PROGRESS", raising=False)
    monkeypatch.delenv("EDGE_SR_QUIET", raising=False)
    src = tmp_path / "in"
    src.mkdir()
    a = _png(src / "a.png", 19, 23, 1)
    _png(src / "b.jpg", 8, 40, 2)
    (src / "notes.txt").write_text("a user's notes")  # skipped with a warning
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        rep = upscale(_cfg(engine, tmp_path / "out", src))
    assert sorted(p.name for p in rep.outputs) == ["a.png", "b.png"] and rep.frames == 2
    assert "skipping 1 file that is not an image by suffix: notes.txt" in caplog.text
    # stderr is not a terminal here: no progress bar lines in it (a redirected log)
    assert "img" not in capsys.readouterr().err
    sr = load_image(tmp_path / "out" / "a.png")
    assert sr.shape == (38, 46, 3)
    np.testing.assert_array_equal(sr, upscale_frame(engine_predictor(engine, threads=1), a))
    # one image to a file name
    rep = upscale(_cfg(engine, tmp_path / "single.png", src / "a.png"))
    assert rep.outputs == [tmp_path / "single.png"]
    np.testing.assert_array_equal(load_image(tmp_path / "single.png"), sr)


def test_existing_output_needs_force(engine, tmp_path):
    _png(tmp_path / "a.png", 16, 16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"keep me")
    with pytest.raises(EdgeSRError, match="already exists; pass --force"):
        upscale(_cfg(engine, out, tmp_path / "a.png"))
    assert (out / "a.png").read_bytes() == b"keep me"
    upscale(_cfg(engine, out, tmp_path / "a.png", force=True))
    assert (out / "a.png").read_bytes() != b"keep me"


def test_unreadable_image_writes_nothing(engine, tmp_path):
    _png(tmp_path / "good.png", 16, 16)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    with pytest.raises(EdgeSRError, match="bad.png: expected a readable image.*nothing was "
                                          "written.*fix or remove that file"):
        upscale(_cfg(engine, out, tmp_path / "good.png", tmp_path / "bad.png"))
    assert not out.exists() or not list(out.iterdir())
    with pytest.raises(EdgeSRError, match="no such file"):
        upscale(_cfg(engine, out, tmp_path / "missing.png"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EdgeSRError, match="expected an image"):
        upscale(_cfg(engine, out, tmp_path / "notes.txt"))


def test_engine_errors(engine, tmp_path):
    _png(tmp_path / "a.png", 16, 16)
    with pytest.raises(EdgeSRError, match="x2 engine"):
        upscale(_cfg(engine, tmp_path / "o", tmp_path / "a.png", scale=4))
    with pytest.raises(EdgeSRError, match="no such directory"):
        upscale(_cfg(tmp_path / "nope", tmp_path / "o", tmp_path / "a.png"))


def test_video_frame_by_frame(engine, tmp_path):
    src = _video(tmp_path / "clip.avi", 4)
    rep = upscale(_cfg(engine, tmp_path / "out", src))
    frames = _frames(tmp_path / "out" / "clip.mp4")
    assert rep.frames == 4 and len(frames) == 4 and frames[0].shape == (40, 48, 3)
    assert not rep.warnings
    # each output frame is the engine's SR of the decoded input frame; mp4v is lossy and the
    # tiny random model's output is noise-like, so compare channel means (a BGR/RGB swap would
    # move them by ~100 grey levels here)
    from runtime.predictors import engine_predictor
    from runtime.upscale import upscale_frame

    pred = engine_predictor(engine, threads=1)
    for lr, out in zip(_frames(src), frames):
        want = upscale_frame(pred, lr[:, :, ::-1])[:, :, ::-1].astype(float)
        out = out.astype(float)
        assert np.abs(out.mean((0, 1)) - want.mean((0, 1))).max() < 12  # channel order kept


def test_one_video_to_a_file_name_and_file_names_that_cannot_hold_the_outputs(engine, tmp_path):
    """One video with a video file name writes that file; a file-like -o that cannot hold what
    the run writes (an image name for a video, several inputs) is one error, not a folder of that
    name."""
    src = _video(tmp_path / "clip.avi", 2)
    rep = upscale(_cfg(engine, tmp_path / "up.mp4", src))
    assert rep.outputs == [tmp_path / "up.mp4"] and (tmp_path / "up.mp4").is_file()
    assert len(_frames(tmp_path / "up.mp4")) == 2
    with pytest.raises(EdgeSRError, match=r"-o .*x\.jpg: names a file, but this run writes a "
                                          r"video"):
        upscale(_cfg(engine, tmp_path / "x.jpg", src))
    _png(tmp_path / "a.png", 16, 20)
    with pytest.raises(EdgeSRError, match="names a file, but this run writes 2 outputs"):
        upscale(_cfg(engine, tmp_path / "both.png", tmp_path / "a.png", src))
    assert not (tmp_path / "x.jpg").exists() and not (tmp_path / "both.png").exists()


def test_video_that_ends_early(engine, tmp_path):
    src = _video(tmp_path / "cut.avi", 12, noise=True)  # noise: frames dominate the file size
    data = src.read_bytes()
    src.write_bytes(data[: int(len(data) * 0.6)])  # the header still announces 12 frames
    rep = upscale(_cfg(engine, tmp_path / "out", src))
    n = len(_frames(tmp_path / "out" / "cut.mp4"))
    assert 0 < rep.frames < 12 and n == rep.frames
    assert rep.warnings and "ended early" in rep.warnings[0]
    empty = tmp_path / "empty.avi"
    empty.write_bytes(data[:64])
    with pytest.raises(EdgeSRError, match="empty.avi"):
        upscale(_cfg(engine, tmp_path / "out2", empty))
    assert not (tmp_path / "out2" / "empty.mp4").exists()


def test_stream_source(engine, tmp_path):
    """The camera/stream path, fed a synthetic video file through --source."""
    src = _video(tmp_path / "cam.avi", 6)
    rep = upscale(UpscaleConfig(engine=engine, source=str(src), output=tmp_path / "rec",
                                max_frames=3, threads=1))
    assert rep.outputs == [tmp_path / "rec" / "stream.mp4"] and rep.frames == 3
    assert len(_frames(rep.outputs[0])) == 3
    if "GStreamer:                   YES" not in cv2.getBuildInformation():
        with pytest.raises(MissingDependencyError, match="without GStreamer"):
            upscale(UpscaleConfig(engine=engine, source="videotestsrc ! appsink",
                                  output=tmp_path / "gst"))
    with pytest.raises(EdgeSRError, match="could not open"):
        upscale(UpscaleConfig(engine=engine, source=str(tmp_path / "nocam.avi"),
                              output=tmp_path / "x"))


def test_cli_upscale(engine, tmp_path):
    from click.testing import CliRunner

    from edge_sr.cli import main

    _png(tmp_path / "a.png", 16, 20)
    args = ["upscale", "--engine", str(engine), str(tmp_path / "a.png"), "-o",
            str(tmp_path / "o"), "--threads", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "a.png").is_file()
    assert f"wrote {tmp_path / 'o' / 'a.png'}" in r.output and "1 frame(s)" in r.output
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "already exists" in r.output
    # --quiet: warnings and errors only, so nothing on a clean run
    r = CliRunner().invoke(main, args + ["--force", "-q"])
    assert r.exit_code == 0 and r.output == "", r.output


def test_profile_compare_json_plot(engine, tmp_path):
    from click.testing import CliRunner

    from edge_sr.cli import main

    js = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["profile", "--engine", str(engine), "--input-size", "40x24",
                                  "--runs", "3", "--warmup", "1", "--compare", "--threads", "1",
                                  "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["input_size"] == {"width": 40, "height": 24}
    assert res["output_size"] == {"width": 80, "height": 48}
    assert res["tiles_per_frame"] == 2 * 3
    for k in ("quantized", "fp32"):
        v = res["variants"][k]
        assert v["runs"] == 3 and len(v["latencies_ms"]) == 3
        assert 0 < v["p50_ms"] <= v["p90_ms"] <= v["p99_ms"]
        mem = v["memory"]  # a real reading: the process holds torch and ORT, so > 50 MiB
        assert (mem["process_peak_rss_mib"] > 50
                and mem["peak_rss_increase_mib"] <= mem["process_peak_rss_mib"])
        assert mem["method"].startswith(("peak RSS", "ru_maxrss"))
    assert res["ratio_fp32_over_quantized_p50"] > 0
    q = res["variants"]["quantized"]
    assert q["fps"] == pytest.approx(1000.0 / q["p50_ms"])  # the same median as every ratio
    assert q["speed_vs_fp32_rounds"]["q25"] <= q["speed_vs_fp32_rounds"]["q75"]
    row = r.output.split("p50 ms")[1].splitlines()[1].split()  # quantized precision runs p50 ...
    assert row[2] == "3" and row[4:6] == ["-", "-"]  # no p90 / p99 printed from 3 runs
    png = js.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p50 ms" in r.output and "FP32 / quantized" in r.output


def test_speed_verdict_says_too_close_to_call_when_the_rounds_disagree():
    from runtime.profile import round_ratios, speed_verdict

    clear = round_ratios([1.2, 1.1, 1.3, 1.2], [1.0, 1.0, 1.0, 1.0])
    assert clear["clear"] and speed_verdict(1.2, clear) == "quantized faster"
    close = round_ratios([1.0, 1.2, 0.9, 1.1], [1.05, 1.0, 1.0, 1.05])
    assert not close["clear"] and speed_verdict(1.02, close).startswith("quantized about as fast")
    slow = round_ratios([0.8, 0.9, 0.85], [1.0, 1.0, 1.0])
    assert speed_verdict(0.85, slow) == "quantized slower"


def test_dynamic_engine_upscales_two_sizes_whole(tmp_path):
    """A dynamic engine (``build --dynamic``): images of two sizes, each in one call (padded to the
    window, cropped back), equal to the model run on the whole image."""
    import torch
    from conftest import make_tiny_engine, make_tiny_swinir
    from PIL import Image

    eng = make_tiny_engine(tmp_path / "dyn", dynamic=True)
    model = make_tiny_swinir(2)
    for h, w in [(16, 24), (20, 36)]:
        rgb = _png(tmp_path / f"in_{h}x{w}.png", h, w, seed=h)
        upscale(UpscaleConfig(engine=eng, inputs=[str(tmp_path / f"in_{h}x{w}.png")],
                              output=tmp_path / f"out_{h}x{w}.png", threads=1))
        out = np.asarray(Image.open(tmp_path / f"out_{h}x{w}.png"))
        with torch.no_grad():
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
            ref = (model(x).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
        assert out.shape == (2 * h, 2 * w, 3)
        assert np.abs(out.astype(np.int16) - ref.astype(np.int16)).max() <= 1


def test_an_unknown_suffix_is_a_folder_with_a_warning(tmp_path, caplog):
    """``-o out/rgba.xyz`` for one image: a folder of that name, said in a warning that names
    the file it will hold (a mistyped file name would otherwise go unnoticed)."""
    import logging

    from runtime.upscale import plan_jobs

    _png(tmp_path / "a.png", 16, 20)
    with caplog.at_level(logging.WARNING, logger="runtime.upscale"):
        jobs = plan_jobs(UpscaleConfig(engine="unused", inputs=[str(tmp_path / "a.png")],
                                       output=str(tmp_path / "rgba.xyz")))
    assert [j.dst for j in jobs] == [tmp_path / "rgba.xyz" / "a.png"]
    assert any("taken as a folder" in r.getMessage() and "rgba.xyz/a.png" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.upscale"):
        plan_jobs(UpscaleConfig(engine="unused", inputs=[str(tmp_path / "a.png")],
                                output=str(tmp_path / "plain")))
    assert not caplog.records
