"""GPTQ weight rounding on the DOBI grids: lower output error, on-grid weights, stored in files."""

from __future__ import annotations

import pytest
import torch
from conftest import file_and_export_roundtrip

from calibrate.calibfile import (
    CalibrationMeta,
    read_calibration,
    save_calibration,
    state_checksum,
)
from calibrate.dobi import dobi_bounds, init_bounds
from calibrate.gptq import HessianTap, apply_gptq, gptq_round, input_hessians
from calibrate.prepare import QuantRecipe, prepare
from calibrate.qmodules import QuantLinear
from calibrate.quantizer import BoundFakeQuantizer
from edge_sr.errors import EdgeSRError


def _problem(per_channel: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 24, generator=g) @ torch.randn(24, 24, generator=g)  # correlated input
    w = torch.randn(16, 24, generator=g) * 0.3
    q = BoundFakeQuantizer(3, channels=16 if per_channel else None)
    if per_channel:
        q.set_bounds(w.min(1).values.tolist(), w.max(1).values.tolist())
    else:
        q.set_bounds(float(w.min()), float(w.max()))
    return x, w, q


@pytest.mark.parametrize("per_channel", [False, True])
def test_gptq_lowers_the_output_error_and_stays_on_the_grid(per_channel):
    x, w, q = _problem(per_channel)
    h = x.double().T @ x.double()
    wg = gptq_round(w, h, q)
    with torch.no_grad():
        near = q(w)
        assert torch.equal(q(wg), wg)  # on the grid: the quantizer leaves it unchanged
    err_g = float(((x @ (w - wg).T) ** 2).sum())
    err_n = float(((x @ (w - near).T) ** 2).sum())
    assert err_g < 0.8 * err_n


def test_gptq_rejects_a_hessian_of_the_wrong_size():
    _, w, q = _problem(False)
    with pytest.raises(ValueError, match=r"Hessian must be \(24, 24\)"):
        gptq_round(w, torch.eye(5, dtype=torch.float64), q)


def test_hessians_are_of_the_rotated_input(tiny_swinir):
    student = prepare(tiny_swinir(2), QuantRecipe(bits=4, rotate=("fc1",)))
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = {}
    name = next(n for n, m in student.named_modules()
                if isinstance(m, QuantLinear) and m.rotation is not None)
    lin = student.get_submodule(name)
    h = lin.act_quantizers[0].register_forward_pre_hook(
        lambda mod, a: seen.setdefault("x", a[0].detach().clone()))
    hs = input_hessians(student, calib)
    h.remove()
    rows = seen["x"].reshape(-1, lin.in_features).double()
    assert torch.allclose(hs[name], rows.T @ rows)


def test_hessians_tapped_on_dobis_pass_are_those_of_a_pass_of_their_own(tiny_swinir):
    """``calibrate_model`` gathers GPTQ's Hessians on DOBI's pass: the same tensors, bit for bit,
    and the same bounds as DOBI without the tap."""
    student = prepare(tiny_swinir(2), QuantRecipe(bits=4, rotate=("fc1",), weight_grid="channel"))
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tap = HessianTap(student)
    tapped, _ = dobi_bounds(student, calib, [4], tap=tap)
    plain, _ = dobi_bounds(student, calib, [4])
    own = input_hessians(student, calib)
    assert set(tap.hessians) == set(own) == {n for n, m in student.named_modules()
                                             if isinstance(m, QuantLinear)}
    assert all(torch.equal(tap.hessians[n], own[n]) for n in own)
    assert tapped == plain


def test_gptq_weights_survive_a_calibration_file_and_export(tiny_swinir, tmp_path):
    fp = tiny_swinir(depths=(2,), num_heads=(2,))
    recipe = QuantRecipe(bits=3, weight_grid="channel", rotate=("fc1",))
    student = prepare(fp, recipe)
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    init_bounds(student, calib)
    rep = apply_gptq(student, calib)
    assert rep["error_ratio"] and max(rep["error_ratio"].values()) <= 1.0 + 1e-9
    meta = CalibrationMeta(bits=3, scale=2, method="edge-sr", recipe=recipe.to_dict(),
                           checkpoint_name="tiny", checkpoint_sha256="0" * 64,
                           state_sha256=state_checksum(fp), arch="swinir-light", rounding="gptq")
    path = tmp_path / "g.pt"
    file_and_export_roundtrip(student, fp, meta, path)
    # a file that says GPTQ but lost its weights is refused
    obj = torch.load(path, weights_only=True)
    del obj["weights"]
    torch.save(obj, tmp_path / "broken.pt")
    with pytest.raises(EdgeSRError, match="rounded by gptq but are missing"):
        read_calibration(tmp_path / "broken.pt")


def test_dqc_trained_weights_and_biases_survive_a_calibration_file_and_export(tiny_swinir,
                                                                             tmp_path):
    """``weight_lr > 0``: the file (format version 2) keeps the trained weights and biases, the
    export uses them, and a version-1 file still reads."""
    from calibrate.dqc import linear_parameters

    fp = tiny_swinir(depths=(2,), num_heads=(2,))
    recipe = QuantRecipe(bits=4, weight_grid="channel", rotate=("fc1",))
    student = prepare(fp, recipe)
    init_bounds(student, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # what DQC's weight training does: move weights and biases
        for _, ps in linear_parameters(student):
            for p in ps:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    meta = CalibrationMeta(bits=4, scale=2, method="edge-sr", recipe=recipe.to_dict(),
                           checkpoint_name="tiny", checkpoint_sha256="0" * 64,
                           state_sha256=state_checksum(fp), arch="swinir-light",
                           weights_trained=True)
    path = tmp_path / "w.pt"
    file_and_export_roundtrip(student, fp, meta, path)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the changes matter
        assert not torch.equal(prepare(fp, recipe).eval()(x), student(x))
    obj = torch.load(path, weights_only=True)
    assert obj["version"] == 2 and obj["biases"]
    del obj["weights"], obj["biases"]
    torch.save(obj, tmp_path / "broken.pt")
    with pytest.raises(EdgeSRError, match="trained by DQC but are missing"):
        read_calibration(tmp_path / "broken.pt")
    plain = CalibrationMeta(bits=4, scale=2, method="2dquant", recipe=recipe.to_dict(),
                            checkpoint_name="tiny", checkpoint_sha256="0" * 64,
                            state_sha256=state_checksum(fp), arch="swinir-light")
    obj = torch.load(save_calibration(tmp_path / "p.pt", prepare(fp, recipe), plain),
                     weights_only=True)
    obj["version"] = 1
    obj["meta"].pop("weights_trained")
    torch.save(obj, tmp_path / "v1.pt")
    assert read_calibration(tmp_path / "v1.pt")[1].weights_trained is False
    obj["version"] = 3
    torch.save(obj, tmp_path / "v3.pt")
    with pytest.raises(EdgeSRError, match="expected version 1 or 2, found 3"):
        read_calibration(tmp_path / "v3.pt")
