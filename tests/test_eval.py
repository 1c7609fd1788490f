"""The evaluate API and ``edge-sr eval``: JSON shape, saved images, error paths, a real checkpoint."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edge_sr.cli import main
from edge_sr.data import bicubic_downscale, bicubic_upscale, load_image
from edge_sr.data.datasets import SRPair
from edge_sr.errors import EdgeSRError
from edge_sr.evaluate import EvalConfig, evaluate, evaluate_pairs
from edge_sr.metrics import psnr_y
from edge_sr.models.swinir import SwinIRLight
from edge_sr.paths import data_root
from runtime.predictors import TorchPredictor, make_predictor

DATA = data_root(required=False)
needs_data = pytest.mark.skipif(DATA is None, reason="shared data folder not found (EDGE_SR_DATA)")


def _tiny(scale=2):
    torch.manual_seed(0)
    return SwinIRLight(scale, embed_dim=12, depths=(2, 2), num_heads=(2, 2)).eval()


def _toy_set(root, name="Toy", n=2, size=(36, 28)):
    rng = np.random.default_rng(0)
    (root / name / "HR").mkdir(parents=True)
    for i in range(n):
        img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / name / "HR" / f"im{i}.png")
    return root / name


def _tiny_ckpt(path, scale=2):
    torch.save({"params": _tiny(scale).state_dict()}, path)
    return path


def test_evaluate_json_and_saved_images(tmp_path):
    toy = _toy_set(tmp_path)
    pred = make_predictor(_tiny())
    res = evaluate(pred, EvalConfig(datasets=[str(toy)], save_images=tmp_path / "out"))
    js = res.to_json()
    assert set(js) == {"model", "scale", "datasets"} and js["scale"] == 2
    assert set(js["datasets"]) == {"Toy"}
    assert set(js["datasets"]["Toy"]) == {"psnr", "ssim", "images"}
    assert js["datasets"]["Toy"]["images"] == 2
    saved = load_image(tmp_path / "out" / "Toy" / "im0.png")
    assert saved.shape == (36, 28, 3)
    # The set score is the mean of per-image scores computed from the saved (rounded) outputs.
    pairs = [SRPair(f"im{i}", bicubic_downscale(load_image(toy / "HR" / f"im{i}.png"), 2),
                    load_image(toy / "HR" / f"im{i}.png")) for i in range(2)]
    direct = np.mean([psnr_y(load_image(tmp_path / "out" / "Toy" / f"{p.name}.png"), p.hr, 2)
                      for p in pairs])
    assert js["datasets"]["Toy"]["psnr"] == pytest.approx(direct, abs=1e-6)
    assert len(res.per_image()) == 2 and "Toy" in res.table()


def test_scale_mismatch_and_bad_predictor(tmp_path):
    toy = _toy_set(tmp_path)
    with pytest.raises(EdgeSRError, match="--scale 3"):
        make_predictor(_tiny(2), scale=3)
    with pytest.raises(EdgeSRError, match="--scale 3"):
        evaluate(make_predictor(_tiny(2)), EvalConfig(datasets=[str(toy)], scale=3))

    class Wrong:
        scale, name = 2, "wrong"

        def __call__(self, x):
            return x

    with pytest.raises(EdgeSRError, match="shape"):
        evaluate(Wrong(), EvalConfig(datasets=[str(toy)]))


def _run(args):
    return CliRunner().invoke(main, args)


def _assert_one_line_error(r, *words):
    assert r.exit_code != 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [ln for ln in r.output.splitlines() if re.match(r"edge-sr( \w+)?: error:", ln)]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_cli_errors(tmp_path):
    ckpt = _tiny_ckpt(tmp_path / "tiny.pth")
    toy = _toy_set(tmp_path)
    _assert_one_line_error(
        _run(["eval", "--model", str(ckpt), "--datasets", str(tmp_path / "NoSuchSet")]),
        "NoSuchSet")
    (toy / "HR" / "readme.txt").write_text("hello")
    _assert_one_line_error(_run(["eval", "--model", str(ckpt), "--datasets", str(toy)]),
                           "readme.txt")
    (toy / "HR" / "readme.txt").unlink()
    (toy / "HR" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _assert_one_line_error(_run(["eval", "--model", str(ckpt), "--datasets", str(toy)]),
                           "broken.png")
    _assert_one_line_error(_run(["eval", "--model", "no-such-model", "--datasets", str(toy)]),
                           "no-such-model")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    _assert_one_line_error(_run(["eval", "--model", str(bad), "--datasets", str(toy)]),
                           "corrupt.pth")
    _assert_one_line_error(_run(["eval", "--model", str(ckpt), "--scale", "4",
                                 "--datasets", str(toy)]), "--scale 4")


def test_cli_json_is_written(tmp_path):
    ckpt = _tiny_ckpt(tmp_path / "tiny.pth")
    toy = _toy_set(tmp_path, n=1)
    out = tmp_path / "r" / "eval.json"
    r = _run(["-q", "eval", "--model", str(ckpt), "--datasets", str(toy), "--json", str(out)])
    assert r.exit_code == 0, r.output
    js = json.loads(out.read_text())
    assert js["scale"] == 2 and js["datasets"]["Toy"]["images"] == 1
    (row,) = js["per_image"]  # every image's scores too
    assert row["dataset"] == "Toy" and row["image"] == "im0"
    assert abs(row["psnr"] - js["datasets"]["Toy"]["psnr"]) < 1e-5
    assert "Toy" in r.output and "PSNR" in r.output


@needs_data
def test_real_x2_ref_on_set5_crops():
    """The x2 reference checkpoint beats bicubic on 64x64 HR crops of Set5 (shipped LR)."""
    from edge_sr.data import load_benchmark

    pairs = [SRPair(p.name, p.lr[40:72, 40:72], p.hr[80:144, 80:144])
             for p in load_benchmark("Set5", 2)[:3]]
    pred = make_predictor("swinir-light-x2-ref")
    assert isinstance(pred, TorchPredictor) and pred.scale == 2
    res = evaluate_pairs(pred, pairs, 2, label="Set5-crops", progress=False)
    bic = np.mean([psnr_y(bicubic_upscale(p.lr, 2), p.hr, 2) for p in pairs])
    assert res.psnr > bic + 0.5, (res.psnr, bic)
    assert 0.8 < res.ssim < 1.0
    with pytest.raises(EdgeSRError, match="--scale 3"):
        make_predictor("swinir-light-x2-ref", scale=3)


@pytest.mark.parametrize("size", [(1, 1), (4, 4)])
def test_images_with_nothing_left_to_score_are_one_line_errors(tmp_path, size):
    """A 1x1 HR image (no LR pixel at x2) is refused before the model runs, as a 4x4 one is
    after the border crop: one line, no traceback (new-user trial, twenty-sixth session)."""
    ckpt = _tiny_ckpt(tmp_path / "tiny.pth")
    toy = _toy_set(tmp_path, n=1, size=size)
    _assert_one_line_error(_run(["eval", "--model", str(ckpt), "--datasets", str(toy)]),
                           "im0", "nothing is left to score", "5x5")
