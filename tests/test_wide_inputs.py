"""Mixed precision beyond the paper: ``QuantRecipe.wide_inputs`` puts named linears' inputs at 8 bits."""

from __future__ import annotations

import pytest
import torch

from calibrate.api import CalibrationConfig
from calibrate.calibfile import CalibrationMeta, load_calibrated, save_calibration, state_checksum
from calibrate.dobi import dobi_bounds, init_bounds, search_bounds_multi
from calibrate.prepare import WIDE_BITS, QuantRecipe, prepare, quantizers
from edge_sr.errors import EdgeSRError


def _calib():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_only_the_named_inputs_are_wide(tiny_swinir):
    student = prepare(tiny_swinir(2), QuantRecipe(bits=3, wide_inputs=("fc1",)))
    bits = {n: q.bits for n, q in quantizers(student)}
    wide = {n for n, b in bits.items() if b == WIDE_BITS}
    assert wide and all(n.endswith("fc1.act_quantizers.0") for n in wide)
    assert {b for n, b in bits.items() if n not in wide} == {3}
    assert len(wide) == sum(p.role == "fc1" for p in tiny_swinir(2).quant_points())


def test_dobi_searches_wide_quantizers_at_their_own_width(tiny_swinir):
    student = prepare(tiny_swinir(2), QuantRecipe(bits=2, wide_inputs=("fc1",)))
    captured = {}
    name = next(n for n, q in quantizers(student) if q.bits == WIDE_BITS)
    q = dict(quantizers(student))[name]
    h = q.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].clone()))
    bounds, _ = dobi_bounds(student, _calib(), [2, 3], max_elements=None)
    h.remove()
    expect = search_bounds_multi(captured["x"], [WIDE_BITS], q.search)[WIDE_BITS]
    assert bounds[2][name] == pytest.approx(expect) and bounds[3][name] == pytest.approx(expect)
    # and an 8-bit grid is tighter than the 2-bit one on the same tensor
    two = search_bounds_multi(captured["x"], [2], q.search)[2]
    assert (two[1] - two[0]) < (expect[1] - expect[0])


def test_wide_recipe_survives_a_calibration_file(tiny_swinir, tmp_path):
    fp = tiny_swinir(2)
    recipe = QuantRecipe(bits=3, wide_inputs=("fc1", "qkv"))
    student = prepare(fp, recipe)
    init_bounds(student, _calib())
    meta = CalibrationMeta(bits=3, scale=2, method="dobi", recipe=recipe.to_dict(),
                           checkpoint_name="tiny", checkpoint_sha256="0" * 64,
                           state_sha256=state_checksum(fp), arch="swinir-light")
    cm = load_calibrated(save_calibration(tmp_path / "c.pt", student, meta), fp)
    assert cm.meta.quant_recipe == recipe
    assert {n: q.bits for n, q in quantizers(cm.model)} == {n: q.bits for n, q in quantizers(student)}
    x = _calib()[:1]
    with torch.no_grad():
        assert torch.equal(cm.model(x), student(x))


def test_unknown_role_is_a_clear_error():
    with pytest.raises(EdgeSRError, match="--wide-inputs: unknown linear roles \\['attn'\\]"):
        CalibrationConfig(model="m", bits=4, output="o", wide_inputs=("attn",)).validate()


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_mixed_width_export_is_exact_and_records_each_width(tiny_swinir, target):
    from calibrate.export.ortcheck import make_session
    from calibrate.export_qdq import ExportConfig, build_qdq

    tiny = tiny_swinir(depths=(2,), num_heads=(2,))
    student = prepare(tiny, QuantRecipe(bits=3, wide_inputs=("fc1",)))
    init_bounds(student, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    proto, records = build_qdq(student, ExportConfig(target=target, tile=(16, 16)))
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = student(x).numpy()
    out = make_session(proto, threads=1).run(None, {"lr": x.numpy()})[0]
    assert abs(out - ref).max() < 1e-4
    lin = [r for r in records if r["kind"] == "linear"]
    assert {r["a_bits"] for r in lin if r["site"].endswith("fc1")} == {WIDE_BITS}
    assert {r["a_bits"] for r in lin if not r["site"].endswith("fc1")} == {3}
    assert {r["w_bits"] for r in lin} == {3}


def test_collect_can_restrict_to_named_quantizers(tiny_swinir):
    from calibrate.dobi import collect

    student = prepare(tiny_swinir(2), QuantRecipe(bits=3, wide_inputs=("fc1",)))
    wide = {n for n, q in quantizers(student) if q.bits == WIDE_BITS}
    seen, _ = collect(student, _calib(), lambda x, s: (float(x.min()), float(x.max())), names=wide)
    assert set(seen) == wide
    everything, _ = collect(student, _calib(), lambda x, s: (float(x.min()), float(x.max())))
    assert {n: everything[n] for n in wide} == seen
