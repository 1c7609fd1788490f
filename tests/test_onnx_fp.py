"""Fixed-shape FP ONNX export: ONNX Runtime reproduces PyTorch within 1e-4 max abs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge_sr.errors import EdgeSRError
from edge_sr.onnx_export import export_fp_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


def _ort_run(path, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["sr"], {"lr": x.numpy()})[0]


@pytest.mark.parametrize("tile", [(16, 24), (13, 20)])  # the second is padded inside the graph
def test_tiny_model_matches_pytorch(tiny_swinir, tmp_path, tile):
    model = tiny_swinir(3, seed=7)
    path = export_fp_onnx(model, tmp_path / "m.onnx", tile=tile, batch=2)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["lr"] and [o.name for o in graph.output] == ["sr"]
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, *tile]
    # Shifted-window masks are constants: no mask-building scatter in the graph.
    assert not {"ScatterND", "Loop"} & {n.op_type for n in graph.node}
    x = torch.rand(2, 3, *tile)
    with torch.no_grad():
        want = model(x).numpy()
    got = _ort_run(path, x)
    assert got.shape == (2, 3, tile[0] * 3, tile[1] * 3)
    assert np.abs(got - want).max() < 1e-4
    assert not model.training


def test_export_leaves_no_partial_file(tiny_swinir, tmp_path):
    with pytest.raises(EdgeSRError, match="opset 13"):
        export_fp_onnx(tiny_swinir(2), tmp_path / "m.onnx", tile=(16, 16), opset=13)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_reference_x2_checkpoint_matches_pytorch(data_root, tmp_path):
    from edge_sr.checkpoints import load_model

    model = load_model("swinir-light-x2-ref").model
    path = export_fp_onnx(model, tmp_path / "x2.onnx", tile=(32, 32))
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x).numpy()
    diff = np.abs(_ort_run(path, x) - want).max()
    assert diff < 1e-4, diff


def test_masks_are_stored_as_labels_and_rebuilt_exactly():
    """The shifted-window mask (15 MB per block for a 320x180 frame) is stored as its tokens'
    region labels and rebuilt in the graph bit-exactly; anything else is left alone."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from edge_sr.models.windows import shift_attention_mask
    from edge_sr.onnx_tidy import _region_labels, compress_masks

    mask = shift_attention_mask(32, 48, 8, 4).numpy()[None, :, None]  # (1, nW, 1, 64, 64)
    assert _region_labels(np.random.default_rng(0).random((4, 8, 8))) is None
    graph = helper.make_graph(
        [helper.make_node("Identity", ["m"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, mask.shape)],
        [numpy_helper.from_array(mask.astype(np.float32), "m")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = len(proto.SerializeToString())
    saved = compress_masks(proto)
    assert saved > 0.9 * mask.nbytes and len(proto.SerializeToString()) < before / 10
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {})[0], mask)
