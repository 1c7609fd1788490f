"""DQC that scales: activation checkpointing per block and the lean STE keep the maths."""

from __future__ import annotations

import pytest
import torch

from calibrate import fused_fq
from calibrate.dobi import init_bounds
from calibrate.dqc import DQCConfig, block_paths, run_dqc
from calibrate.prepare import QuantRecipe, bound_parameters, prepare


def _run(tiny_swinir, recompute: bool, recipe: QuantRecipe, precision: str = "fp32"):
    fp = tiny_swinir(2)
    g = torch.Generator().manual_seed(0)
    student = prepare(fp, recipe)
    init_bounds(student, torch.rand(4, 3, 16, 16, generator=g))
    val = (torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 32, 32, generator=g))

    def sample(it, n):
        return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + it))

    cfg = DQCConfig(iterations=4, batch=2, lr_patch=16, val_every=2, ckpt_every=100,
                    recompute=recompute, precision=precision)
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


def test_fused_fake_quant_trains_the_same_bounds_as_the_eager_ops(tiny_swinir, one_thread,
                                                                  monkeypatch):
    from calibrate import fused_fq

    if fused_fq.library() is None:
        pytest.skip("no C compiler here: the eager ops run anyway")
    recipe = QuantRecipe(bits=3)
    fused, rep_a, _ = _run(tiny_swinir, False, recipe)
    monkeypatch.setitem(fused_fq._state, "lib", None)
    eager, rep_b, _ = _run(tiny_swinir, False, recipe)
    # the forward is bit-identical; the bound gradients' sums differ in float rounding only
    for a, b in zip(fused, eager):  # (Adam divides by |g|: tiny sums' differences grow a bit)
        assert torch.allclose(a, b, rtol=0, atol=1e-4)
    for ha, hb in zip(rep_a.history, rep_b.history):
        assert ha["val_psnr"] == pytest.approx(hb["val_psnr"], abs=1e-3)


def test_bf16_autocast_runs_the_gemms_in_bf16_and_validates_in_fp32(tiny_swinir, one_thread):
    from calibrate.dqc import DQCStep

    recipe = QuantRecipe(bits=4)
    _, rep_a, _ = _run(tiny_swinir, False, recipe)
    _, rep_b, student = _run(tiny_swinir, False, recipe, "bf16")
    # validation is float32: the DOBI start scores the same; training lands close
    assert rep_a.history[0]["val_psnr"] == rep_b.history[0]["val_psnr"]
    assert abs(rep_a.best_val_psnr - rep_b.best_val_psnr) < 0.05
    assert all(p.dtype == torch.float32 for p in bound_parameters(student))
    # inside a bf16 step the linears run in bfloat16; the fake quantizers compute in float32 and
    # hand their GEMM bfloat16 (fused kernels: rounded once) or float32 (eager ops)
    seen = {}
    lin = next(m for m in student.modules() if type(m).__name__ == "QuantLinear")

    def record(name):
        def hook(mod, inp, out) -> None:
            seen.setdefault(name, out.dtype)
        return hook

    hooks = [lin.register_forward_hook(record("linear")),
             lin.act_quantizers[0].register_forward_hook(record("quantizer"))]
    step = DQCStep(student, tiny_swinir(2), DQCConfig(iterations=1, batch=2, lr_patch=16,
                                                      precision="bf16"))
    loss = step.step(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)))
    step.close()
    for h in hooks:
        h.remove()
    fq_out = torch.bfloat16 if fused_fq.library() is not None else torch.float32
    assert seen == {"linear": torch.bfloat16, "quantizer": fq_out}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_dqc_precision_is_checked():
    from calibrate.api import CalibrationConfig
    from edge_sr.errors import EdgeSRError

    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        DQCConfig(precision="fp16")
    with pytest.raises(EdgeSRError, match="--dqc-precision: expected one of fp32, bf16"):
        CalibrationConfig(model="m", bits=4, output="o", dqc_precision="fp16").validate()


def test_qdrop_keeps_a_share_of_activations_fp_while_dqc_trains_only(tiny_swinir, one_thread):
    """QDrop (beyond the paper): during a DQC step each activation element stays FP with
    probability ``qdrop``, weights are always quantized, validation quantizes everything, and a
    recomputed block (checkpointing) draws the same masks as the forward."""
    from calibrate.dqc import DQCStep
    from calibrate.prepare import activation_quantizers, quantizers
    from calibrate.quantizer import BoundFakeQuantizer

    q = BoundFakeQuantizer(2)
    q.set_bounds(-1.0, 1.0)
    x = torch.rand(200_000) * 2 - 1
    assert float((q(x) == x).float().mean()) < 0.01  # 4 levels: almost no value is on the grid
    q.drop = 0.3
    torch.manual_seed(0)
    kept = float((q(x) == x).float().mean())
    assert kept == pytest.approx(0.3, abs=0.01)

    recipe = QuantRecipe(bits=3, rotate=("fc1",), weight_grid="channel")
    student = prepare(tiny_swinir(2), recipe)
    acts = activation_quantizers(student)
    weights = [q for _, q in quantizers(student) if all(q is not a for a in acts)]
    assert acts and weights and all(w.per_channel for w in weights)
    # the drop is set for the step (forward and backward) and only on activations
    seen = []
    w0 = weights[0]
    init_bounds(student, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    hook = w0.register_forward_hook(lambda m, i, o: seen.append((m.drop, acts[0].drop)))
    step = DQCStep(student, tiny_swinir(2), DQCConfig(batch=2, lr_patch=16, qdrop=0.5))
    step.step(torch.rand(2, 3, 16, 16))
    step.close()
    hook.remove()
    assert seen == [(0.0, 0.5)] and all(a.drop == 0.0 for a in acts)

    with pytest.raises(ValueError, match="qdrop"):
        DQCConfig(qdrop=1.0)


def test_qdrop_with_recompute_trains_the_same_bounds(tiny_swinir, one_thread):
    """Checkpointing restores the generator's state, so the recomputed blocks draw the same
    QDrop masks as their forward: the same bounds as without recompute."""
    def run(recompute, qdrop=0.5):
        torch.manual_seed(0)
        fp = tiny_swinir(2)
        student = prepare(fp, QuantRecipe(bits=3))
        init_bounds(student, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
        val = (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
               torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))

        def sample(it, n):
            return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + it))

        cfg = DQCConfig(iterations=3, batch=2, lr_patch=16, val_every=3, ckpt_every=100,
                        recompute=recompute, qdrop=qdrop)
        run_dqc(student, fp, sample, val, cfg)
        return [p.detach().clone() for p in bound_parameters(student)]

    plain, again = run(False), run(True)
    for a, b in zip(plain, again):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    # and QDrop changes what DQC learns (the masks matter)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, run(False, qdrop=0.0)))
