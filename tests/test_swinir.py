"""SwinIR-light against an independent implementation (spandrel's copy of the official code).

Padding is the one place the two legitimately differ: spandrel's ``check_image_size`` pads with
``reflect`` (edge pixel not repeated), the official test script (and edge-sr) pads with a flipped
copy (edge pixel repeated). So on sizes that are not multiples of the window we give spandrel the
input already flip-padded to a multiple of 8 (its own padding is then a no-op) and crop its output;
that is exactly what the official script feeds the network.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from edge_sr.errors import EdgeSRError
from edge_sr.models import detect_architecture, swinir_from_state_dict
from edge_sr.models.base import pad_flip
from edge_sr.models.swinir import infer_swinir_config

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = [(16, 16), (24, 40), (13, 21), (30, 17)]  # the last three are not multiples of 8


def _spandrel_swinir():
    """spandrel's SwinIR class, even when spandrel is installed without its own dependencies.

    ``import spandrel`` needs safetensors; the architecture file needs only torch. Without the
    dependencies we import the file under a bare package stub and remove the stub afterwards.
    """
    target = "spandrel.architectures.SwinIR.__arch.SwinIR"
    try:
        return importlib.import_module(target).SwinIR
    except ModuleNotFoundError as e:
        if e.name == "spandrel" or importlib.util.find_spec("spandrel") is None:
            pytest.skip("spandrel is not installed (test-only dependency)")
    spec = importlib.util.find_spec("spandrel")
    saved = {k: v for k, v in sys.modules.items() if k == "spandrel" or k.startswith("spandrel.")}
    stub = types.ModuleType("spandrel")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["spandrel"] = stub
    try:
        return importlib.import_module(target).SwinIR
    finally:
        for k in [k for k in sys.modules if k == "spandrel" or k.startswith("spandrel.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _spandrel_twin(ours):
    cfg = ours.config()
    SwinIR = _spandrel_swinir()
    ref = SwinIR(img_size=64, in_chans=3, embed_dim=cfg["embed_dim"], depths=cfg["depths"],
                 num_heads=cfg["num_heads"], window_size=cfg["window_size"],
                 mlp_ratio=cfg["mlp_ratio"], upscale=cfg["scale"], img_range=1.0,
                 upsampler="pixelshuffledirect", resi_connection="1conv", drop_path_rate=0.0)
    result = ref.load_state_dict(ours.state_dict(), strict=False)
    # Only buffers may be missing on our side: spandrel stores masks/indices, we recompute them.
    assert not result.unexpected_keys
    assert result.missing_keys, "spandrel should hold the attn_mask/relative_position_index buffers"
    assert all(k.endswith(("attn_mask", "relative_position_index")) for k in result.missing_keys)
    return ref.eval()


@pytest.mark.parametrize("scale", [2, 3])
def test_matches_spandrel(tiny_swinir, scale):
    torch.manual_seed(scale)
    ours = tiny_swinir(scale, seed=scale)
    ref = _spandrel_twin(ours)
    for h, w in SIZES:
        x = torch.rand(1, 3, h, w)
        padded = pad_flip(x, (-h) % 8, (-w) % 8)
        with torch.no_grad():
            got = ours(x)
            want = ref(padded)[..., : h * scale, : w * scale]
        assert got.shape == (1, 3, h * scale, w * scale)
        assert (got - want).abs().max().item() < 1e-5, (h, w)
        # The outputs are far from trivial, so agreement means something.
        assert got.std().item() > 1e-3


def test_spandrel_keys_are_the_official_keys(tiny_swinir):
    ours = tiny_swinir(2)
    ref = _spandrel_twin(ours)
    buffers = ("attn_mask", "relative_position_index")
    ref_learned = {k for k in ref.state_dict() if not k.endswith(buffers)}
    assert ref_learned == set(ours.state_dict())


def test_pad_is_flip_then_crop(tiny_swinir):
    """A non-multiple input gives the same pixels as the manually flip-padded input, cropped."""
    model = tiny_swinir(2)
    x = torch.rand(1, 3, 13, 21)
    with torch.no_grad():
        direct = model(x)
        manual = model(pad_flip(x, 3, 3))[..., :26, :42]
    assert torch.equal(direct, manual)


def test_flip_padding_repeats_the_edge_pixel():
    x = torch.arange(5.0).view(1, 1, 5, 1)
    assert pad_flip(x, 3, 0).flatten().tolist() == [0, 1, 2, 3, 4, 4, 3, 2]


@pytest.mark.parametrize("cfg", [
    dict(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=8),
    dict(scale=3, embed_dim=16, depths=(2, 1, 3), num_heads=(4, 2, 1), window_size=4),
    dict(scale=4, embed_dim=8, depths=(1,), num_heads=(2,), window_size=8, mlp_ratio=4.0),
])
def test_config_inferred_from_tensors(tiny_swinir, cfg):
    model = tiny_swinir(**cfg)
    inferred = infer_swinir_config(model.state_dict())
    assert inferred == {**dict(mlp_ratio=2.0, in_chans=3), **cfg}
    rebuilt = swinir_from_state_dict(model.state_dict())
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_rejects_classical_swinir(tiny_swinir):
    sd = tiny_swinir(2).state_dict()
    sd["conv_before_upsample.0.weight"] = torch.zeros(64, 12, 3, 3)
    sd["conv_last.weight"] = torch.zeros(3, 64, 3, 3)
    assert detect_architecture(sd).name == "swinir-light"  # recognised as SwinIR, then refused
    with pytest.raises(EdgeSRError, match="classical.*not SwinIR-light"):
        swinir_from_state_dict(sd)


def test_export_has_no_window_loop(tiny_swinir):
    """Window partitioning is reshapes: the traced graph size does not grow with the image."""
    model = tiny_swinir(2)

    def n_nodes(h, w):
        with torch.no_grad():
            model(torch.rand(1, 3, h, w))
            graph = torch.jit.trace(model, torch.rand(1, 3, h, w), check_trace=False).graph
        return len(list(graph.nodes()))

    assert n_nodes(16, 16) == n_nodes(32, 48)


def test_half_precision_runs_with_a_shift_mask(tiny_swinir):
    """FP16 (the CUDA backend's default): the shifted-window mask follows the scores' dtype
    (a float32 mask promoted FP16 scores and broke the next matmul on the H200 run)."""
    m = tiny_swinir(2).eval()
    x = torch.rand(1, 3, 20, 28)  # padded, several windows, shifted blocks
    with torch.no_grad():
        ref = m(x)
        half = m.half()(x.half()).float()
    assert half.shape == ref.shape
    assert float((half - ref).abs().max()) < 2e-2


def test_logits_updated_in_place_under_autograd_are_bitwise_the_same(tiny_swinir, monkeypatch):
    """The attention logits are scaled, biased and masked in place whenever autograd does not
    need the bias table (a DQC student, the FP input-gradient backward): same outputs and
    gradients as the out-of-place ops, bit for bit."""
    from conftest import assert_logits_in_place_change_nothing

    import edge_sr.models.swinir as swinir_mod

    x = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(3))
    assert_logits_in_place_change_nothing(tiny_swinir(2), x, swinir_mod, monkeypatch)
