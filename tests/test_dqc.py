"""DQC: only bounds train, a tiny run lowers the distillation loss, the released-loss switch and
resume."""

from __future__ import annotations

import pytest
import torch

from calibrate.dobi import init_bounds
from calibrate.dqc import DQCConfig, feature_loss, output_loss, run_dqc
from calibrate.prepare import QuantRecipe, bound_parameters, prepare


def _setup(tiny_swinir, bits=2):
    fp = tiny_swinir(2)
    g = torch.Generator().manual_seed(0)
    calib = torch.rand(4, 3, 16, 16, generator=g)
    student = prepare(fp, QuantRecipe(bits=bits))
    init_bounds(student, calib)
    val = (torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 32, 32, generator=g))

    def sample(it, n):
        return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + it))

    return fp, student, sample, val


def _distill_loss(student, teacher, x):
    with torch.no_grad():
        return float(output_loss(student(x), teacher(x), "fixed"))


def test_tiny_dqc_lowers_loss_and_trains_only_bounds(tiny_swinir, one_thread):
    fp, student, sample, val = _setup(tiny_swinir, bits=4)
    weights = {k: v.clone() for k, v in student.state_dict().items()
               if not k.endswith(("lower", "upper"))}
    x = sample(0, 8)
    before = _distill_loss(student, fp, x)
    bounds_before = torch.stack([p.detach().clone() for p in bound_parameters(student)])
    cfg = DQCConfig(iterations=30, batch=4, lr_patch=16, val_every=10, ckpt_every=100, lr=1e-3)
    rep = run_dqc(student, fp, sample, val, cfg)
    assert rep.iterations == 30 and len(rep.history) == 4
    assert _distill_loss(student, fp, x) <= before
    after = torch.stack([p.detach() for p in bound_parameters(student)])
    for k, v in student.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    if rep.best_iteration > 0:
        assert not torch.equal(after, bounds_before)
        assert _distill_loss(student, fp, x) < before


def test_a_redirected_log_hears_from_dqc_now_and_then(tiny_swinir, one_thread, monkeypatch,
                                                      caplog):
    """No bar in a log file: DQC says where it is every LOG_EVERY_S seconds instead."""
    import logging

    import calibrate.dqc as dqc
    import edge_sr.logutil as logutil

    fp, student, sample, val = _setup(tiny_swinir, bits=4)
    monkeypatch.setattr(dqc, "progress_disabled", lambda: True)
    monkeypatch.setattr(logutil, "LOG_EVERY_S", 0.0)
    cfg = DQCConfig(iterations=3, batch=1, lr_patch=16, val_every=3, ckpt_every=100)
    with caplog.at_level(logging.INFO, logger="calibrate.dqc"):
        run_dqc(student, fp, sample, val, cfg)
    lines = [r.getMessage() for r in caplog.records if " of 3, " in r.getMessage()]
    assert [m.split(",")[0] for m in lines] == [f"DQC: iteration {i} of 3" for i in (1, 2, 3)]
    assert "best held-out" in lines[-1]


def test_patience_ends_a_run_whose_held_out_psnr_stopped_rising(tiny_swinir, one_thread,
                                                                monkeypatch):
    """``patience``: after that many validations in a row without a new best the run ends,
    complete, with the best-validated bounds; 0 runs every iteration."""
    import calibrate.dqc as dqc

    fp, student, sample, val = _setup(tiny_swinir, bits=4)
    start = {k: v.clone() for k, v in dqc.bounds_state(student).items()}
    scores = iter([30.0, 29.9, 30.0, 29.8, 29.7, 29.6, 29.5])  # the start stays the best
    monkeypatch.setattr(dqc, "val_psnr", lambda *a: next(scores))
    cfg = DQCConfig(iterations=6, batch=1, lr_patch=16, val_every=1, ckpt_every=100, lr=1e-2,
                    patience=2)
    rep = run_dqc(student, fp, sample, val, cfg)
    assert (rep.converged_at, rep.iterations, rep.best_iteration, rep.stopped_at) == (2, 2, 0, None)
    assert [h["iteration"] for h in rep.history] == [0, 1, 2]
    assert all(torch.equal(v, start[k]) for k, v in dqc.bounds_state(student).items())
    scores = iter([30.0, 29.9, 29.8, 29.7, 29.6, 29.5, 29.4])
    rep = run_dqc(student, fp, sample, val, DQCConfig(**{**cfg.__dict__, "patience": 0}))
    assert rep.converged_at is None and rep.iterations == 6
    with pytest.raises(ValueError, match="patience must be >= 0"):
        DQCConfig(patience=-1)
    # build's cpu budget stops (measured: docs/results/beyond.md "DQC patience"); fast and the
    # paper's run every iteration; --patience overrides
    from calibrate.api import CalibrationConfig

    def patience(budget, p=None):
        return CalibrationConfig(model="x", bits=4, output="-", budget=budget,
                                 patience=p).dqc_config(fp).patience

    assert (patience("cpu"), patience("fast"), patience("paper"), patience("cpu", 0)) == (5, 0, 0, 0)


def test_training_loss_decreases(tiny_swinir, one_thread):
    # 4 bits and lr 1e-3: at 2 bits the tiny random model's loss is too jagged for 25 steps
    fp, student, sample, val = _setup(tiny_swinir, bits=4)
    x = sample(0, 8)
    params = bound_parameters(student)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.99))
    losses = []
    for _ in range(25):
        with torch.no_grad():
            t = fp(x)
        loss = output_loss(student(x), t, "fixed")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0]


def test_feature_loss_variants():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    # fixed: per-sample unit-norm features, squared distance summed per sample, batch mean
    a = fs / fs.reshape(3, -1).norm(dim=1).view(3, 1, 1)
    b = ft / ft.reshape(3, -1).norm(dim=1).view(3, 1, 1)
    assert float(feature_loss(fs, ft, "fixed")) == pytest.approx(float(((a - b) ** 2).sum() / 3))
    assert float(feature_loss(fs, fs * 7, "fixed")) == pytest.approx(0, abs=1e-10)
    # released: (B,1,1,1) norms broadcast to (B,B,N,C), MSE divided again by its numel
    ns = fs.reshape(3, -1).norm(dim=1).view(3, 1, 1, 1)
    nt = ft.reshape(3, -1).norm(dim=1).view(3, 1, 1, 1)
    ref = ((fs / ns - ft / nt) ** 2).mean() / (3 * 3 * 5 * 4)
    assert float(feature_loss(fs, ft, "released")) == pytest.approx(float(ref))
    out_s, out_t = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert float(output_loss(out_s, out_t, "fixed")) == 1.0
    assert float(output_loss(out_s, out_t, "released")) == pytest.approx(1 / 48)


def test_resume_continues_to_the_same_bounds(tiny_swinir, one_thread, tmp_path):
    cfg = DQCConfig(iterations=6, batch=2, lr_patch=16, val_every=3, ckpt_every=2,
                    feature_weight=5.0)
    fp, full, sample, val = _setup(tiny_swinir)
    run_dqc(full, fp, sample, val, cfg)
    fp, part, sample, val = _setup(tiny_swinir)
    state = tmp_path / "state.pt"
    short = DQCConfig(**{**cfg.__dict__, "iterations": 6})
    calls = {"n": 0}

    def interrupting(it, n):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return sample(it, n)

    with pytest.raises(KeyboardInterrupt):
        run_dqc(part, fp, interrupting, val, short, state_path=state)
    assert torch.load(state, weights_only=False)["iteration"] == 4
    _, resumed, _, _ = _setup(tiny_swinir)
    rep = run_dqc(resumed, fp, sample, val, cfg, state_path=state, resume=True)
    assert (rep.iterations, rep.resumed_at) == (6, 4)
    for p, q in zip(bound_parameters(full), bound_parameters(resumed)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_with_another_config_is_an_error(tiny_swinir, one_thread, tmp_path):
    from edge_sr.errors import EdgeSRError

    fp, student, sample, val = _setup(tiny_swinir)
    state = tmp_path / "state.pt"
    run_dqc(student, fp, sample, val, DQCConfig(iterations=2, batch=1, lr_patch=16, val_every=2,
                                                ckpt_every=2), state_path=state)
    with pytest.raises(EdgeSRError, match=r"--resume: the interrupted run's DQC \(.*\) used "
                                          r"other settings: iterations 2 there, 4 here; "):
        run_dqc(student, fp, sample, val, DQCConfig(iterations=4, batch=1, lr_patch=16),
                state_path=state, resume=True)
    # a state saved before a setting existed (here qdrop) resumes: it ran with the default
    from calibrate.dqc import check_resumable, read_resume_state

    st = read_resume_state(state)
    del st["config"]["qdrop"]
    check_resumable(state, DQCConfig(iterations=2, batch=1, lr_patch=16, val_every=2,
                                     ckpt_every=2), st)
    with pytest.raises(EdgeSRError, match="qdrop 0.0 there, 0.5 here"):
        check_resumable(state, DQCConfig(iterations=2, batch=1, lr_patch=16, val_every=2,
                                         ckpt_every=2, qdrop=0.5), st)


def test_device_option_is_checked_before_any_work(tmp_path):
    import torch

    from calibrate.api import CalibrationConfig, calibrate
    from edge_sr.errors import EdgeSRError

    with pytest.raises(EdgeSRError, match="--device: expected cpu, cuda or cuda:N, got 'tpu'"):
        calibrate(CalibrationConfig(model="x", bits=4, output=tmp_path / "c.pt", device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(EdgeSRError, match="--device cuda: PyTorch sees no CUDA device"):
            calibrate(CalibrationConfig(model="x", bits=4, output=tmp_path / "c.pt",
                                        device="cuda"))


def test_deadline_stops_validates_saves_and_resumes(tiny_swinir, one_thread, tmp_path):
    """A deadline stops DQC after the step that passes it: that step is validated and saved,
    the stop is reported, and --resume continues to the run's end."""
    cfg = DQCConfig(iterations=6, batch=2, lr_patch=16, val_every=5, ckpt_every=5)
    fp, student, sample, val = _setup(tiny_swinir)
    state = tmp_path / "state.pt"
    clock = {"n": 0}

    def counting(it, n):
        clock["n"] += 1
        return sample(it, n)

    import time as _time

    # a deadline already past: the first step ends after it
    rep = run_dqc(student, fp, counting, val, cfg, state_path=state,
                  deadline=_time.perf_counter())
    assert (rep.stopped_at, rep.iterations, clock["n"]) == (1, 1, 1)
    assert [h["iteration"] for h in rep.history] == [0, 1]
    saved = torch.load(state, weights_only=False)
    assert saved["iteration"] == 1
    rep2 = run_dqc(student, fp, sample, val, cfg, state_path=state, resume=True)
    # the report counts every iteration the bounds trained for, the resumed part apart
    assert rep2.stopped_at is None and (rep2.iterations, rep2.resumed_at) == (6, 1)
    assert [h["iteration"] for h in rep2.history] == [0, 1, 5, 6]
    # the clock carries over: history and report count the interrupted run's seconds too
    secs = [h["seconds"] for h in rep2.history[1:]]
    assert secs == sorted(secs) and secs[0] == rep.history[-1]["seconds"]
    # the saved clock, not the first report's: that one also counts the save itself and what
    # followed it, which a resumed run cannot know (flaky on a loaded CI machine when compared)
    assert rep2.seconds > saved["seconds"] > 0 and rep.seconds >= saved["seconds"]


def test_weight_lr_trains_weights_not_teacher(tiny_swinir, one_thread):
    """``weight_lr > 0`` (beyond the paper): the quantized linears' weights and biases train
    with the bounds, the FP teacher's do not, and the best state carries the weights."""
    from calibrate.dqc import linear_parameters, param_groups, weight_step

    fp, student, sample, val = _setup(tiny_swinir, bits=4)
    teacher = {k: v.clone() for k, v in fp.state_dict().items()}
    lin = {id(p): p.detach().clone() for _, ps in linear_parameters(student) for p in ps}
    cfg = DQCConfig(iterations=20, batch=4, lr_patch=16, val_every=1, ckpt_every=100, lr=1e-3,
                    weight_lr=0.5)
    groups = param_groups(student, cfg)
    m0, ps0 = linear_parameters(student)[0]
    g = next(g for g in groups if g["params"][0] is ps0[0])
    assert g["lr"] == pytest.approx(0.5 * weight_step(m0))
    rep = run_dqc(student, fp, sample, val, cfg)
    assert all(torch.equal(v, fp.state_dict()[k]) for k, v in teacher.items())
    moved = [not torch.equal(p.detach(), lin[id(p)]) for _, ps in linear_parameters(student)
             for p in ps]
    if rep.best_iteration > 0:
        assert all(moved)
    else:  # the DOBI start was best: the weights are restored with the bounds
        assert not any(moved)
    assert not any(p.requires_grad for p in student.parameters())
    with pytest.raises(ValueError, match="weight_lr"):
        DQCConfig(weight_lr=-1.0)


def test_bounds_never_cross_even_with_a_huge_step(tiny_swinir, one_thread):
    """A step that would put upper at or below lower (no grid left) stops at a sliver of the
    starting range, so the calibrated model still exports (the demo once hit upper < lower)."""
    from calibrate.dqc import MIN_RANGE_FRACTION
    from calibrate.export_qdq import ExportConfig, build_qdq
    from calibrate.prepare import quantizers

    fp, student, sample, val = _setup(tiny_swinir, bits=4)
    start = {n: float((q.upper - q.lower).abs().min()) for n, q in quantizers(student)}
    cfg = DQCConfig(iterations=4, batch=2, lr_patch=16, val_every=100, ckpt_every=100, lr=50.0)
    run_dqc(student, fp, sample, val, cfg)
    for n, q in quantizers(student):
        gap = float((q.upper - q.lower).min())
        assert gap >= MIN_RANGE_FRACTION * start[n] * 0.9, n  # (float32 rounding at |l| >> u - l)
    build_qdq(student, ExportConfig(target="ort", tile=(16, 16)))  # no ValueError


def test_resume_reuses_the_interrupted_runs_measured_choices(tmp_path, monkeypatch):
    """The per-site choices (rotation, INT4 kept layers, per-site bits) are measured once and
    kept beside the DQC state: ``--resume`` trains the student it saved, not a re-measured one."""
    from dataclasses import replace

    import calibrate.api as api
    from edge_sr.errors import EdgeSRError

    cfg = api.CalibrationConfig(model="m", bits=4, output=tmp_path / "c.pt", method="edge-sr")
    state = tmp_path / "c.pt.dqc-state.pt"
    measured = replace(cfg.quant_recipe(), kept_int4=("body.0",))

    def measure(cfg_, fp_model, data, stats):
        stats["kept_int4_choice"] = {"body.0": 0.001}
        return measured, None

    monkeypatch.setattr(api, "resolve_recipe", measure)
    stats: dict = {}
    assert api._resolved_recipe(cfg, None, None, stats, state) == (measured, None)
    assert api.recipe_state_path(state).exists()

    def must_not_measure(*a):
        raise AssertionError("a resumed run measured its choices again")

    monkeypatch.setattr(api, "resolve_recipe", must_not_measure)
    again: dict = {}
    recipe, smoothing = api._resolved_recipe(replace(cfg, resume=True), None, None, again, state)
    assert recipe == measured and smoothing is None
    assert again == {"kept_int4_choice": {"body.0": 0.001}}
    other = replace(cfg, resume=True, bits=3)
    with pytest.raises(EdgeSRError, match=r"--resume: the interrupted run .*recipe.pt\) used "
                                          r"another recipe: bits 4 there, 3 here$"):
        api._resolved_recipe(other, None, None, {}, state)


def test_a_damaged_or_foreign_state_file_is_one_clear_error(tmp_path):
    from calibrate.dqc import check_resumable, read_resume_state
    from edge_sr.errors import EdgeSRError

    bad = tmp_path / "c.pt.dqc-state.pt"
    bad.write_text("garbage")
    with pytest.raises(EdgeSRError, match=r"--resume: .*c\.pt\.dqc-state\.pt: expected the state "
                                          r"an interrupted edge-sr calibrate saved, could not "
                                          r"read it \(\w+\); delete it"):
        check_resumable(bad, DQCConfig())
    torch.save({"weights": 1}, bad)  # a readable file, but not ours
    with pytest.raises(EdgeSRError, match="found another file; delete it"):
        read_resume_state(bad)
