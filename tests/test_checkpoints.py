"""The checkpoint registry: formats the loader accepts, resolution order, verification, errors."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
import torch
from click.testing import CliRunner

from edge_sr import checkpoints as ck
from edge_sr.checkpoints import list_checkpoints, load_model, resolve_checkpoint
from edge_sr.errors import EdgeSRError
from edge_sr.models.base import CheckpointEntry

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No user cache, no $EDGE_SR_MODELS, no downloads, unless a test sets them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGE_SR_MODELS", raising=False)
    monkeypatch.setenv("EDGE_SR_OFFLINE", "1")


def _same_outputs(a, b):
    x = torch.rand(1, 3, 11, 9)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def _with_buffers(sd):
    """Add buffers the way the official release stores them (values are irrelevant to us)."""
    out = dict(sd)
    out["layers.0.residual_group.blocks.0.attn.relative_position_index"] = torch.zeros(64, 64)
    out["layers.0.residual_group.blocks.1.attn_mask"] = torch.zeros(64, 64, 64)
    return out


@pytest.mark.parametrize("wrap", ["params", "params_ema", "bare", "buffers", "module"])
def test_loader_accepts_official_variants(tiny_swinir, tmp_path, wrap):
    model = tiny_swinir(3, seed=4)
    sd = model.state_dict()
    obj = {"params": {"params": sd}, "params_ema": {"params_ema": sd}, "bare": sd,
           "buffers": {"params": _with_buffers(sd)},
           "module": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    assert (loaded.arch, loaded.scale, loaded.name) == ("swinir-light", 3, str(tmp_path / "m.pth"))
    assert not loaded.model.training
    assert _same_outputs(loaded.model, model)


def test_params_ema_preferred_like_the_official_script(tiny_swinir, tmp_path):
    a, b = tiny_swinir(2, seed=1), tiny_swinir(2, seed=2)
    torch.save({"params": a.state_dict(), "params_ema": b.state_dict()}, tmp_path / "m.pth")
    assert _same_outputs(load_model(tmp_path / "m.pth").model, b)


def test_scale_mismatch_names_file_and_channels(tiny_swinir, tmp_path):
    torch.save({"params": tiny_swinir(3).state_dict()}, tmp_path / "x3.pth")
    assert load_model(tmp_path / "x3.pth", scale=3).scale == 3
    msg = r"x3\.pth is x3 \(upsample\.0\.weight has 27 output channels\) but --scale 2"
    with pytest.raises(EdgeSRError, match=msg):
        load_model(tmp_path / "x3.pth", scale=2)


def test_classical_swinir_is_refused(tmp_path):
    # The key layout of the classical SwinIR-M (embed 180, pixelshuffle upsampler), tiny depth.
    sd = {"conv_first.weight": torch.zeros(180, 3, 3, 3), "conv_after_body.weight":
          torch.zeros(180, 180, 3, 3), "conv_before_upsample.0.weight": torch.zeros(64, 180, 3, 3),
          "upsample.0.weight": torch.zeros(256, 64, 3, 3), "conv_last.weight":
          torch.zeros(3, 64, 3, 3),
          "layers.0.residual_group.blocks.0.attn.relative_position_bias_table":
          torch.zeros(225, 6),
          "layers.0.residual_group.blocks.0.attn.qkv.weight": torch.zeros(540, 180)}
    torch.save({"params": sd}, tmp_path / "m.pth")
    with pytest.raises(EdgeSRError, match=r"m\.pth is a classical.*embed_dim 180.*SwinIR-light"):
        load_model(tmp_path / "m.pth")


def test_strict_on_learned_parameters(tiny_swinir, tmp_path):
    sd = tiny_swinir(2).state_dict()
    missing = {k: v for k, v in sd.items() if k != "layers.1.conv.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(EdgeSRError, match=r"missing\.pth does not match.*missing: layers\.1\.conv"):
        load_model(tmp_path / "missing.pth")
    torch.save({**sd, "layers.0.extra.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(EdgeSRError, match=r"unexpected: layers\.0\.extra\.weight"):
        load_model(tmp_path / "extra.pth")


def test_corrupt_and_foreign_files(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(EdgeSRError, match=r"bad\.pth cannot be read: expected a PyTorch checkpoint"):
        load_model(tmp_path / "bad.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(EdgeSRError, match=r"list\.pth: expected a dict of tensors, found list"):
        load_model(tmp_path / "list.pth")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(EdgeSRError, match=r"other\.pth: not a recognised architecture"):
        load_model(tmp_path / "other.pth")
    with pytest.raises(EdgeSRError, match=r"nowhere\.pth does not exist"):
        load_model(tmp_path / "nowhere.pth")


def test_unknown_name_lists_known_names():
    with pytest.raises(EdgeSRError, match=r"unknown model 'swinir-xl'.*swinir-light-x2-ref"):
        resolve_checkpoint("swinir-xl")


def test_registry_contents():
    by_name = {e.name: e for e in list_checkpoints()}
    x2 = by_name["swinir-light-x2"]
    assert x2.filename == "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x2.pth"
    assert x2.url == ("https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/"
                      "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x2.pth")
    assert (x2.size, x2.sha256[:8]) == (17_147_989, "193b2299")
    for s in (2, 3, 4):
        assert by_name[f"swinir-light-x{s}"].scale == s
        assert by_name[f"swinir-light-x{s}-ref"].shared_relpath == f"models/swinir_light_x{s}_ref.pth"


def test_offline_error_says_what_to_do(monkeypatch):
    monkeypatch.setenv("EDGE_SR_DATA", "/nonexistent")  # also no shared copy to fall back on
    with pytest.raises(EdgeSRError) as e:
        resolve_checkpoint("swinir-light-x3")
    msg = str(e.value)
    assert "EDGE_SR_OFFLINE=1" in msg and "$EDGE_SR_MODELS" in msg
    assert "releases/download/v0.0/002_lightweightSR_DIV2K_s64w8_SwinIR-S_x3.pth" in msg


def _fake_entry(monkeypatch, tmp_path, src, sha=None, size=None, url=True):
    entry = CheckpointEntry(name="fake-x2", arch="swinir-light", scale=2, filename="fake.pth",
                            url=src.as_uri() if url else None, sha256=sha, size=size)
    monkeypatch.setattr(ck, "CHECKPOINTS", ck.CHECKPOINTS + [entry])
    return entry


def test_resolution_order(tiny_swinir, tmp_path, monkeypatch):
    src = tmp_path / "src.pth"
    torch.save({"params": tiny_swinir(2).state_dict()}, src)
    _fake_entry(monkeypatch, tmp_path, src, url=False)
    with pytest.raises(EdgeSRError, match="fake-x2 .* was not found and it cannot be downloaded"):
        resolve_checkpoint("fake-x2")
    cached = ck.cache_dir() / "fake.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(src.read_bytes())
    assert resolve_checkpoint("fake-x2") == cached
    models = tmp_path / "models"
    models.mkdir()
    (models / "fake.pth").write_bytes(src.read_bytes())
    monkeypatch.setenv("EDGE_SR_MODELS", str(models))
    assert resolve_checkpoint("fake-x2") == models / "fake.pth"
    assert load_model("fake-x2").name == "fake-x2"


def test_download_is_verified_and_atomic(tiny_swinir, tmp_path, monkeypatch):
    """A file:// URL stands in for the release server: no network is used."""
    src = tmp_path / "src.pth"
    torch.save({"params": tiny_swinir(2).state_dict()}, src)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.setenv("EDGE_SR_OFFLINE", "0")
    _fake_entry(monkeypatch, tmp_path, src, sha="0" * 64)
    with pytest.raises(EdgeSRError, match="expected sha256 0000"):
        resolve_checkpoint("fake-x2")
    assert not ck.cache_dir().exists() or not any(ck.cache_dir().iterdir())  # nothing half-kept
    monkeypatch.setattr(ck, "CHECKPOINTS", ck.CHECKPOINTS[:-1])
    _fake_entry(monkeypatch, tmp_path, src, sha=good, size=src.stat().st_size)
    path = resolve_checkpoint("fake-x2")
    assert path == ck.cache_dir() / "fake.pth" and path.read_bytes() == src.read_bytes()


def test_local_file_with_wrong_checksum_is_refused(tiny_swinir, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"params": tiny_swinir(2).state_dict()}, models / "swinir_light_x2_ref.pth")
    monkeypatch.setenv("EDGE_SR_MODELS", str(models))
    with pytest.raises(EdgeSRError, match=r"swinir_light_x2_ref\.pth: expected sha256 6c4638"):
        resolve_checkpoint("swinir-light-x2-ref")


def test_hash_cache_follows_file_changes(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"a")
    first = ck.file_sha256(p)
    p.write_bytes(b"bb")
    os.utime(p, ns=(1, 1))
    assert ck.file_sha256(p) == hashlib.sha256(b"bb").hexdigest() != first


def _published_sha256(data_root):
    sums = (data_root / "SHA256SUMS").read_text().splitlines()
    return {line.split()[1].removeprefix("./"): line.split()[0] for line in sums if line.strip()}


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_reference_checkpoints_load_strictly(data_root, scale):
    name = f"swinir-light-x{scale}-ref"
    loaded = load_model(name, scale=scale)
    assert loaded.path == data_root / f"models/swinir_light_x{scale}_ref.pth"
    assert loaded.sha256 == _published_sha256(data_root)[f"models/swinir_light_x{scale}_ref.pth"]
    assert loaded.model.config() == dict(scale=scale, embed_dim=60, depths=[6, 6, 6, 6],
                                         num_heads=[6, 6, 6, 6], window_size=8, mlp_ratio=2.0,
                                         in_chans=3)
    other = 2 if scale != 2 else 3
    with pytest.raises(EdgeSRError, match=rf"{name} .* is x{scale} .* --scale {other}"):
        load_model(name, scale=other)


def test_models_command_lists_registry(data_root):
    from edge_sr.cli import main

    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert re.search(r"swinir-light\s+x2\s+\S+swinir_light_x2_ref\.pth", lines["swinir-light-x2-ref"])
    assert re.search(r"not here: .*put \S+\.pth in \$EDGE_SR_MODELS", lines["swinir-light-x4"])


def test_models_says_to_set_edge_sr_data_when_no_data_folder_is_found(monkeypatch):
    import edge_sr.paths
    from edge_sr.cli import main

    monkeypatch.setattr(ck, "data_root", lambda required=True: None)
    monkeypatch.setattr(edge_sr.paths, "data_root", lambda required=True: None)
    out = CliRunner().invoke(main, ["models"]).output
    line = next(x for x in out.splitlines() if x.startswith("swinir-light-x2-ref "))
    assert line.endswith("or set EDGE_SR_DATA to the data folder (none found) holding "
                         "models/swinir_light_x2_ref.pth"), line


def test_a_shared_checkpoint_without_the_data_folder_says_to_set_edge_sr_data(monkeypatch):
    entry = CheckpointEntry(name="shared-x2", arch="swinir-light", scale=2,
                            filename="shared.pth", url=None, shared_relpath="models/shared.pth")
    monkeypatch.setattr(ck, "CHECKPOINTS", ck.CHECKPOINTS + [entry])
    monkeypatch.setattr(ck, "data_root", lambda required=True: None)
    with pytest.raises(EdgeSRError, match="shared-x2 .* not found .*models/shared.pth, which was "
                                          "not found: set EDGE_SR_DATA$"):
        resolve_checkpoint("shared-x2")
