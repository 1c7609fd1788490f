"""The accuracy bench's cell plan and the sensitivity bench's quantizer groups (no compute)."""

import json

import numpy as np
import pytest
import torch

import benchmarks.accuracy.__main__ as accuracy_cli
from benchmarks.accuracy import claims, report, run
from benchmarks.accuracy import plan as planning
from benchmarks.sensitivity import group_of


@pytest.fixture
def family(monkeypatch):
    def use(key):
        monkeypatch.setattr(planning.SETTINGS, "family", planning.FAMILIES[key])
    return use


def test_swinir_plan_has_the_issue_grid(family):
    family("swinir")
    cells = planning.plan([2, 4, 3], [4, 2, 3])
    narrow = [c for c in cells if c[3] in ("Set5", "Set14")]
    assert len(narrow) == 3 * 2 * (1 + 3 * 4)  # scales x sets x (FP + bits x methods)
    wide = {c for c in cells if c[3] in ("B100", "Urban100")}
    assert {c[0] for c in wide} == {4} and {c[1] for c in wide} == {32, 4, 2}
    assert len(wide) == 2 * (1 + 2 * 4)


def test_ngswin_plan_wide_rows_at_both_scales_and_filters(family):
    family("ngswin")
    cells = planning.plan([2, 3], [4, 2, 3], datasets=("Urban100",), methods=("2dquant",))
    assert cells == [(2, 32, "fp", "Urban100"), (2, 4, "2dquant", "Urban100"),
                     (2, 2, "2dquant", "Urban100"), (3, 32, "fp", "Urban100"),
                     (3, 4, "2dquant", "Urban100"), (3, 2, "2dquant", "Urban100")]
    assert planning.cell_path(2, 4, "dobi", "Set5").parent.name == "accuracy_ngswin"


def test_render_puts_condiquant_beside_the_paper_drop_for_ngswin(family):
    family("ngswin")
    cells = {(2, 32, "fp", "Set5"): {"psnr": 38.0}, (2, 4, "2dquant", "Set5"): {"psnr": 37.5}}
    text = report.render(cells, "cpu")
    row = next(line for line in text.splitlines() if "| 2DQuant (fast) |" in line)
    # ours -0.50; Table 3 x2 W4 2DQuant 37.87 - 38.15 = -0.28; CondiQuant 38.03 - 38.15 = -0.12
    assert "| 37.50 | -0.50 | -0.28 / -0.12 |" in row


@pytest.mark.parametrize("name, group", [
    ("layers.0.residual_group.blocks.1.attn.qkv.weight_quantizers.2", "weights"),
    ("layers.0.residual_group.blocks.1.attn.qkv.act_quantizers.0", "qkv input"),
    ("layers.3.residual_group.blocks.0.mlp.fc2.act_quantizers.0", "fc2 input"),
    ("layers.0.residual_group.blocks.1.attn.k_quant", "q/k outputs"),
    ("layers.0.residual_group.blocks.1.attn.attn_probs_quant", "softmax output"),
])
def test_sensitivity_groups(name, group):
    assert group_of(name) == group


def test_ordering_check_reports_what_holds_and_what_does_not(family):
    family("swinir")
    c = {(4, 2, m, d): {"psnr": v} for (m, d), v in {
        ("minmax", "Set5"): 28.0, ("percentile", "Set5"): 28.5, ("dobi", "Set5"): 28.3,
        ("2dquant", "Set5"): 28.6, ("dobi", "Set14"): 26.0, ("2dquant", "Set14"): 25.9}.items()}
    (line,) = [ln for ln in report.ordering(c) if ln.startswith("- ")]
    assert "DOBI > MinMax (Set5 +0.300)" in line
    assert "DOBI not > Percentile (Set5 -0.200)" in line
    assert "2DQuant > DOBI (mean over Set5/Set14 +0.100)" in line


def test_claims_are_exclusive_and_a_dead_owner_is_taken_over(tmp_path):
    cell = tmp_path / "x2_w4_dobi_Set5.json"
    assert claims.claim(cell)
    assert not claims.claim(cell)  # held by this (live) process
    lock = tmp_path / (cell.name + ".claim")
    import socket

    lock.write_text(f"{socket.gethostname()} 999999999")  # a pid that cannot exist
    assert claims.claim(cell)
    lock.write_text("another-host 1")  # another machine's worker: never taken over
    assert not claims.claim(cell)
    claims.release(cell)
    assert not lock.exists()


def test_workers_skip_cells_claimed_elsewhere_and_wait_for_busy_calibrations(
        family, tmp_path, monkeypatch):
    import dataclasses

    family("ngswin")
    monkeypatch.setattr(planning.SETTINGS, "family",
                        dataclasses.replace(planning.SETTINGS.family, out=tmp_path))
    monkeypatch.setattr(run, "write_table", lambda: None)
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    monkeypatch.setattr(run, "ScaleRun", lambda s, bits: object())
    cells = [(2, 32, "fp", "Set5"), (2, 4, "dobi", "Set5"), (2, 4, "minmax", "Set5")]
    (tmp_path / "x2_w4_minmax_Set5.json.claim").write_text("another-host 1")
    busy = {"n": 0}

    def run_cell(run, b, m, ds):
        if m == "dobi" and busy["n"] < 2:  # its calibration is being made by another worker
            busy["n"] += 1
            raise claims.Busy("calib")
        planning.cell_path(2, b, m, ds).write_text("{}")

    monkeypatch.setattr(run, "run_cell", run_cell)
    run.work(cells, [4])
    done = sorted(p.name for p in tmp_path.glob("*.json"))
    assert done == ["x2_w32_fp_Set5.json", "x2_w4_dobi_Set5.json"]  # minmax left to its owner
    assert busy["n"] == 2 and not list(tmp_path.glob("*dobi*.claim"))


def test_paper_recipe_rows_compare_with_the_papers_2dquant_drop(family):
    family("swinir")
    cells = {(4, 32, "fp", "Set5"): {"psnr": 32.0},
             (4, 4, "2dquant-paper-cut", "Set5"): {
                 "psnr": 31.9, "device_type": "cuda", "device": "GPU X",
                 "calibration": {"dqc_iterations": 400, "dqc_planned_iterations": 4000,
                                 "dqc_best_iteration": 300, "val_psnr": 25.0, "device": "GPU X"}}}
    text = report.render(cells, "cpu")
    row = next(line for line in text.splitlines() if "paper recipe, cut short" in line)
    assert "| 31.90† | -0.10 | -0.68 |" in row  # Table 3 x4 W4 2DQuant 31.77 - 32.45
    assert "stopped at 400 of 4000 it (best @300) on GPU X" in row
    assert "cells marked † on GPU X" in text


class _Upsample(torch.nn.Module):
    """Nearest x2 upsampling that counts its calls: a model cheap enough to score per image."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest") * self.w


@pytest.fixture
def tiny_set(monkeypatch):
    from edge_sr.data import datasets

    rng = np.random.default_rng(0)
    pairs = [datasets.SRPair(f"img{i}", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8),
                             rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)) for i in range(4)]
    monkeypatch.setattr(datasets, "load_benchmark", lambda name, scale: pairs)
    return pairs


def test_cell_scores_per_image_resumes_and_matches_the_whole_set_score(tiny_set, tmp_path):
    from edge_sr.evaluate import evaluate_pairs
    from runtime.predictors import TorchPredictor

    model, cell = _Upsample(), tmp_path / "x2_w4_dobi_Set5.json"
    whole = evaluate_pairs(TorchPredictor(model, 2, "m"), tiny_set, 2, ssim=True, progress=False)
    parts = planning.parts_dir(cell)
    parts.mkdir()
    first = {"name": "img0", "psnr": 99.0, "ssim": 1.0, "seconds": 0.1, "lr_pixels": 120,
             "wall": 0.2, "worker": "other 1", "model_key": "k"}
    (parts / "000_img0.json").write_text(json.dumps(first))  # scored before an interruption
    (parts / "001_img1.json").write_text(json.dumps(first | {"name": "img1", "model_key": "old"}))
    (parts / "002_img2.json").write_text('{"name": "img2", "psn')  # edited by hand, cut short
    model.calls = 0
    out = run.score(model, 2, "Set5", cell, key="k")
    assert model.calls == 3  # img0 kept; img1 (another model) and img2 (unreadable) scored again
    assert out["images"] == 4 and out["eval_workers"] == 2
    assert out["per_image"][0]["psnr"] == 99.0
    assert [r["psnr"] for r in out["per_image"][1:]] == [r.psnr for r in whole.images[1:]]
    assert out["psnr"] == pytest.approx((99.0 + sum(r.psnr for r in whole.images[1:])) / 4)


def test_a_helper_takes_only_unclaimed_images_and_leaves_the_cell_to_its_lead(
        tiny_set, tmp_path):
    model, cell = _Upsample(), tmp_path / "x2_w4_dobi_Set5.json"
    parts = planning.parts_dir(cell)
    parts.mkdir()
    (parts / "002_img2.json.claim").write_text("another-host 1")  # the lead is scoring img2
    assert run.score(model, 2, "Set5", cell, key="k", lead=False) is None
    assert model.calls == 3
    assert sorted(p.name for p in parts.glob("*.json")) == [
        "000_img0.json", "001_img1.json", "003_img3.json"]
    assert not cell.exists()


def test_a_worker_with_nothing_left_helps_the_cells_others_are_scoring(
        family, tmp_path, monkeypatch):
    import dataclasses

    family("ngswin")
    monkeypatch.setattr(planning.SETTINGS, "family",
                        dataclasses.replace(planning.SETTINGS.family, out=tmp_path))
    monkeypatch.setattr(run, "ScaleRun", lambda s, bits: object())
    cells = [(2, 4, "dobi", "Urban100"), (2, 4, "minmax", "Urban100")]
    for _, b, m, ds in cells:  # both led elsewhere; only dobi has begun scoring images
        (tmp_path / f"x2_w{b}_{m}_{ds}.json.claim").write_text("another-host 1")
    planning.parts_dir(planning.cell_path(*cells[0])).mkdir()
    calls = []
    monkeypatch.setattr(run, "run_cell", lambda run, b, m, ds, lead=True:
                        calls.append((m, lead)))
    run.work(cells, [4])
    assert calls == [("dobi", False)]


def test_sigterm_releases_a_workers_claims(tmp_path):
    import os
    import signal

    cell = tmp_path / "x2_w4_dobi_Set5.json"
    old = signal.getsignal(signal.SIGTERM)
    try:
        claims.exit_on_sigterm()
        with pytest.raises(SystemExit) as e:
            assert claims.claim(cell)
            try:  # the shape of work(): claim, run, release in finally
                os.kill(os.getpid(), signal.SIGTERM)
                pytest.fail("SIGTERM did not stop the worker")
            finally:
                claims.release(cell)
        assert e.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, old)
    assert not (tmp_path / (cell.name + ".claim")).exists()


def test_the_table_lists_missing_cells_with_the_images_already_scored(family, tmp_path,
                                                                      monkeypatch):
    import dataclasses

    family("ngswin")
    monkeypatch.setattr(planning.SETTINGS, "family",
                        dataclasses.replace(planning.SETTINGS.family, out=tmp_path))
    parts = planning.parts_dir(planning.cell_path(2, 32, "fp", "Urban100"))
    parts.mkdir()
    for i in range(3):
        (parts / f"{i:03d}_img{i}.json").write_text("{}")
    text = report.render({(2, 32, "fp", "Set5"): {"psnr": 38.0}}, "cpu")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("- x2 Urban100:")]
    assert line.startswith("- x2 Urban100: FP (3 images scored), MinMax W4, ")


def test_the_table_names_this_runs_command_and_only_its_missing_cells(family, tmp_path,
                                                                       monkeypatch):
    import dataclasses

    family("ngswin")
    monkeypatch.setattr(planning.SETTINGS, "family",
                        dataclasses.replace(planning.SETTINGS.family, out=tmp_path))
    monkeypatch.setattr(planning.SETTINGS, "cells",
                        planning.plan([3], [4], ("Set5",), ("2dquant",)))
    monkeypatch.setattr(planning.SETTINGS, "command", "python -m benchmarks.accuracy --family "
                        "ngswin --scales 3 --bits 4 --datasets Set5 --methods 2dquant")
    text = report.render({(3, 32, "fp", "Set5"): {"psnr": 34.5}}, "cpu")
    assert text.startswith("Generated by `python -m benchmarks.accuracy --family ngswin --scales 3 "
                           "--bits 4 --datasets Set5 --methods 2dquant` on cpu")
    missing = [ln for ln in text.splitlines() if ln.startswith("- x")]
    assert missing == ["- x3 Set5: 2DQuant (fast) W4"], missing


@pytest.mark.parametrize("argv, says", [
    (["--family", "ngswin", "--scales", "5"], "--scales '5': expected some of 2, 3"),
    (["--scales", "x"], "--scales 'x': expected comma-separated integers"),
    (["--bits", "4,9"], "--bits '4,9': expected some of 2, 3, 4, 5, 6, 7, 8"),
])
def test_bad_scales_or_bits_are_named_in_a_usage_error(argv, says, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["accuracy", *argv])
    with pytest.raises(SystemExit) as e:
        accuracy_cli.main()
    assert e.value.code == 2 and says in capsys.readouterr().err
