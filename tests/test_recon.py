"""Block reconstruction (BRECQ-style, beyond the paper): blocks in execution order, their cached
inputs, a local loss that falls in every block, only the bounds train, and the held-out guard."""

from __future__ import annotations

import pytest
import torch

from calibrate.dobi import init_bounds
from calibrate.dqc import block_paths
from calibrate.prepare import QuantRecipe, bound_parameters, prepare
from calibrate.recon import ReconConfig, block_inputs, execution_order, run_block_recon


def _setup(tiny_swinir, bits=3):
    fp = tiny_swinir(2)
    g = torch.Generator().manual_seed(0)
    calib = torch.rand(6, 3, 16, 16, generator=g)
    student = prepare(fp, QuantRecipe(bits=bits))
    init_bounds(student, calib)
    val = (torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 32, 32, generator=g))
    return fp, student, calib, val


def test_execution_order_and_cached_inputs(tiny_swinir, one_thread):
    fp, student, calib, _ = _setup(tiny_swinir)
    names = block_paths(student)
    order = execution_order(student, list(reversed(names)), calib[:1])
    assert order == names  # SwinIR runs its blocks in module order
    xs, args, kwargs = block_inputs(student, names[1], calib, chunk=4)
    assert xs.shape == (6, 16 * 16, 12) and args == ((16, 16),) and kwargs == {}
    # the cached input reproduces the block's output inside a full forward pass
    seen = []
    h = student.get_submodule(names[1]).register_forward_hook(lambda m, a, y: seen.append(y))
    with torch.no_grad():
        student(calib[:2])
    h.remove()
    with torch.no_grad():
        y = student.get_submodule(names[1])(xs[:2], *args)
    torch.testing.assert_close(y, seen[0])


def test_block_recon_lowers_every_block_loss_and_trains_only_bounds(tiny_swinir, one_thread):
    fp, student, calib, val = _setup(tiny_swinir)
    weights = {k: v.clone() for k, v in student.state_dict().items()
               if not k.endswith(("lower", "upper"))}
    bounds_before = torch.cat([p.detach().flatten().clone() for p in bound_parameters(student)])
    rep = run_block_recon(student, fp, calib, val, ReconConfig(iterations=40, batch=3, chunk=4))
    assert rep.blocks == len(block_paths(student)) == 4
    for b in rep.per_block:  # each block's loss over all cached patches falls, or is restored
        assert b["mse_after"] < b["mse_before"] or (b["restored"]
                                                    and b["mse_after"] == b["mse_before"]), b
    assert sum(not b["restored"] for b in rep.per_block) >= 3
    total_before = sum(b["mse_before"] for b in rep.per_block)
    assert sum(b["mse_after"] for b in rep.per_block) < 0.9 * total_before
    for k, v in student.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    bounds_after = torch.cat([p.detach().flatten() for p in bound_parameters(student)])
    if rep.kept:
        assert rep.val_psnr_after >= rep.val_psnr_before
        assert not torch.equal(bounds_after, bounds_before)
    else:  # the held-out PSNR fell: the DOBI bounds are back
        assert torch.equal(bounds_after, bounds_before)
    assert all(not p.requires_grad for p in bound_parameters(student))


def test_block_recon_is_seeded(tiny_swinir, one_thread):
    runs = []
    for _ in range(2):
        fp, student, calib, val = _setup(tiny_swinir)
        run_block_recon(student, fp, calib, val, ReconConfig(iterations=5, batch=2, chunk=3))
        runs.append(torch.cat([p.detach().flatten() for p in bound_parameters(student)]))
    assert torch.equal(runs[0], runs[1])


def test_recon_config_rejects_bad_values():
    with pytest.raises(ValueError, match="iterations"):
        ReconConfig(iterations=0)


def test_calibrate_runs_block_recon_before_dqc_and_checks_the_option(tiny_swinir, tmp_path,
                                                                      one_thread):
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from calibrate.api import CalibrationConfig
    from calibrate.calibfile import read_calibration
    from edge_sr.cli import main
    from edge_sr.errors import EdgeSRError

    ckpt = tmp_path / "tiny_x2.pth"
    torch.save({"params": tiny_swinir(2).state_dict()}, ckpt)
    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (136, 136, 3), dtype=np.uint8)).save(pool / f"{i}.png")
    out = tmp_path / "r.pt"
    r = CliRunner().invoke(main, ["calibrate", "--model", str(ckpt), "--bits", "4", "--method",
                                  "2dquant", "--block-recon", "3", "--iterations", "0", "--pool",
                                  str(pool), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    st = read_calibration(out)[1].stats
    rep = st["block_recon"]
    assert rep["blocks"] == 4 and len(rep["per_block"]) == 4
    # DQC ran 0 iterations, so its start (after the reconstruction) is the result
    assert st["dqc_iterations"] == 0
    assert st["val_psnr"] == st["val_psnr_init"] == pytest.approx(
        max(rep["val_psnr_before"], rep["val_psnr_after"]), abs=1e-9)
    with pytest.raises(EdgeSRError, match="--block-recon: needs DOBI bounds"):
        CalibrationConfig(model="m", bits=4, output="o", method="minmax", block_recon=5).validate()
    r = CliRunner().invoke(main, ["calibrate", "--model", str(ckpt), "--bits", "4",
                                  "--block-recon", "-1", "-o", str(out)])
    assert r.exit_code == 2 and "--block-recon" in r.output
