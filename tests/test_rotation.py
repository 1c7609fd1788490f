"""Beyond the paper: Hadamard-rotated linear inputs and per-channel weight grids."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from calibrate.calibfile import CalibrationMeta, load_calibrated, save_calibration, state_checksum
from calibrate.dobi import init_bounds, search_bounds
from calibrate.prepare import QuantRecipe, prepare, quantizers, set_quant_enabled
from calibrate.qmodules import QuantLinear
from calibrate.quantizer import BoundFakeQuantizer, fake_quant_reference
from calibrate.rotation import hadamard, hadamard_pm1, has_hadamard, random_hadamard

ALL = ("qkv", "proj", "fc1", "fc2")


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 60, 64, 96, 120, 128, 180, 240])
def test_hadamard_is_orthogonal_with_pm1_entries(n):
    h = hadamard_pm1(n)
    assert set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))
    r = random_hadamard(n, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [3, 6, 10, 14, 36])
def test_widths_without_a_construction_are_named(n):
    assert not has_hadamard(n)
    with pytest.raises(ValueError, match=f"width {n}"):
        hadamard(n)


def test_random_signs_are_seeded():
    assert torch.equal(random_hadamard(60, 1), random_hadamard(60, 1))
    assert not torch.equal(random_hadamard(60, 1), random_hadamard(60, 2))


def test_rotation_spreads_a_channel_outlier():
    """One huge channel: the rotated tensor's best 4-bit per-tensor error is far smaller."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    x[:, 5] *= 200.0
    r = random_hadamard(64).float()

    def rel_err(t):
        lo, up = search_bounds(t, 4, "two_sided")
        n = 15
        s = (up - lo) / n
        q = lo + s * torch.round((t.clamp(lo, up) - lo) / s)
        return float(((q - t) ** 2).sum() / (t**2).sum())

    assert rel_err(x @ r) < rel_err(x) / 5  # measured: 0.111 -> 0.011


def test_rotated_linear_is_the_fp_linear_when_quantizers_are_off():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(60, 180)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(180, 60, generator=g) * 0.1)
    ql = QuantLinear(lin, 4, groups=3, rotation=random_hadamard(60), weight_channels=True)
    set_quant_enabled(ql, False)
    x = torch.randn(2, 7, 60, generator=g)
    with torch.no_grad():
        assert torch.allclose(ql(x), lin(x), atol=1e-5)
        assert torch.allclose(ql.to_float().weight, lin.weight, atol=1e-6)
    assert [q.channels for q in ql.weight_quantizers] == [60, 60, 60]


def test_per_channel_quantizer_is_per_row_fake_quant_with_the_reference_gradient():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 33, generator=g)
    q = BoundFakeQuantizer(3, channels=5)
    lo = -torch.rand(5, generator=g) - 0.2
    up = torch.rand(5, generator=g) + 0.2
    q.set_bounds(lo.tolist(), up.tolist())
    assert q.lower.shape == (5, 1) and q.bounds()[0] == pytest.approx(lo.tolist())
    x = w.clone().requires_grad_(True)
    y = q(x)
    up_g = torch.randn(y.shape, generator=g)
    (y * up_g).sum().backward()
    for i in range(5):
        li = lo[i].clone().requires_grad_(True)
        ui = up[i].clone().requires_grad_(True)
        xi = w[i].clone().requires_grad_(True)
        yi = fake_quant_reference(xi, li, ui, 3)
        assert torch.allclose(y[i].detach(), yi.detach(), atol=1e-6)
        (yi * up_g[i]).sum().backward()
        assert float(q.lower.grad[i, 0]) == pytest.approx(float(li.grad), abs=1e-5)
        assert float(q.upper.grad[i, 0]) == pytest.approx(float(ui.grad), abs=1e-5)
        assert torch.allclose(x.grad[i], xi.grad)
    with pytest.raises(ValueError, match="expected 5 bound value"):
        q.set_bounds([0.0], [1.0])


def test_dobi_gives_each_channel_its_own_search(tiny_swinir):
    student = prepare(tiny_swinir(2), QuantRecipe(bits=3, weight_grid="channel"))
    init_bounds(student, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    name, lin = next((n, m) for n, m in student.named_modules() if isinstance(m, QuantLinear))
    q = lin.weight_quantizers[0]
    w = lin.weight_blocks()[0].detach()
    for i in (0, w.shape[0] - 1):
        expect = search_bounds(w[i], 3, "two_sided")
        assert (float(q.lower[i, 0]), float(q.upper[i, 0])) == pytest.approx(expect, rel=1e-6)


def test_rotated_inputs_search_two_sided(tiny_swinir):
    student = prepare(tiny_swinir(2), QuantRecipe(bits=4, rotate=("fc2",)))
    fc2 = [m for n, m in student.named_modules() if n.endswith("fc2")]
    assert fc2 and all(m.act_quantizers[0].search == "two_sided" and m.rotation is not None
                       for m in fc2)
    plain = prepare(tiny_swinir(2), QuantRecipe(bits=4))
    assert all(m.act_quantizers[0].search == "one_sided"
               for n, m in plain.named_modules() if n.endswith("fc2"))


def test_recipe_accepts_module_paths_and_rejects_unknown_roles(tiny_swinir):
    site = next(p.name for p in tiny_swinir(2).quant_points() if p.role == "fc1")
    student = prepare(tiny_swinir(2), QuantRecipe(bits=4, rotate=(site,), wide_inputs=(site,)))
    rotated = [n for n, m in student.named_modules()
               if isinstance(m, QuantLinear) and m.rotation is not None]
    assert rotated == [site]
    assert student.get_submodule(site).act_quantizers[0].bits == 8
    with pytest.raises(ValueError, match="--rotate: unknown linear roles"):
        QuantRecipe(rotate=("attn",))
    with pytest.raises(ValueError, match="--weight-grid"):
        QuantRecipe(weight_grid="row")
    assert QuantRecipe().faithful and not QuantRecipe(rotate=("fc1",)).faithful


def test_rotated_per_channel_recipe_survives_a_calibration_file(tiny_swinir, tmp_path):
    fp = tiny_swinir(2)
    recipe = QuantRecipe(bits=3, rotate=ALL, weight_grid="channel", rotation_seed=5)
    student = prepare(fp, recipe)
    init_bounds(student, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    meta = CalibrationMeta(bits=3, scale=2, method="dobi", recipe=recipe.to_dict(),
                           checkpoint_name="tiny", checkpoint_sha256="0" * 64,
                           state_sha256=state_checksum(fp), arch="swinir-light")
    cm = load_calibrated(save_calibration(tmp_path / "c.pt", student, meta), fp)
    assert cm.meta.quant_recipe == recipe
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(cm.model(x), student(x))


def test_old_files_without_the_new_recipe_keys_read_as_the_faithful_recipe(tiny_swinir, tmp_path):
    fp = tiny_swinir(2)
    student = prepare(fp, QuantRecipe(bits=3))
    init_bounds(student, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    old = {"bits": 3, "qkv_separation": True, "search_assignment": "paper", "wide_inputs": []}
    meta = CalibrationMeta(bits=3, scale=2, method="dobi", recipe=old, checkpoint_name="tiny",
                           checkpoint_sha256="0" * 64, state_sha256=state_checksum(fp),
                           arch="swinir-light")
    cm = load_calibrated(save_calibration(tmp_path / "c.pt", student, meta), fp,
                         recipe=QuantRecipe(bits=3))
    assert cm.meta.quant_recipe.faithful


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_rotated_per_channel_export_is_exact(tiny_swinir, target):
    from calibrate.export.ortcheck import make_session
    from calibrate.export_qdq import ExportConfig, build_qdq

    tiny = tiny_swinir(depths=(2,), num_heads=(2,))
    student = prepare(tiny, QuantRecipe(bits=4, rotate=ALL, weight_grid="channel"))
    init_bounds(student, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    proto, records = build_qdq(student, ExportConfig(target=target, tile=(16, 16)))
    rotations = [n for n in proto.graph.node if n.name.endswith("/Rotate")]
    assert len(rotations) == sum(isinstance(m, QuantLinear) for m in student.modules())
    # ORT: each S^-1 R is INT4 signs x a per-row scale (1/8 of the float32 bytes); TensorRT: float32
    inits = {t.name: t for t in proto.graph.initializer}
    makers = {o: n for n in proto.graph.node for o in n.output}
    for r in rotations:
        if target == "ort":
            mul = makers[r.input[1]]
            cast = makers[mul.input[0]]
            assert mul.op_type == "Mul" and cast.op_type == "Cast"
            assert inits[cast.input[0]].data_type == onnx.TensorProto.INT4
        else:
            assert inits[r.input[1]].data_type == onnx.TensorProto.FLOAT
    lin = [r for r in records if r["kind"] == "linear"]
    assert all(r["weight_per_channel"] and "weight_scale" not in r for r in lin)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = student(x).numpy()
    out = make_session(proto, threads=1).run(None, {"lr": x.numpy()})[0]
    assert abs(out - ref).max() < 1e-4
    assert {q.bits for _, q in quantizers(student)} == {4}


def test_rotating_a_width_without_a_hadamard_names_the_site(tiny_swinir):
    from edge_sr.errors import EdgeSRError

    tiny = tiny_swinir(embed_dim=10, num_heads=(2, 2))  # width 10: no construction
    with pytest.raises(EdgeSRError, match=r"--rotate: .*fc1: no Hadamard matrix of width 10"):
        prepare(tiny, QuantRecipe(bits=4, rotate=("fc1",)))
