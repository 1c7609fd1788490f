"""The combined method (``--method edge-sr``), per-site choices and the in-memory API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_outlier_swinir
from PIL import Image

from calibrate.api import CalibrationConfig, calibrate, calibrate_model, pool_data
from calibrate.calibfile import load_calibrated, read_calibration
from calibrate.prepare import WIDE_BITS, QuantRecipe, quantizers
from calibrate.qmodules import QuantLinear
from calibrate.site_choice import choose_rotations, choose_wide_inputs
from edge_sr.errors import EdgeSRError


@pytest.fixture
def tiny_ckpt(tiny_swinir, tmp_path):
    path = tmp_path / "tiny_x2.pth"
    torch.save({"params": tiny_swinir(2).state_dict()}, path)
    return path


def _pool(folder, n, size):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def pool(tmp_path):
    return _pool(tmp_path / "pool", 4, (72, 72))




def test_rotation_is_chosen_where_it_measures_better(tiny_swinir):
    fp = make_outlier_swinir()
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sites, report = choose_rotations(fp, QuantRecipe(bits=4), calib)
    first = "layers.0.residual_group.blocks.0.mlp.fc1"
    assert first in sites and report[first]["rotated"] < report[first]["plain"] / 2  # 0.41 vs 1.20
    assert set(report) == {p.name for p in fp.quant_points() if p.kind == "linear"}
    assert all(report[s]["rotate"] == (s in sites) for s in report)


def test_mixed_precision_keeps_to_the_budget_and_promotes_the_worst_site(tiny_swinir):
    fp = make_outlier_swinir()
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sites, report = choose_wide_inputs(fp, QuantRecipe(bits=4), calib, avg_bits=4.5)
    total = sum(r["elements"] for r in report.values())
    spent = sum((WIDE_BITS - 4) * report[s]["elements"] for s in sites)
    assert 4 + spent / total <= 4.5 + 1e-9
    assert "layers.0.residual_group.blocks.0.mlp.fc1" in sites
    assert choose_wide_inputs(fp, QuantRecipe(bits=4), calib, avg_bits=4.0)[0] == ()
    with pytest.raises(ValueError, match="--avg-bits"):
        choose_wide_inputs(fp, QuantRecipe(bits=4), calib, avg_bits=9)


def test_edge_sr_method_defaults_and_explicit_options():
    cc = CalibrationConfig(model="m", bits=4, output="o", method="edge-sr")
    assert cc.option("rotate") == ("auto",) and cc.quant_recipe().weight_grid == "channel"
    assert cc.quant_recipe().fp_weights == "auto"  # kept weights: INT4/INT8 by measurement
    assert CalibrationConfig(model="m", bits=8, output="o",
                             method="edge-sr").quant_recipe().fp_weights == "fp16"
    faithful = CalibrationConfig(model="m", bits=4, output="o")
    assert faithful.quant_recipe().faithful
    off = CalibrationConfig(model="m", bits=4, output="o", method="edge-sr", rotate=(),
                            weight_grid="tensor", fp_weights="fp32", smooth="none")
    assert off.quant_recipe().faithful
    with pytest.raises(EdgeSRError, match="--avg-bits"):
        CalibrationConfig(model="m", bits=4, output="o", avg_bits=3.0).validate()
    with pytest.raises(EdgeSRError, match="--weight-grid"):
        CalibrationConfig(model="m", bits=4, output="o", weight_grid="row").validate()


def test_calibrate_model_in_memory_matches_the_file(tiny_ckpt, pool, tmp_path, one_thread):
    from edge_sr.checkpoints import load_model

    small = dict(pool=pool, iterations=2, calib_patches=4, calib_patch=32)
    cfg = CalibrationConfig(model=str(tiny_ckpt), bits=4, output=tmp_path / "e.pt",
                            method="edge-sr", avg_bits=4.5, **small)
    lm = load_model(str(tiny_ckpt))
    data = pool_data(lm.scale, cfg.budget, cfg.seed, pool, lr_patch=16, calib_patches=4,
                     calib_patch=32)
    cal = calibrate_model(lm, data, cfg)
    recipe = cal.meta.quant_recipe
    assert recipe.weight_grid == "channel" and "auto" not in recipe.rotate
    assert set(recipe.rotate) == {s for s, r in cal.meta.stats["rotation_choice"].items()
                                  if r["rotate"]}
    assert all(q.per_channel for n, q in quantizers(cal.model) if ".weight_quantizers." in n)
    out = calibrate(cfg, lm=lm)
    assert read_calibration(out)[0] == {n: q.bounds() for n, q in quantizers(cal.model)}
    back = load_calibrated(out, str(tiny_ckpt))
    assert back.meta.quant_recipe == recipe
    rotated = [m for m in back.model.modules() if isinstance(m, QuantLinear)
               and m.rotation is not None]
    assert len(rotated) == len(recipe.rotate)


def test_cli_takes_the_new_options(tiny_ckpt, tmp_path, one_thread):
    from edge_sr.cli import main

    pool = _pool(tmp_path / "pool64", 2, (136, 136))  # the CLI uses 32 patches of 64x64
    r = CliRunner().invoke(main, ["calibrate", "--model", str(tiny_ckpt), "--bits", "4",
                                  "--method", "dobi", "--rotate", "fc1,qkv", "--weight-grid",
                                  "channel", "--pool", str(pool), "-o", str(tmp_path / "r.pt")])
    assert r.exit_code == 0, r.output
    meta = read_calibration(tmp_path / "r.pt")[1]
    assert meta.recipe["rotate"] == ["fc1", "qkv"] and meta.recipe["weight_grid"] == "channel"
    r = CliRunner().invoke(main, ["calibrate", "--model", str(tiny_ckpt), "--bits", "4",
                                  "--rotate", "attn", "-o", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and "--rotate: unknown linear roles ['attn']" in r.output


def test_vocabularies_are_defined_once_and_the_cli_offers_them():
    from calibrate import api, prepare, vocab
    from calibrate.export.grid import TARGETS
    from edge_sr.cli import main

    assert set(api.DQC_BUDGETS) == set(vocab.BUDGETS)  # one DQC budget per name
    assert set(TARGETS) == set(vocab.TARGET_NAMES)
    assert prepare.DEPLOY_GRIDS is vocab.DEPLOY_GRIDS and api.METHODS is vocab.METHODS
    for cmd, option, vocabulary in (("calibrate", "--method", vocab.METHODS),
                                    ("calibrate", "--budget", vocab.BUDGETS),
                                    ("calibrate", "--grid", vocab.DEPLOY_GRIDS),
                                    ("export", "--target", vocab.TARGET_NAMES)):
        r = CliRunner().invoke(main, [cmd, "--help"], terminal_width=200)
        line = next(ln for ln in r.output.splitlines() if ln.strip().startswith(option))
        assert "[" + "|".join(vocabulary) in line, (option, line)
    r = CliRunner().invoke(main, ["calibrate", "--model", "m", "--bits", "4", "--budget", "slow",
                                  "-o", "x.pt"], prog_name="edge-sr")
    assert r.exit_code == 2 and "'slow' is not one of 'cpu', 'fast', 'paper'" in r.output
    # a bad option value is one line naming the option, like every other input error
    assert r.output.strip().splitlines() == [
        "edge-sr calibrate: error: Invalid value for '--budget': 'slow' is not one of 'cpu', "
        "'fast', 'paper'. (see 'edge-sr calibrate --help')"]


def test_weight_lr_option_reaches_dqc_and_is_checked():
    cc = CalibrationConfig(model="m", bits=4, output="o", method="edge-sr", weight_lr=0.05)
    assert cc.dqc_config().weight_lr == 0.05
    assert CalibrationConfig(model="m", bits=4, output="o").dqc_config().weight_lr == 0.0
    # edge-sr trains the weights too at <= 3 bits (measured at W2), not at 4 or 8
    edge = {b: CalibrationConfig(model="m", bits=b, output="o", method="edge-sr").dqc_config()
            for b in (2, 3, 4, 8)}
    assert [edge[b].weight_lr for b in (2, 3, 4, 8)] == [0.03, 0.03, 0.0, 0.0]
    with pytest.raises(EdgeSRError, match="--weight-lr: expected a learning rate >= 0"):
        CalibrationConfig(model="m", bits=4, output="o", weight_lr=-1.0).validate()


def test_dqc_precision_is_fp32_unless_asked():
    def cfg(**kw):
        return CalibrationConfig(model="m", bits=4, output="o", **kw)

    # bf16 (-0.03 dB held-out on NGswin, mean of 3 seeds) is opt-in: a default that depended on
    # the CPU's bfloat16 support would calibrate differently by machine
    assert cfg().dqc_config().precision == "fp32"
    assert cfg(method="edge-sr").dqc_config().precision == "fp32"
    assert cfg(method="edge-sr", dqc_precision="bf16").dqc_config().precision == "bf16"


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    from edge_sr import hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert hardware.native_bf16("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not hardware.native_bf16("cpu")
