"""Site kinds kept in floating point (``QuantRecipe.fp_sites``): the student, the engine and the
reported PSNR agree because the site is FP in all three."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from calibrate.dobi import init_bounds
from calibrate.export.ortcheck import make_session
from calibrate.export_qdq import ExportConfig, build_qdq
from calibrate.prepare import SITE_KINDS, QuantRecipe, prepare, quantizers
from calibrate.qmodules import QuantLinear
from edge_sr.errors import EdgeSRError

pytestmark = pytest.mark.usefixtures("one_thread")
TILE = (16, 16)


@pytest.mark.parametrize("kinds,linears,acts", [
    ((), 4, 4), (("fc1",), 3, 4), (("qk",), 4, 2), (("pv",), 4, 2), (("softmax",), 4, 3),
    (("qkv", "proj", "fc1", "fc2"), 0, 4)])
def test_fp_sites_leave_those_points_unquantized(tiny_swinir, kinds, linears, acts):
    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    st = prepare(tiny, QuantRecipe(bits=8, grid="ort", fp_sites=kinds))
    per_block_linears = sum(isinstance(m, QuantLinear) for m in st.modules()) / 2
    standalone = [n for n, _ in quantizers(st) if ".act_quantizers." not in n
                  and ".weight_quantizers." not in n]
    assert per_block_linears == linears and len(standalone) / 2 == acts
    assert not QuantRecipe(fp_sites=kinds).faithful or not kinds


def test_fp_site_engine_stays_exact_and_has_no_q_there(tiny_swinir):
    tiny = tiny_swinir(2, depths=(2,), num_heads=(2,))
    calib = torch.rand(2, 3, *TILE, generator=torch.Generator().manual_seed(1))
    st = prepare(tiny, QuantRecipe(bits=8, grid="ort", fp_sites=("pv", "fc2")))
    init_bounds(st, calib)
    proto, records = build_qdq(st, ExportConfig(target="ort", tile=TILE))
    sites = {r["site"].rpartition(".")[2] for r in records}
    assert sites == {"qkv", "proj", "fc1", "q_quant", "k_quant"}
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["MatMulIntegerToFloat"] == 2 * 5  # q, k, v, proj, fc1 of both blocks
    x = torch.rand(1, 3, *TILE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = st(x).numpy()
    out = make_session(proto, threads=1).run(None, {"lr": x.numpy()})[0]
    assert np.abs(out - ref).max() < 1e-4


def test_unknown_site_kind_is_one_clear_error():
    with pytest.raises(ValueError, match="--fp-sites: unknown site kinds \\['attn'\\]"):
        QuantRecipe(fp_sites=("attn",))
    from runtime.build import BuildConfig

    with pytest.raises(EdgeSRError, match="--fp-sites"):
        BuildConfig(bits=4, scale=2, fp_sites=("attn",))
    assert set(SITE_KINDS) == {"qkv", "proj", "fc1", "fc2", "qk", "pv", "softmax"}
