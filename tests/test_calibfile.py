"""Calibration files: exact round trip, mismatch errors, the API/CLI and its bad inputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from calibrate.api import CalibrationConfig, calibrate
from calibrate.calibfile import (
    CalibrationMeta,
    load_calibrated,
    read_calibration,
    save_calibration,
    state_checksum,
)
from calibrate.dobi import init_bounds
from calibrate.prepare import QuantRecipe, prepare, quantizers
from edge_sr.errors import EdgeSRError


def _meta(fp, bits=3, **kw) -> CalibrationMeta:
    d = dict(bits=bits, scale=fp.scale, method="dobi", recipe=QuantRecipe(bits).to_dict(),
             checkpoint_name="tiny", checkpoint_sha256="0" * 64, state_sha256=state_checksum(fp),
             arch="swinir-light")
    d.update(kw)
    return CalibrationMeta(**d)


@pytest.fixture
def calibrated(tiny_swinir, tmp_path):
    fp = tiny_swinir(2)
    student = prepare(fp, QuantRecipe(bits=3))
    init_bounds(student, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    path = save_calibration(tmp_path / "c.pt", student, _meta(fp))
    return fp, student, path


def test_round_trip_is_exact(calibrated, one_thread):
    fp, student, path = calibrated
    loaded = load_calibrated(path, fp)
    assert loaded.meta.bits == 3 and loaded.meta.scale == 2
    x = torch.rand(1, 3, 20, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), student(x), atol=0, rtol=0)
    assert loaded.bounds == {n: (float(q.lower.detach()), float(q.upper.detach()))
                             for n, q in quantizers(student)}
    assert not loaded.model.training


def test_bits_and_scale_mismatch_name_both(calibrated):
    fp, _, path = calibrated
    with pytest.raises(EdgeSRError, match=r"made for bits 3, but bits 4 was asked for"):
        load_calibrated(path, fp, bits=4)
    with pytest.raises(EdgeSRError, match=r"made for scale 2, but scale 4 was asked for"):
        load_calibrated(path, fp, scale=4)
    with pytest.raises(EdgeSRError, match=r"made for recipe .*'qkv_separation': True.* but recipe"):
        load_calibrated(path, fp, recipe=QuantRecipe(3, qkv_separation=False))


def test_other_checkpoint_is_an_error(calibrated, tiny_swinir):
    _, _, path = calibrated
    with pytest.raises(EdgeSRError, match=r"made for checkpoint tiny .*but the given model's "
                                          r"weights differ"):
        load_calibrated(path, tiny_swinir(2, seed=5))


def test_other_scale_model_is_an_error(calibrated, tiny_swinir, tmp_path):
    fp4 = tiny_swinir(4)
    student = prepare(fp4, QuantRecipe(bits=3))
    init_bounds(student, torch.rand(1, 3, 16, 16))
    p = save_calibration(tmp_path / "x4.pt", student, _meta(fp4))
    bounds, meta = read_calibration(p)
    assert meta.scale == 4 and len(bounds) == 64
    with pytest.raises(EdgeSRError, match="made for scale 4, but scale 2 was asked for"):
        load_calibrated(p, fp4, scale=2)


def test_not_a_calibration_file(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"params": {}}, bad)
    with pytest.raises(EdgeSRError, match="expected format 'edge-sr-calibration'"):
        load_calibrated(bad)
    with pytest.raises(EdgeSRError, match="found nothing there"):
        load_calibrated(tmp_path / "missing.pt")


# --- API and CLI on a tiny checkpoint and a tiny image pool ----------------------------------

@pytest.fixture
def tiny_ckpt(tiny_swinir, tmp_path):
    path = tmp_path / "tiny_x2.pth"
    torch.save({"params": tiny_swinir(2).state_dict()}, path)
    return path


def _pool(folder, n, size=(136, 136)):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("bits", [1, 9])
def test_api_rejects_bits_outside_2_to_8(bits, tmp_path):
    with pytest.raises(EdgeSRError, match=rf"--bits: expected an integer from 2 to 8, got {bits}"):
        calibrate(CalibrationConfig(model="x", bits=bits, output=tmp_path / "c.pt"))


def test_api_rejects_empty_and_too_small_pools(tiny_ckpt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgeSRError, match=r"image pool .*empty: expected at least 2 images"):
        calibrate(CalibrationConfig(model=str(tiny_ckpt), bits=4, output=tmp_path / "c.pt",
                                    method="minmax", pool=empty))
    small = _pool(tmp_path / "small", 3, size=(40, 40))
    with pytest.raises(EdgeSRError, match="smaller than the patch size 64"):
        calibrate(CalibrationConfig(model=str(tiny_ckpt), bits=4, output=tmp_path / "c.pt",
                                    method="minmax", pool=small))


def test_a_time_limited_calibration_keeps_its_state_and_resume_finishes_it(tiny_ckpt, tmp_path,
                                                                           one_thread, caplog,
                                                                           monkeypatch):
    import calibrate.api as api
    from calibrate.api import init_state_path, recipe_state_path

    pool = _pool(tmp_path / "pool", 4, size=(72, 72))
    cfg = CalibrationConfig(model=str(tiny_ckpt), bits=3, output=tmp_path / "c.pt",
                            method="2dquant", pool=pool, iterations=3, calib_patches=4,
                            calib_patch=32, time_limit=1e-6)  # stops after DQC's first step
    state = tmp_path / "c.pt.dqc-state.pt"
    with caplog.at_level("WARNING"):
        out = calibrate(cfg)
    assert read_calibration(out)[1].stats["dqc_stopped_at"] == 1
    assert state.exists() and recipe_state_path(state).exists() and init_state_path(state).exists()
    assert "--resume continues it" in caplog.text
    first = read_calibration(out)[1].stats
    saved = {p: p.read_bytes() for p in (state, recipe_state_path(state), init_state_path(state))}
    for other, says in (({"seed": 1}, "seed 0 there, 1 here"),  # refused before any work
                        ({"calib_patches": 3}, "calib_patches 4 there, 3 here")):
        with pytest.raises(EdgeSRError, match=f"--resume: the interrupted run.*{says}$"):
            calibrate(replace(cfg, time_limit=None, resume=True, **other))
        assert {p: p.read_bytes() for p in saved} == saved  # and nothing overwritten

    def must_not_search(*a, **k):
        raise AssertionError("a resumed run searched its bounds again")

    with monkeypatch.context() as m:  # the DOBI starting point comes from the saved state
        m.setattr(api, "_initialise", must_not_search)
        out = calibrate(replace(cfg, time_limit=None, resume=True))
    whole = calibrate(replace(cfg, time_limit=None, output=tmp_path / "whole.pt"))
    # the same trajectory as if never interrupted (the stop added a validation at iteration 1)
    last = [{k: h[-1][k] for k in ("iteration", "loss", "val_psnr")}
            for h in (read_calibration(f)[1].stats["dqc_history"] for f in (out, whole))]
    assert last[0] == last[1] and last[0]["iteration"] == 3
    stats = read_calibration(out)[1].stats
    # all 3 iterations trained, 2 of them by the resumed run
    assert stats["dqc_stopped_at"] is None and stats["dqc_iterations"] == 3
    assert stats["dqc_resumed_at"] == 1
    assert stats["val_psnr_init"] == first["val_psnr_init"]
    assert stats["dobi_seconds"] == first["dobi_seconds"]
    for p in (state, recipe_state_path(state), init_state_path(state)):
        assert not p.exists()
    done = out.read_bytes()  # a finished file has nothing to resume: refused, kept as it is
    with pytest.raises(EdgeSRError, match="already complete, with nothing left to resume"):
        calibrate(replace(cfg, time_limit=None, resume=True))
    assert out.read_bytes() == done
    caplog.clear()
    with caplog.at_level("WARNING"):  # no file and no state: said, then a full run
        calibrate(replace(cfg, time_limit=None, resume=True, output=tmp_path / "new.pt"))
    assert "no interrupted run's state" in caplog.text


def test_api_and_cli_write_loadable_files(tiny_ckpt, tmp_path, one_thread):
    pool = _pool(tmp_path / "pool", 4, size=(72, 72))
    small = dict(pool=pool, iterations=2, calib_patches=4, calib_patch=32)
    out = calibrate(CalibrationConfig(model=str(tiny_ckpt), bits=3, output=tmp_path / "a.pt",
                                      method="2dquant", **small))
    cm = load_calibrated(out, str(tiny_ckpt))
    assert cm.meta.method == "2dquant" and cm.meta.stats["dqc_iterations"] == 2
    assert cm.meta.checkpoint_sha256 == cm.meta.checkpoint_sha256.lower() and cm.meta.versions
    assert not (tmp_path / "a.pt.dqc-state.pt").exists()
    # same config, same file contents (deterministic)
    again = calibrate(CalibrationConfig(model=str(tiny_ckpt), bits=3, output=tmp_path / "b.pt",
                                        method="2dquant", **small))
    assert read_calibration(again)[0] == read_calibration(out)[0]

    from edge_sr.cli import main

    big_pool = _pool(tmp_path / "pool64", 2)  # the CLI uses 32 patches of 64x64
    threads = torch.get_num_threads()
    try:
        r = CliRunner().invoke(main, ["calibrate", "--model", str(tiny_ckpt), "--bits", "4",
                                      "--method", "percentile", "--pool", str(big_pool),
                                      "--threads", "1", "-o", str(tmp_path / "p.pt")])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    meta = read_calibration(tmp_path / "p.pt")[1]
    assert meta.bits == 4 and meta.stats["percentile"] in ("p99.9", "p99.99", "p99.999")
    r = CliRunner().invoke(main, ["calibrate", "--model", str(tiny_ckpt), "--bits", "9",
                                  "-o", str(tmp_path / "q.pt")])
    assert r.exit_code == 2 and "--bits: expected an integer from 2 to 8, got 9" in r.output


def test_sigterm_is_an_interrupt_with_a_resume_hint(tmp_path, monkeypatch):
    """``kill`` (SIGTERM) mid-calibration: one line, exit 143, and where DQC saved state, how to
    continue it."""
    import signal

    import calibrate.api as api
    from edge_sr.cli import main

    def killed(cfg, lm=None):
        Path(str(cfg.output) + state_suffix).write_bytes(b"state")
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise AssertionError("no SIGTERM handler: kill would end edge-sr without a word")
        signal.raise_signal(signal.SIGTERM)  # as `kill PID` would, mid-run
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(api, "calibrate", killed)

    def run(out: Path):
        before = signal.getsignal(signal.SIGTERM)
        try:
            return CliRunner().invoke(main, ["-q", "calibrate", "--model", "x", "--bits", "4",
                                             "-o", str(out)])
        finally:
            signal.signal(signal.SIGTERM, before)

    state_suffix = ".dqc-state.pt"  # stopped during DQC
    r = run(tmp_path / "c.pt")
    assert r.exit_code == 143, r.output
    assert r.stderr.strip() == ("edge-sr: terminated (SIGTERM); nothing half-written was kept; "
                                "the same command with --resume continues the DQC from its "
                                "last save")
    state_suffix = ".dqc-state.pt.recipe.pt"  # stopped before DQC, the per-site choices made
    r = run(tmp_path / "d.pt")
    assert r.exit_code == 143, r.output
    assert r.stderr.strip().endswith("; the same command with --resume reuses the choices "
                                     "already made and continues from there")
