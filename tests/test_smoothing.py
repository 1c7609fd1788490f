"""Beyond the paper: SmoothQuant input smoothing of the quantized linears."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import file_and_export_roundtrip, make_outlier_swinir

from calibrate.calibfile import CalibrationMeta, read_calibration, state_checksum
from calibrate.dobi import init_bounds
from calibrate.prepare import QuantRecipe, prepare, set_quant_enabled
from calibrate.qmodules import QuantLinear
from calibrate.rotation import random_hadamard
from calibrate.site_choice import output_error
from calibrate.smoothing import measure_smoothing, smoothing_factors
from edge_sr.errors import EdgeSRError


def test_factors_follow_smoothquant():
    absmax = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([[1.0, -0.25, 2.0], [0.5, 0.5, -1.0]])  # column max |W|: 1, 0.5, 2
    s = smoothing_factors(absmax, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 2.0**0.5, (1e-5 / 2.0) ** 0.5]))
    assert torch.allclose(smoothing_factors(absmax, w, 1.0)[:2], torch.tensor([4.0, 1.0]))
    assert torch.allclose(smoothing_factors(absmax, w, 0.0), 1.0 / torch.tensor([1.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="alpha must be from 0 to 1"):
        smoothing_factors(absmax, w, 1.5)
    with pytest.raises(ValueError, match=r"absmax \(K,\) and weight \(N, K\)"):
        smoothing_factors(absmax[:2], w, 0.5)


@pytest.mark.parametrize("rotated", [False, True])
def test_smoothed_linear_is_the_fp_linear_when_quantizers_are_off(rotated):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(60, 180)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(180, 60, generator=g) * 0.1)
    s = torch.rand(60, generator=g) * 10 + 0.1
    ql = QuantLinear(lin, 4, groups=3, rotation=random_hadamard(60) if rotated else None,
                     weight_channels=True, smoothing=s)
    set_quant_enabled(ql, False)
    x = torch.randn(2, 7, 60, generator=g)
    with torch.no_grad():
        assert torch.allclose(ql(x), lin(x), atol=1e-4)
        assert torch.allclose(ql.to_float().weight, lin.weight, atol=1e-6)
    with pytest.raises(ValueError, match="smoothing must be 60 positive factors"):
        QuantLinear(lin, 4, smoothing=-s)


def test_smoothing_moves_an_outlier_channel_into_the_weight():
    """One huge input channel: the smoothed input's 4-bit grid costs the output far less."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    x[:, 5] *= 200.0
    w = torch.randn(32, 64, generator=g) * 0.1
    plain = output_error(x, w, 4)
    errs = {}
    for alpha in (0.65, 1.0):
        s = smoothing_factors(x.abs().amax(0), w, alpha)
        errs[alpha] = output_error(x / s, w * s, 4)
    # measured: 0.132 plain, 0.101 at alpha 0.65 (the outlier keeps 6x the others' range),
    # 0.012 at alpha 1 (every channel's range is 1; the weight takes it all)
    assert errs[0.65] < 0.85 * plain and errs[1.0] < plain / 10


def test_measured_factors_cover_every_quantized_linear():
    fp = make_outlier_swinir(depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    recipe = QuantRecipe(bits=4, smooth=0.5)
    f = measure_smoothing(fp, recipe, calib, 0.5)
    linears = {p.name for p in fp.quant_points() if p.kind == "linear"}
    assert set(f) == linears
    site = "layers.0.residual_group.blocks.0.mlp.fc1"
    assert int(f[site].argmax()) == 3  # the outlier channel gets the largest factor
    with pytest.raises(ValueError, match="no smoothing factors were given"):
        prepare(fp, recipe)
    with pytest.raises(ValueError, match="--smooth: expected a migration strength"):
        QuantRecipe(smooth=2.0)
    assert not recipe.faithful


def test_smoothing_and_the_rotation_choice_share_one_pass_with_the_same_results():
    """``calibrate_model`` measures both on one FP pass (``linear_inputs_many``)."""
    from calibrate.site_choice import choose_rotations, linear_inputs_many, rotation_rule
    from calibrate.smoothing import smoothing_rule

    fp = make_outlier_swinir(depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    recipe = QuantRecipe(bits=4, smooth=0.65)
    both = linear_inputs_many(fp, recipe, calib, {"smooth": smoothing_rule(fp, 0.65),
                                                 "rotate": rotation_rule(fp, recipe)})
    alone = measure_smoothing(fp, recipe, calib, 0.65)
    assert set(both["smooth"]) == set(alone)
    assert all(torch.equal(both["smooth"][s], alone[s]) for s in alone)
    assert both["rotate"] == choose_rotations(fp, recipe, calib)[1]


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_smoothed_export_is_exact_and_survives_a_calibration_file(tmp_path, target):
    fp = make_outlier_swinir(depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    recipe = QuantRecipe(bits=4, smooth=0.65, rotate=("fc1",), weight_grid="channel",
                         grid="real" if target == "trt" else "ort")
    student = prepare(fp, recipe, measure_smoothing(fp, recipe, calib, 0.65))
    init_bounds(student, calib)
    meta = CalibrationMeta(bits=4, scale=2, method="dobi", recipe=recipe.to_dict(),
                           checkpoint_name="tiny", checkpoint_sha256="0" * 64,
                           state_sha256=state_checksum(fp), arch="swinir-light")
    path = tmp_path / "s.pt"
    _, proto = file_and_export_roundtrip(student, fp, meta, path, target)
    names = [n.name for n in proto.graph.node]
    n_lin = sum(isinstance(m, QuantLinear) for m in student.modules())
    n_fc1 = sum(n.endswith("fc1/Rotate") for n in names)
    assert n_fc1 == 2 and sum(n.endswith("/Smooth") for n in names) == n_lin - n_fc1
    obj = torch.load(path, weights_only=True)
    del obj["smoothing"]
    torch.save(obj, tmp_path / "broken.pt")
    with pytest.raises(EdgeSRError, match="smoothing factors are missing"):
        read_calibration(tmp_path / "broken.pt")


def test_cli_smooth_option(tmp_path):
    from edge_sr.cli import main

    r = CliRunner().invoke(main, ["calibrate", "--model", "x", "--bits", "4", "--smooth", "2",
                                  "-o", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and "expected a migration strength from 0 to 1 or none" in r.output
    from calibrate.api import CalibrationConfig

    cfg = CalibrationConfig(model="m", bits=4, output="o", method="edge-sr")
    assert cfg.quant_recipe().smooth == 0.65
    assert CalibrationConfig(model="m", bits=4, output="o", method="edge-sr",
                             smooth="none").quant_recipe().smooth is None
    assert CalibrationConfig(model="m", bits=4, output="o").quant_recipe().smooth is None
