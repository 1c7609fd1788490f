"""NGswin: strict loading of the official checkpoints, shape logic, ONNX export, quant points, PSNR.

Logic tests use a tiny random NGswin; the real checkpoints (../shared/data/models) are used for
strict loading and for a crop PSNR pinned to values measured with this implementation. The full
Set5/Set14 reproduction of the data README's figures is in docs/results/ngswin.md.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_logits_in_place_change_nothing, perturb_parameters
from torch import nn

from edge_sr.data.images import load_image, mod_crop, to_tensor, to_uint8
from edge_sr.errors import EdgeSRError
from edge_sr.metrics import psnr_y
from edge_sr.models.base import ActSlot
from edge_sr.models.ngswin import ARCHITECTURE, CHECKPOINTS, NGswin, build, detect, pad_symmetric

TINY = dict(embed_dim=16, depths=(2, 1, 1), num_heads=(2, 2, 2), dec_dim=16, dec_depths=2,
            dec_num_heads=2, window_size=4)


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny ops: on a busy 2-core machine, OpenMP threads cost far more than they give."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_tiny_ngswin(scale: int = 2, seed: int = 0, **overrides) -> NGswin:
    """A tiny NGswin with seeded noise on every parameter (default init hides mistakes)."""
    torch.manual_seed(seed)
    model = NGswin(scale, **{**TINY, **overrides})
    return perturb_parameters(model, seed)


def _official(data_root: Path, scale: int) -> dict:
    return torch.load(data_root / "models" / f"NGswin_x{scale}.pth", map_location="cpu",
                      weights_only=True)


# -- loading the official checkpoints ------------------------------------------------------


@pytest.mark.parametrize("scale", [2, 3])
def test_official_checkpoint_loads_strictly(data_root: Path, scale: int) -> None:
    sd = _official(data_root, scale)
    model = build(sd)  # strict=True inside; raises on any missing or unexpected key
    assert model.scale == scale
    assert set(model.state_dict()) == set(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in sd.values())
    cfg = model.config()
    assert (cfg["embed_dim"], cfg["depths"], cfg["num_heads"]) == (64, [6, 4, 4], [6, 4, 4])
    assert (cfg["dec_dim"], cfg["dec_depths"], cfg["dec_num_heads"]) == (64, 6, 6)
    assert (cfg["ngrams"], cfg["window_size"], cfg["mlp_ratio"]) == ([2, 2, 2, 2], 8, 2.0)


def test_scale_mismatch_is_a_user_error(data_root: Path) -> None:
    with pytest.raises(EdgeSRError, match=r"x3 NGswin .*27 output channels.* scale 2"):
        build(_official(data_root, 3), scale=2)


def test_checkpoint_entries_match_shared_files(data_root: Path) -> None:
    from edge_sr.fileio import sha256_file

    assert [e.name for e in CHECKPOINTS] == ["ngswin-x2", "ngswin-x3"]
    for e in CHECKPOINTS:
        path = data_root / e.shared_relpath
        assert path.stat().st_size == e.size
        assert sha256_file(path) == e.sha256


def test_detect_tells_ngswin_from_swinir(tiny_swinir) -> None:
    ng = make_tiny_ngswin().state_dict()
    sw = tiny_swinir().state_dict()
    assert detect(ng) and ARCHITECTURE.detect(ng)
    assert not detect(sw)
    with pytest.raises(EdgeSRError, match="expected an NGswin state dict"):
        ARCHITECTURE.build(sw, None)


def test_tiny_round_trip_recovers_config() -> None:
    model = make_tiny_ngswin(scale=3, ngrams=(2, 3, 2, 1), mlp_ratio=1.5)
    rebuilt = build({"params": model.state_dict()})
    assert rebuilt.config() == model.config()
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_wrong_shapes_name_the_problem() -> None:
    sd = make_tiny_ngswin().state_dict()
    sd["encoder_layer1.blocks.0.attn.proj.weight"] = torch.zeros(16, 5)
    with pytest.raises(EdgeSRError, match="attn.proj.weight"):
        build(sd)


# -- padding and shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("pad", [0, 3, 7, 12])
def test_pad_symmetric_matches_numpy(pad: int) -> None:
    x = torch.arange(2 * 5 * 4, dtype=torch.float32).view(1, 2, 5, 4)
    want = np.pad(x.numpy(), ((0, 0), (0, 0), (0, pad), (0, pad + 1)), mode="symmetric")
    assert np.array_equal(pad_symmetric(x, pad, pad + 1).numpy(), want)


def test_size_requirements_and_padding() -> None:
    model = make_tiny_ngswin()
    req = model.size_requirements
    assert (req.multiple, req.minimum) == (16, 32)  # 4 * window, 8 * window
    assert model.padded_size(20, 33) == (32, 48)
    assert NGswin(2).size_requirements.multiple == 32 and NGswin(2).size_requirements.minimum == 64


@pytest.mark.parametrize("hw", [(5, 7), (32, 32), (37, 50)])
def test_any_input_size_is_padded_run_and_cropped(hw: tuple[int, int]) -> None:
    model = make_tiny_ngswin(scale=2)
    x = torch.rand(1, 3, *hw)
    hp, wp = model.padded_size(*hw)
    with torch.no_grad():
        y = model(x)
        y_ref = model(pad_symmetric(x, hp - hw[0], wp - hw[1]))
    assert y.shape == (1, 3, 2 * hw[0], 2 * hw[1])
    assert torch.equal(y, y_ref[:, :, : 2 * hw[0], : 2 * hw[1]])


def test_in_place_inference_equals_the_autograd_path() -> None:
    """The attention logits are updated in place only without autograd: both paths must agree
    bit for bit, and the autograd path must still reach the logit scale and bias table."""
    model = make_tiny_ngswin(scale=2)
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        y_fast = model(x)
    y = model(x)
    assert torch.equal(y_fast, y)
    y.square().mean().backward()
    attn = model.encoder_layer1.blocks[1].attn  # a shifted block: the mask term is used
    assert attn.logit_scale.grad is not None and attn.logit_scale.grad.abs().sum() > 0
    assert attn.relative_position_bias_table.grad.abs().sum() > 0


# -- quantization contract ------------------------------------------------------------------


def test_quant_points_official_layout() -> None:
    model = NGswin(2)  # the official configuration: 6 + 4 + 4 encoder + 6 decoder NSTBs
    points = model.quant_points()
    roles = Counter(p.role for p in points)
    assert roles == {r: 20 for r in ("qkv", "proj", "fc1", "fc2", "q", "k", "v", "attn_probs")}
    assert len({p.name for p in points}) == 160
    for p in points:
        mod = model.get_submodule(p.name)
        if p.kind == "linear":
            assert type(mod) is nn.Linear, p.name
        else:
            assert isinstance(mod, ActSlot) and mod.role == p.role, p.name
    # Every ActSlot is a listed point: the N-gram context's attention has none (it stays FP).
    slots = {n for n, m in model.named_modules() if isinstance(m, ActSlot)}
    assert slots == {p.name for p in points if p.kind == "act"}
    assert not any("ngram" in p.name for p in points)
    assert {p.name for p in points if p.long_tailed_input} == {
        p.name for p in points if p.role in ("attn_probs", "fc2")}


def test_feature_modules_give_stage_tensors() -> None:
    model = make_tiny_ngswin()
    names = model.feature_modules()
    assert names == ["encoder_layer1.blocks.1", "encoder_layer2.blocks.0",
                     "encoder_layer3.blocks.0", "norm"]
    shapes = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape))) for n in names]
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 48))
    for h in hooks:
        h.remove()
    assert shapes == {names[0]: (1, 32 * 48, 16), names[1]: (1, 16 * 24, 16),
                      names[2]: (1, 8 * 12, 16), "norm": (1, 32 * 48, 16)}


def test_prepare_makes_a_runnable_fake_quant_student() -> None:
    from calibrate.prepare import QuantRecipe, prepare

    model = make_tiny_ngswin()
    student = prepare(model, QuantRecipe(bits=8))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        y, y_fp = student(x), model(x)
    assert y.shape == y_fp.shape and torch.isfinite(y).all()


# -- export ---------------------------------------------------------------------------------


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    import onnxruntime as ort

    from edge_sr.onnx_export import export_fp_onnx

    model = make_tiny_ngswin(scale=3)
    path = export_fp_onnx(model, tmp_path / "ng.onnx", tile=(40, 36))  # padded inside to 48x48
    x = torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(3))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"lr": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert y.shape == (1, 3, 120, 108)
    assert np.abs(y - ref).max() <= 1e-4
    import onnx

    graph = onnx.load(str(path)).graph  # each qkv split in three (split_qkv), nothing left dead
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    assert not [n.name for n in graph.node if not any(o in used for o in n.output)]
    perms = [list(a.ints) for n in graph.node if n.op_type == "Transpose" for a in n.attribute]
    assert [0, 2, 1, 3] in perms and [2, 0, 3, 1, 4] not in perms
    ops = {n.op_type for n in graph.node}
    assert "Expand" not in ops  # F.normalize's (drop_shape_expands)
    assert "LpNormalization" in ops and "ReduceL2" not in ops  # and then lp_normalize


def test_onnx_split_qkv_splits_shared_weights_once(tmp_path: Path, monkeypatch) -> None:
    """NGswin's traced graph shares weights between MatMuls (``Identity``): split once, the file
    holds exactly as many float32 weight bytes as without the split."""
    import onnx

    import edge_sr.onnx_tidy as tidy_mod
    from edge_sr.onnx_export import export_fp_onnx

    def float_bytes(path):
        return sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT)

    model = make_tiny_ngswin(scale=2)
    split = export_fp_onnx(model, tmp_path / "split.onnx", tile=(48, 48))
    monkeypatch.setattr(tidy_mod, "split_qkv", lambda proto: 0)
    whole = export_fp_onnx(model, tmp_path / "whole.onnx", tile=(48, 48))
    assert float_bytes(split) == float_bytes(whole)


# -- accuracy on crops of Set5 (pinned to this implementation's full-model measurements) -----

# (image, LR crop top, left, size, Y-PSNR): measured 2026-11-27 with the official weights and this
# implementation (full model, crop = scale). The same code gives the data README's full-set figures
# to 4 decimals (docs/results/ngswin.md); 0.01 dB allows for BLAS rounding on other CPUs.
CROP_PSNR = {
    2: ("butterfly", 32, 32, 64, 35.5638),
    3: ("bird", 16, 16, 64, 38.6862),
}


@pytest.mark.parametrize("scale", [2, 3])
def test_psnr_on_set5_crop(data_root: Path, scale: int) -> None:
    name, top, left, size, want = CROP_PSNR[scale]
    bench = data_root / "benchmark" / "Set5"
    hr = mod_crop(load_image(bench / "HR" / f"{name}.png"), scale)
    lr = load_image(bench / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png")
    lr = lr[top: top + size, left: left + size]
    hr = hr[top * scale: (top + size) * scale, left * scale: (left + size) * scale]
    model = build(_official(data_root, scale))
    with torch.no_grad():
        sr = to_uint8(model(to_tensor(lr)))
    assert psnr_y(sr, hr, crop=scale) == pytest.approx(want, abs=0.01)


def test_logits_updated_in_place_under_autograd_are_bitwise_the_same(monkeypatch):
    """NGswin scales, biases and masks its attention logits in place unless autograd needs the
    logit scale or the bias table: the same outputs and input gradients, bit for bit."""
    import edge_sr.models.ngswin.blocks as blocks

    x = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(3))
    assert_logits_in_place_change_nothing(make_tiny_ngswin(), x, blocks, monkeypatch)


def test_unit_rows_is_f_normalize_and_close_to_it_in_bfloat16() -> None:
    import torch.nn.functional as F

    from edge_sr.models.ngswin.blocks import unit_rows

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(8, 16, 3, 2, 10, generator=g).permute(2, 0, 3, 1, 4)  # strided, as in use
    x = qkv[0].clone()
    x[0, 0, 0] = 0.0  # a zero row stays zero (norm below eps)
    for dt in (torch.float32, torch.float16):
        assert torch.equal(unit_rows(qkv[0].to(dt)), F.normalize(qkv[0].to(dt), dim=-1))
    ref = x.clone().requires_grad_(True)
    F.normalize(ref, dim=-1).mul(torch.arange(10.0)).sum().backward()
    h = x.bfloat16().requires_grad_(True)
    y = unit_rows(h)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.all(y[0, 0, 0] == 0)
    # within bfloat16's rounding (~2^-8) of a unit-norm row, as F.normalize in bfloat16 is
    bf = F.normalize(x.bfloat16(), dim=-1).float()
    err = (y.float() - F.normalize(x, dim=-1)).abs().max()
    assert err < 8e-3 and err <= 2 * (bf - F.normalize(x, dim=-1)).abs().max()
    y.float().mul(torch.arange(10.0)).sum().backward()
    gh, gr = h.grad.float()[1:], ref.grad[1:]  # the zero row's gradient is 1/eps-sized
    assert (gh - gr).abs().max() < 0.05 * gr.abs().max()


def test_unigrams_run_in_float32_under_cpu_autocast() -> None:
    from edge_sr.models.ngswin.blocks import NGramContext

    torch.manual_seed(0)
    ctx = NGramContext(dim=8, window_size=4, ngram=2, num_heads=2).requires_grad_(False)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    plain = ctx.unigram_embed(x)
    assert torch.equal(ctx.unigrams(x), plain)  # float32: the module call itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = ctx.unigrams(x)
        out = ctx(x)
    assert u.dtype == torch.float32 and torch.equal(u, plain)  # not rounded to bfloat16
    assert out.shape == (2, 8, 4, 4)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
