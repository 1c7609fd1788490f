"""The accuracy bench's cell plan and the sensitivity bench's quantizer groups (no compute)."""

import pytest

from benchmarks import accuracy
from benchmarks.sensitivity import group_of


@pytest.fixture
def family(monkeypatch):
    def use(key):
        monkeypatch.setattr(accuracy, "FAMILY", accuracy.FAMILIES[key])
    return use


def test_swinir_plan_has_the_issue_grid(family):
    family("swinir")
    cells = accuracy.plan([2, 4, 3], [4, 2, 3])
    narrow = [c for c in cells if c[3] in ("Set5", "Set14")]
    assert len(narrow) == 3 * 2 * (1 + 3 * 4)  # scales x sets x (FP + bits x methods)
    wide = {c for c in cells if c[3] in ("B100", "Urban100")}
    assert {c[0] for c in wide} == {4} and {c[1] for c in wide} == {32, 4, 2}
    assert len(wide) == 2 * (1 + 2 * 4)


def test_ngswin_plan_wide_rows_at_both_scales_and_filters(family):
    family("ngswin")
    cells = accuracy.plan([2, 3], [4, 2, 3], datasets=("Urban100",), methods=("2dquant",))
    assert cells == [(2, 32, "fp", "Urban100"), (2, 4, "2dquant", "Urban100"),
                     (2, 2, "2dquant", "Urban100"), (3, 32, "fp", "Urban100"),
                     (3, 4, "2dquant", "Urban100"), (3, 2, "2dquant", "Urban100")]
    assert accuracy.cell_path(2, 4, "dobi", "Set5").parent.name == "accuracy_ngswin"


def test_render_puts_condiquant_beside_the_paper_drop_for_ngswin(family):
    family("ngswin")
    cells = {(2, 32, "fp", "Set5"): {"psnr": 38.0}, (2, 4, "2dquant", "Set5"): {"psnr": 37.5}}
    text = accuracy.render(cells, "cpu")
    row = next(line for line in text.splitlines() if "| 2DQuant (fast) |" in line)
    # ours -0.50; Table 3 x2 W4 2DQuant 37.87 - 38.15 = -0.28; CondiQuant 38.03 - 38.15 = -0.12
    assert "| 37.50 | -0.50 | -0.28 / -0.12 |" in row


@pytest.mark.parametrize("name, group", [
    ("layers.0.residual_group.blocks.1.attn.qkv.weight_quantizers.2", "weights"),
    ("layers.0.residual_group.blocks.1.attn.qkv.act_quantizers.0", "qkv input"),
    ("layers.3.residual_group.blocks.0.mlp.fc2.act_quantizers.0", "fc2 input"),
    ("layers.0.residual_group.blocks.1.attn.k_quant", "q/k outputs"),
    ("layers.0.residual_group.blocks.1.attn.attn_probs_quant", "softmax output"),
])
def test_sensitivity_groups(name, group):
    assert group_of(name) == group


def test_ordering_check_reports_what_holds_and_what_does_not(family):
    family("swinir")
    c = {(4, 2, m, d): {"psnr": v} for (m, d), v in {
        ("minmax", "Set5"): 28.0, ("percentile", "Set5"): 28.5, ("dobi", "Set5"): 28.3,
        ("2dquant", "Set5"): 28.6, ("dobi", "Set14"): 26.0, ("2dquant", "Set14"): 25.9}.items()}
    (line,) = [ln for ln in accuracy.ordering(c) if ln.startswith("- ")]
    assert "DOBI > MinMax (Set5 +0.300)" in line
    assert "DOBI not > Percentile (Set5 -0.200)" in line
    assert "2DQuant > DOBI (mean over Set5/Set14 +0.100)" in line
