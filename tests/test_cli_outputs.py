"""Output paths and option values a new user gets wrong: one line and a non-zero exit, before
any work (edge_sr.fileio.check_writable, the CLI's OSError line), and no silent overwrite."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from edge_sr.cli import main, os_error_message
from edge_sr.errors import EdgeSRError
from edge_sr.fileio import check_writable


def _one_error_line(r, *needles: str) -> None:
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1, r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_check_writable(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert check_writable(tmp_path / "a" / "b" / "c.json", "--json") == tmp_path / "a/b/c.json"
    with pytest.raises(EdgeSRError, match=r"--json .*notes.txt is a file, not a folder"):
        check_writable(tmp_path / "notes.txt" / "c.json", "--json")
    with pytest.raises(EdgeSRError, match="is a file, not a folder"):
        check_writable(tmp_path / "notes.txt" / "deeper" / "c.json", "--json")


def test_check_writable_probes_the_folder(tmp_path):
    """Root passes every os.access check: a folder where no file can be made (/proc here) is
    still refused before any work, and the probe leaves nothing behind."""
    import os

    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system")
    with pytest.raises(EdgeSRError, match=r"^--json /proc/x/r.json: cannot write in /proc"):
        check_writable("/proc/x/r.json", "--json")
    check_writable(tmp_path / "ok.json", "--json")
    assert list(tmp_path.iterdir()) == []


def test_os_error_line():
    assert os_error_message(FileExistsError(17, "File exists", "notes.txt")) == \
        "notes.txt: File exists"
    assert os_error_message(OSError(28, "No space left on device")).startswith(
        "No space left on device")


def test_an_os_error_no_check_caught_is_one_line(monkeypatch):
    def boom(*a, **k):
        raise PermissionError(13, "Permission denied", "/root/x")

    monkeypatch.setattr("edge_sr.checkpoints.list_checkpoints", boom)
    r = CliRunner().invoke(main, ["models"])
    _one_error_line(r, "edge-sr models: error:", "/root/x: Permission denied")
    assert r.exit_code == 1


def test_outputs_under_a_file_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    r = CliRunner().invoke(main, ["calibrate", "--model", "swinir-light-x2-ref", "--bits", "4",
                                  "-o", "notes.txt/c.pt"])
    _one_error_line(r, "-o notes.txt/c.pt: notes.txt is a file, not a folder")
    assert r.exit_code == 2
    # eval checks --json before it scores (the model is never loaded: a bogus name passes)
    r = CliRunner().invoke(main, ["eval", "--model", "no-such-model", "--datasets", "Set5",
                                  "--json", "notes.txt/x.json"])
    _one_error_line(r, "--json notes.txt/x.json: notes.txt is a file, not a folder")


def test_calibrate_does_not_overwrite_without_force(tmp_path, monkeypatch):
    import calibrate.api as api

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.pt").write_bytes(b"an earlier calibration")
    loaded = []
    monkeypatch.setattr(api, "load_model", lambda *a, **k: loaded.append(1) or 1 / 0)
    r = CliRunner().invoke(main, ["calibrate", "--model", "swinir-light-x2-ref", "--bits", "4",
                                  "-o", "c.pt"])
    _one_error_line(r, "-o c.pt: already exists; pass --force to overwrite it")
    assert (tmp_path / "c.pt").read_bytes() == b"an earlier calibration" and not loaded
    # --resume of a finished file (no state left beside it) has nothing to continue
    r = CliRunner().invoke(main, ["calibrate", "--model", "swinir-light-x2-ref", "--bits", "4",
                                  "-o", "c.pt", "--resume"])
    _one_error_line(r, "-o c.pt: already complete, with nothing left to resume; pass --force")
    assert (tmp_path / "c.pt").read_bytes() == b"an earlier calibration" and not loaded
    # --force, and --resume where an interrupted run left its state, go on to the work
    (tmp_path / "c.pt.dqc-state.pt.recipe.pt").write_bytes(b"the choices made")
    for flag in ("--force", "--resume"):
        r = CliRunner().invoke(main, ["calibrate", "--model", "swinir-light-x2-ref", "--bits",
                                      "4", "-o", "c.pt", flag])
        assert isinstance(r.exception, ZeroDivisionError), r.output
    assert loaded == [1, 1]


def test_build_option_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--threads", "0"])
    _one_error_line(r, "--threads")
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--input-size", "320"])
    _one_error_line(r, "--input-size: expected WIDTHxHEIGHT", "320x180", "'320'")
    # a tile may be a square N
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--scale", "2", "--tile", "96",
                                  "--print-config"])
    assert r.exit_code == 0 and json.loads(r.output)["tile"] == [96, 96]
    # the scale of a named checkpoint is the registry's; without --model, --scale is required
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--model", "swinir-light-x3-ref",
                                  "--print-config"])
    assert r.exit_code == 0 and json.loads(r.output)["scale"] == 3
    # --print-config checks a given --scale against the checkpoint, as the build would
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--model", "swinir-light-x3-ref",
                                  "--scale", "2", "--print-config"])
    _one_error_line(r, "--scale", "x3 checkpoint, but 2 was given")
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["build", "--bits", "4"])
    _one_error_line(r, "--scale", "Required without --model")
    assert r.exit_code == 2


def test_build_scale_from_a_checkpoint_file(tmp_path, monkeypatch, tiny_swinir):
    monkeypatch.chdir(tmp_path)
    torch.save({"params": tiny_swinir(3).state_dict()}, tmp_path / "m.pth")
    r = CliRunner().invoke(main, ["build", "--bits", "4", "--model", "m.pth", "--print-config"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["scale"] == 3
