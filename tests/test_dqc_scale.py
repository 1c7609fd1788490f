"""DQC that scales: activation checkpointing per block and the lean STE keep the maths."""

from __future__ import annotations

import pytest
import torch

from calibrate.dobi import init_bounds
from calibrate.dqc import DQCConfig, block_paths, run_dqc
from calibrate.prepare import QuantRecipe, bound_parameters, prepare


def _run(tiny_swinir, recompute: bool, recipe: QuantRecipe):
    fp = tiny_swinir(2)
    g = torch.Generator().manual_seed(0)
    student = prepare(fp, recipe)
    init_bounds(student, torch.rand(4, 3, 16, 16, generator=g))
    val = (torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 32, 32, generator=g))

    def sample(it, n):
        return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + it))

    cfg = DQCConfig(iterations=4, batch=2, lr_patch=16, val_every=2, ckpt_every=100,
                    recompute=recompute)
    rep = run_dqc(student, fp, sample, val, cfg)
    return [p.detach().clone() for p in bound_parameters(student)], rep, student


def test_block_paths_name_every_transformer_block(tiny_swinir):
    paths = block_paths(tiny_swinir(2))
    assert paths == [f"layers.{i}.residual_group.blocks.{j}" for i in range(2) for j in range(2)]


def test_recompute_trains_the_same_bounds(tiny_swinir, one_thread):
    recipe = QuantRecipe(bits=3, rotate=("fc1",), weight_grid="channel")
    plain, rep_a, _ = _run(tiny_swinir, False, recipe)
    again, rep_b, student = _run(tiny_swinir, True, recipe)
    assert [h["val_psnr"] for h in rep_a.history] == [h["val_psnr"] for h in rep_b.history]
    for a, b in zip(plain, again):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    # the wrapper is removed afterwards: the student's blocks run their class forward again
    blk = student.get_submodule(block_paths(student)[0])
    assert "forward" not in vars(blk)


def test_relative_bound_lr_scales_each_quantizer_by_its_range(tiny_swinir):
    from calibrate.dqc import param_groups
    from calibrate.prepare import quantizers

    fp = tiny_swinir(2)
    student = prepare(fp, QuantRecipe(bits=4, weight_grid="channel"))
    init_bounds(student, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    groups = param_groups(student, DQCConfig(lr=1e-2, bound_lr="relative"))
    qs = [q for _, q in quantizers(student)]
    assert len(groups) == len(qs)
    for g, q in zip(groups, qs):
        rng = float((q.upper - q.lower).detach().abs().mean())
        assert g["lr"] == pytest.approx(1e-2 * rng) and g["params"] == [q.lower, q.upper]
    (absolute,) = param_groups(student, DQCConfig(lr=1e-2))
    assert "lr" not in absolute and len(absolute["params"]) == 2 * len(qs)
    with pytest.raises(ValueError, match="bound_lr"):
        DQCConfig(bound_lr="per-element")
