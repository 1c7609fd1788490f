"""Inputs as users have them (issue 16): each failing kind, with small files generated here.

Rows: 1 EXIF orientation, 2 alpha, 3 high bit depth, 4 floating-point images, 5 tiny evaluation
images, 6 thin images, 7 odd video sizes, 8 checkpoint wrappers; then "no traceback on bad input".
Exact values come from a nearest-neighbour stand-in for the engine (``nearest_engine``), so what
is checked is the I/O around the model; the real path runs through a tiny exported engine where
the shape or the format is the point.
"""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import ExifTags, Image, ImageOps

from edge_sr.cli import main
from edge_sr.data.media import _orient, load_image, quantize, read_image
from edge_sr.errors import EdgeSRError
from runtime.upscale import UpscaleConfig, upscale

ORIENTATION = ExifTags.Base.Orientation
# What exif_transpose applies for each orientation, and its inverse (how a camera stores it).
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
INVERSE = {**TRANSPOSE, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops: threads only contend


class Nearest:
    """An engine stand-in: nearest-neighbour xS upscaling, so outputs are known exactly."""

    name = "nearest"

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def run_numpy(self, lr, progress=False):
        x = np.asarray(lr, dtype=np.float32)
        x = x[None] if x.ndim == 3 else x
        return x.repeat(self.scale, axis=2).repeat(self.scale, axis=3)

    def close(self) -> None:
        pass


@pytest.fixture
def nearest_engine(monkeypatch):
    """``nearest_engine(scale)`` makes ``upscale`` use ``Nearest(scale)`` as its engine."""
    import runtime.predictors

    def use(scale: int = 2) -> str:
        monkeypatch.setattr(runtime.predictors, "engine_predictor",
                            lambda *a, **k: Nearest(scale))
        return "nearest-engine"

    return use


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    """A real engine: a tiny random SwinIR-light exported at 16x16."""
    from conftest import make_tiny_engine

    return make_tiny_engine(tmp_path_factory.mktemp("engine") / "tiny")


def _run(engine, out, *inputs, **kw):
    return upscale(UpscaleConfig(engine=engine, inputs=[str(i) for i in inputs], output=out,
                                 threads=1, **kw))


def _cli(*args):
    """Run the CLI quietly (warnings and errors only), as a user's script would."""
    return CliRunner().invoke(main, ["-q", *[str(a) for a in args]])


def _one_error_line(r, *words) -> None:
    """Exit 2, exactly one ``edge-sr <command>: error:`` line naming ``words``, and no
    traceback."""
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    errors = [line for line in r.output.splitlines()
              if re.match(r"edge-sr( \w+)?: error: ", line)]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    for w in words:
        assert w in errors[0], (w, errors[0])


def _nearest(a: np.ndarray, s: int) -> np.ndarray:
    return a.repeat(s, axis=0).repeat(s, axis=1)


def _exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[ORIENTATION] = orientation
    return e


# --- 1. EXIF orientation ------------------------------------------------------------------------

def _upright_quadrants(w: int, h: int) -> np.ndarray:
    """An upright (h, w) RGB image whose four quadrants have distinct, JPEG-proof colours."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2:] = (0, 255, 0)
    img[h // 2:, : w // 2] = (0, 0, 255)
    img[h // 2:, w // 2:] = (255, 255, 255)
    return img


def _quadrant_means(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    q = [img[: h // 2, : w // 2], img[: h // 2, w // 2:], img[h // 2:, : w // 2],
         img[h // 2:, w // 2:]]
    return np.array([x[2:-2, 2:-2].reshape(-1, 3).mean(0) for x in q])


def test_row1_sideways_jpeg_comes_out_upright(tmp_path, nearest_engine):
    """The issue's case: a 48x32 JPEG stored sideways with Orientation = 6 -> 64x96, upright."""
    upright = _upright_quadrants(32, 48)  # what the camera saw: 32 wide, 48 high
    stored = Image.fromarray(upright).transpose(INVERSE[6])
    assert stored.size == (48, 32)
    stored.save(tmp_path / "photo.jpg", exif=_exif(6), quality=95)
    rep = _run(nearest_engine(2), tmp_path / "out", tmp_path / "photo.jpg")
    out = Image.open(rep.outputs[0])
    assert out.size == (64, 96)  # width x height: upright
    np.testing.assert_allclose(_quadrant_means(np.asarray(out)), _quadrant_means(
        _nearest(upright, 2)), atol=8)
    assert ORIENTATION not in out.getexif()  # no tag left that would rotate it again


@pytest.mark.parametrize("orientation", range(1, 9))
def test_row1_every_orientation_value(tmp_path, orientation):
    upright = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    stored = Image.fromarray(upright)
    if orientation in INVERSE:
        stored = stored.transpose(INVERSE[orientation])
    stored.save(tmp_path / "a.png", exif=_exif(orientation))  # PNG: lossless, so exact
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), upright)
    # the path for 16-bit colour (decoded by OpenCV) orients with the same Pillow transposition
    ref = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "a.png")))
    raw = np.asarray(stored).astype(np.uint16) * 257
    np.testing.assert_array_equal(_orient(raw, orientation), ref.astype(np.uint16) * 257)


# --- 2. Alpha -----------------------------------------------------------------------------------

def _rgba_case(path):
    """RGBA 48x40 whose left 16 columns are alpha 0 over pure green (the issue's case)."""
    rng = np.random.default_rng(2)
    rgba = np.concatenate([rng.integers(0, 256, (40, 48, 3), dtype=np.uint8),
                           np.full((40, 48, 1), 255, np.uint8)], axis=2)
    rgba[:, :16] = (0, 255, 0, 0)
    Image.fromarray(rgba, "RGBA").save(path)
    return rgba


def test_row2_alpha_is_kept_and_upscaled(tmp_path, nearest_engine):
    rgba = _rgba_case(tmp_path / "cut.png")
    rep = _run(nearest_engine(2), tmp_path / "out", tmp_path / "cut.png")
    out = Image.open(rep.outputs[0])
    assert out.mode == "RGBA" and out.size == (96, 80)
    np.testing.assert_array_equal(np.asarray(out), _nearest(rgba, 2))
    assert (np.asarray(out)[:, :32, 3] == 0).all()  # the green stays hidden
    assert not rep.warnings


def test_row2_alpha_through_the_engine(tmp_path, tiny_engine):
    """With a real engine the alpha plane is upscaled by the model, as a grey image (the mean of
    the three output channels), and the colour exactly as an RGB image would be."""
    from runtime.predictors import engine_predictor
    from runtime.upscale import upscale_float, upscale_frame

    rgba = _rgba_case(tmp_path / "cut.png")
    rep = _run(tiny_engine, tmp_path / "out", tmp_path / "cut.png")
    out = np.asarray(Image.open(rep.outputs[0]))
    assert out.shape == (80, 96, 4)
    pred = engine_predictor(tiny_engine, threads=1)
    np.testing.assert_array_equal(out[..., :3], upscale_frame(pred, rgba[..., :3]))
    grey = np.repeat(rgba[..., 3:] / np.float32(255), 3, axis=2)
    np.testing.assert_array_equal(out[..., 3], quantize(upscale_float(pred, grey).mean(2), 8))


def test_a_grey_input_gives_a_grey_output(tmp_path, tiny_engine):
    """The model's three channels differ along edges; a grey picture is written with their mean
    in all three (a colour picture as the model gives it)."""
    from runtime.predictors import engine_predictor
    from runtime.upscale import upscale_float

    grey = np.random.default_rng(3).integers(0, 256, (24, 20), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    out = np.asarray(Image.open(_run(tiny_engine, tmp_path / "out", tmp_path / "g.png")
                                .outputs[0]).convert("RGB"))
    assert out.shape == (48, 40, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    sr = upscale_float(engine_predictor(tiny_engine, threads=1),
                       np.repeat(grey[..., None] / np.float32(255), 3, axis=2))
    assert np.abs(sr[..., 0] - sr[..., 2]).max() > 1 / 255  # the raw output is not grey
    np.testing.assert_array_equal(out[..., 0], quantize(sr.mean(2), 8))


def test_row2_alpha_kinds_and_options(tmp_path, nearest_engine):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    la = np.dstack([grey, np.full_like(grey, 9)])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    pic = read_image(tmp_path / "la.png")
    assert pic.bits == 8 and (pic.alpha == 9).all() and (pic.rgb[..., 2] == grey).all()
    pal = Image.new("P", (4, 3))
    pal.putpalette([0, 255, 0] + [200, 10, 10] * 255)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    pa = read_image(tmp_path / "pal.png")
    assert pa.alpha is not None and pa.alpha[0, 0] == 255 and pa.alpha[0, 1] == 0
    eng = nearest_engine(2)
    # --alpha drop: colour only, and a warning that says so
    rep = _run(eng, tmp_path / "drop", tmp_path / "la.png", alpha="drop")
    assert Image.open(rep.outputs[0]).mode == "RGB"
    assert any("alpha channel dropped" in w for w in rep.warnings)
    # an output format without alpha is refused before anything is written
    with pytest.raises(EdgeSRError, match=r"la\.png has an alpha channel.*--alpha drop"):
        _run(eng, tmp_path / "x.jpg", tmp_path / "la.png")
    assert not (tmp_path / "x.jpg").exists()


# --- 3. High bit depth --------------------------------------------------------------------------

def test_row3_dark_16bit_frame_keeps_its_scale_and_depth(tmp_path, nearest_engine):
    """Grey 16-bit PNG with values 0-200: scaled by 65535, not by its content; 16-bit out."""
    dark = np.random.default_rng(3).integers(0, 201, (30, 40), dtype=np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    pic = read_image(tmp_path / "dark.png")
    assert pic.bits == 16 and pic.rgb.dtype == np.uint16
    np.testing.assert_array_equal(pic.rgb[..., 0], dark)
    assert load_image(tmp_path / "dark.png").max() <= 1  # 200 / 65535 of full scale: black
    rep = _run(nearest_engine(2), tmp_path / "out", tmp_path / "dark.png")
    out = cv2.imread(str(rep.outputs[0]), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (60, 80, 3)
    np.testing.assert_array_equal(out[..., 1], _nearest(dark, 2))
    assert abs(out.mean() - dark.mean()) < 1e-9  # ~100, not ~25000 (or ~50 in 8 bits)
    # asked otherwise: --depth 8
    rep = _run(nearest_engine(2), tmp_path / "out8", tmp_path / "dark.png", depth="8")
    assert Image.open(rep.outputs[0]).mode == "RGB"


def test_row3_16bit_colour_and_8bit_only_outputs(tmp_path, nearest_engine):
    rgb16 = np.random.default_rng(4).integers(0, 65536, (6, 9, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), rgb16[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "deep.tif"), rgb16[:, :, ::-1])
    for name in ("deep.png", "deep.tif"):  # Pillow alone would keep only the top 8 bits
        pic = read_image(tmp_path / name)
        assert pic.bits == 16
        np.testing.assert_array_equal(pic.rgb, rgb16)
    eng = nearest_engine(2)
    rep = _run(eng, tmp_path / "out", tmp_path / "deep.tif")
    out = cv2.imread(str(rep.outputs[0]), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
    np.testing.assert_array_equal(out, _nearest(rgb16, 2))
    rep = _run(eng, tmp_path / "small.jpg", tmp_path / "deep.png")  # JPEG holds 8 bits
    assert Image.open(tmp_path / "small.jpg").mode == "RGB"
    assert any("written as 8-bit" in w for w in rep.warnings)


# --- 4. Floating-point images -------------------------------------------------------------------

def test_row4_float_tiff_is_read_in_0_1(tmp_path, nearest_engine):
    f = np.random.default_rng(5).random((10, 12), dtype=np.float32)
    Image.fromarray(f, "F").save(tmp_path / "grey.tif")
    f3 = np.random.default_rng(6).random((10, 12, 3), dtype=np.float32)
    cv2.imwrite(str(tmp_path / "rgb.tif"), f3[:, :, ::-1])  # Pillow cannot open float RGB
    np.testing.assert_array_equal(read_image(tmp_path / "grey.tif").rgb[..., 0], f)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif").rgb, f3)
    assert abs(load_image(tmp_path / "grey.tif").mean() - f.mean() * 255) < 1
    rep = _run(nearest_engine(2), tmp_path / "out", tmp_path / "grey.tif", tmp_path / "rgb.tif")
    grey = cv2.imread(str(rep.outputs[0]), cv2.IMREAD_UNCHANGED)
    assert grey.dtype == np.uint16 and grey.shape == (20, 24, 3)  # not black: 16-bit, scaled
    np.testing.assert_array_equal(grey[..., 0], _nearest(np.floor(f * 65535 + 0.5), 2))


def test_row4_float_outside_0_1_is_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 4.0, np.float32), "F").save(tmp_path / "hdr.tif")
    with pytest.raises(EdgeSRError, match=r"hdr\.tif: a floating-point image with values in "
                                          r"\[4, 4\].*scale it to \[0, 1\]"):
        read_image(tmp_path / "hdr.tif")
    r = _cli("upscale", "--engine", tmp_path / "none", tmp_path / "hdr.tif", "-o", tmp_path / "o")
    _one_error_line(r, "hdr.tif", "[0, 1]")
    assert not (tmp_path / "o").exists()


# --- 5 and 6. Tiny and thin evaluation images ---------------------------------------------------

def _set(root, sizes):
    rng = np.random.default_rng(7)
    (root / "HR").mkdir(parents=True)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "HR" / f"{name}.png")
    return root


def _tiny_ckpt(path):
    from conftest import make_tiny_swinir

    torch.save({"params": make_tiny_swinir(2).state_dict()}, path)
    return path


def test_row5_row6_tiny_and_thin_images_are_scored(tmp_path):
    from conftest import make_tiny_swinir

    from edge_sr.evaluate import EvalConfig, evaluate
    from edge_sr.metrics import psnr_y, ssim_y
    from runtime.predictors import make_predictor

    toy = _set(tmp_path / "Toy", {"big": (32, 30), "small": (14, 14), "thin": (200, 6)})
    res = evaluate(make_predictor(make_tiny_swinir(2)),
                   EvalConfig(datasets=[str(toy)], save_images=tmp_path / "sr"))
    d = res.datasets["Toy"]
    by = {r.name: r for r in d.images}
    assert by["small"].ssim is None and "10x10 after the crop" in by["small"].ssim_skipped
    assert by["thin"].ssim is None and "196x2 after the crop" in by["thin"].ssim_skipped
    assert by["big"].ssim is not None and d.ssim == pytest.approx(by["big"].ssim)
    hr = load_image(toy / "HR" / "big.png")
    assert by["big"].ssim == pytest.approx(ssim_y(load_image(tmp_path / "sr/Toy/big.png"), hr, 2))
    thin_sr = load_image(tmp_path / "sr" / "Toy" / "thin.png")
    assert thin_sr.shape == (6, 200, 3)
    assert by["thin"].psnr == pytest.approx(psnr_y(thin_sr, load_image(toy / "HR/thin.png"), 2))
    assert res.to_json()["datasets"]["Toy"]["ssim_skipped"] == ["small", "thin"]
    assert "SSIM over 1 of 3 images" in res.table()


def test_row5_cli_says_ssim_was_skipped_and_refuses_empty_crops(tmp_path):
    ckpt = _tiny_ckpt(tmp_path / "tiny.pth")
    toy = _set(tmp_path / "Toy", {"small": (14, 14)})
    r = _cli("eval", "--model", ckpt, "--datasets", toy, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output and "small" in r.output
    four = _set(tmp_path / "Four", {"four": (4, 4)})
    r = _cli("eval", "--model", ckpt, "--datasets", four)
    _one_error_line(r, "Four/four: the HR image is 4x4", "at least 5x5")


@pytest.mark.parametrize("hw", [(3, 100), (1, 1), (2, 5), (1, 17)],
                         ids=["3x100", "1x1", "2x5", "1x17"])
def test_row6_model_takes_any_size(hw):
    """The Python model pads 1-3 px sides by repeated mirroring, exactly like a padded input."""
    from conftest import make_tiny_swinir

    from edge_sr.models.base import pad_flip

    model = make_tiny_swinir(2)
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    h, w = hw
    with torch.no_grad():
        y = model(x)
        padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (0, -h % 8), (0, -w % 8)),
                                         mode="symmetric"))
        ref = model(padded)[..., : 2 * h, : 2 * w]
    assert y.shape == (1, 3, 2 * h, 2 * w)
    assert torch.equal(y, ref)
    assert torch.equal(pad_flip(x, -h % 8, -w % 8), padded)


def test_row6_padding_helpers_any_size():
    import torch.nn.functional as F

    from edge_sr.models.base import pad_flip, pad_reflect_symmetric

    x = torch.arange(3.0).view(1, 1, 1, 3)
    assert pad_flip(x, 0, 9).flatten().tolist() == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    y = pad_reflect_symmetric(x, 8)  # a 1-pixel height is replicated, the width reflected
    assert y.shape == (1, 1, 8, 8) and (y == y[:, :, :1]).all()
    assert y[0, 0, 0].tolist() == [2, 1, 0, 1, 2, 1, 0, 1]
    one = torch.full((1, 1, 1, 1), 5.0)
    assert pad_reflect_symmetric(one, 4).shape == (1, 1, 4, 4) and (
        pad_reflect_symmetric(one, 4) == 5).all()
    for h, w in ((9, 13), (5, 6), (3, 2)):  # unchanged where reflection already worked
        t = torch.rand(1, 2, h, w)
        ph, pw = -h % 4, -w % 4
        if ph < h and pw < w:
            assert torch.equal(pad_reflect_symmetric(t, 4),
                               F.pad(t, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), "reflect"))
        assert np.array_equal(pad_reflect_symmetric(t, 4).numpy(), np.pad(
            t.numpy(), ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)),
            mode="reflect"))


def test_row6_thin_image_through_upscale(tmp_path, tiny_engine):
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (3, 100, 3), dtype=np.uint8)).save(
        tmp_path / "thin.png")
    rep = _run(tiny_engine, tmp_path / "out", tmp_path / "thin.png")
    assert Image.open(rep.outputs[0]).size == (200, 6)


# --- 7. Odd video sizes -------------------------------------------------------------------------

def _odd_mjpeg_avi(path, frames):
    """An MJPEG AVI of odd-sized frames at 24000/1001 fps.

    OpenCV's FFmpeg writer would crop the frames to even sizes, so OpenCV's own MJPEG writer
    makes the file; it stores integer rates only, so the stream header's rate is set to
    24000/1001 afterwards (AVI ``strh``: dwScale, dwRate; ``avih``: microseconds per frame).
    """
    import struct

    h, w = frames[0].shape[:2]
    wr = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), 24,
                         (w, h))
    assert wr.isOpened()
    for f in frames:
        wr.write(f)
    wr.release()
    b = bytearray(path.read_bytes())
    i = b.index(b"strh") + 8  # fccType, fccHandler, dwFlags, wPriority/wLanguage, dwInitialFrames
    b[i + 20:i + 28] = struct.pack("<II", 1001, 24000)
    i = b.index(b"avih") + 8
    b[i:i + 4] = struct.pack("<I", 41708)
    path.write_bytes(bytes(b))


def test_row7_odd_video_size_keeps_every_pixel_and_the_frame_rate(tmp_path, nearest_engine):
    """61x45 MJPEG AVI at 23.976 fps, x3: 183x135 frames, padded to 184x136 and said so."""
    fps = 24000 / 1001
    frames = [np.full((45, 61, 3), 40 * i + 20, np.uint8) for i in range(3)]
    for f in frames:
        f[:, -1] = (255, 0, 0)  # the last column and row carry colour that cropping would lose
        f[-1, :] = (0, 0, 255)
    _odd_mjpeg_avi(tmp_path / "clip.avi", frames)
    cap = cv2.VideoCapture(str(tmp_path / "clip.avi"))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(fps)
    assert cv2.VideoCapture(str(tmp_path / "clip.avi")).read()[1].shape == (45, 61, 3)
    rep = _run(nearest_engine(3), tmp_path / "out", tmp_path / "clip.avi")
    cap = cv2.VideoCapture(str(rep.outputs[0]))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(fps, abs=1e-3)
    got = []
    while (f := cap.read())[0]:
        got.append(f[1])
    assert len(got) == 3 and got[0].shape == (136, 184, 3)
    # the source's last column (blue in BGR) and last row (red) are in the output, x3 wide, and
    # repeated once into the padding (the codecs' 4:2:0 chroma blurs them: compare with the grey)
    grey = got[1][40:80, 40:80].mean(axis=(0, 1))
    for cols in (slice(180, 183), slice(183, 184)):
        assert got[1][60:100, cols].mean(axis=(0, 1))[0] - grey[0] > 60
    for rows in (slice(132, 135), slice(135, 136)):
        assert got[1][rows, 60:100].mean(axis=(0, 1))[2] - grey[2] > 60
    (msg,) = rep.warnings
    assert "183x135" in msg and "padded to 184x136" in msg and "even sizes" in msg


# --- 8. Checkpoint wrappers ---------------------------------------------------------------------

def _reference_sd(data_root):
    from edge_sr.checkpoints import read_checkpoint
    from edge_sr.models.state_dict import unwrap_state_dict

    return unwrap_state_dict(read_checkpoint(data_root / "models" / "swinir_light_x2_ref.pth"))


def test_row8_wrappers_and_safetensors_load(data_root, tmp_path):
    from safetensors.torch import save_file

    from edge_sr.checkpoints import load_model

    sd = _reference_sd(data_root)
    ref = load_model("swinir-light-x2-ref").model
    files = {
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "training.pth": {"model_state_dict": sd, "epoch": 10},
        "ddp_compiled.pth": {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file(sd, str(tmp_path / "weights.safetensors"))
    save_file({f"_orig_mod.{k}": v.half() for k, v in sd.items()},
              str(tmp_path / "half_compiled.bin"))  # safetensors under another suffix
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)
        for name in [*files, "weights.safetensors"]:
            m = load_model(tmp_path / name)
            assert (m.arch, m.scale) == ("swinir-light", 2)
            assert torch.equal(m.model(x), want), name
        half = load_model(tmp_path / "half_compiled.bin").model
        assert (half(x) - want).abs().max() < 0.02


def test_row8_one_rule_strict_on_every_parameter(data_root, tmp_path):
    from edge_sr.checkpoints import load_model

    sd = _reference_sd(data_root)
    torch.save({"model_state_dict": {k: v for k, v in sd.items() if k != "conv_first.bias"},
                "epoch": 10}, tmp_path / "missing.pth")
    with pytest.raises(EdgeSRError, match=r"missing\.pth does not match.*missing: conv_first"):
        load_model(tmp_path / "missing.pth")
    torch.save({"weights": sd, "epoch": 10}, tmp_path / "unknown.pth")
    with pytest.raises(EdgeSRError, match=r"unknown\.pth: expected a dict of tensors.*"
                                          r"under one of params_ema, params, state_dict"):
        load_model(tmp_path / "unknown.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(EdgeSRError, match=r"bad\.safetensors cannot be read as a safetensors"):
        load_model(tmp_path / "bad.safetensors")
    # the same rule serves NGswin
    from edge_sr.checkpoints import read_checkpoint

    ng = read_checkpoint(data_root / "models" / "NGswin_x2.pth")
    torch.save({"model_state_dict": {f"_orig_mod.{k}": v for k, v in ng.items()}, "epoch": 3},
               tmp_path / "ng.pth")
    assert load_model(tmp_path / "ng.pth").arch == "ngswin"


# --- no traceback on bad input --------------------------------------------------------------------

def test_bad_inputs_give_one_line_and_write_nothing(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    Image.fromarray(np.full((4, 4), np.nan, np.float32), "F").save(tmp_path / "nan.tif")
    Image.fromarray(np.zeros((4, 4), np.int32), "I").save(tmp_path / "int32.tif")
    (tmp_path / "bad.pth").write_bytes(b"junk")
    cases = {"broken.png": "expected a readable image", "anim.png": "extract the frames",
             "nan.tif": "NaN", "int32.tif": "32-bit integer"}
    for name, what in cases.items():
        r = _cli("upscale", "--engine", tmp_path / "none", tmp_path / name, "-o", tmp_path / "o")
        _one_error_line(r, name, what)
        assert r.output.count("\n") == 1
    assert not (tmp_path / "o").exists()
    toy = _set(tmp_path / "Toy", {"a": (16, 16)})
    _one_error_line(_cli("eval", "--model", tmp_path / "bad.pth", "--datasets", toy), "bad.pth")
    (toy / "HR" / "b.png").write_bytes(b"nope")
    (toy / "HR" / "c.tif").write_bytes(b"nope")
    r = _cli("eval", "--model", _tiny_ckpt(tmp_path / "t.pth"), "--datasets", toy)
    _one_error_line(r, "b.png", "expected a readable image")
    (toy / "HR" / "b.png").unlink()
    r = _cli("eval", "--model", tmp_path / "t.pth", "--datasets", toy)
    _one_error_line(r, "c.tif", "expected a readable image")
