"""scripts/calib_from_dqc_state.py refuses files that are not DQC state files, naming the file."""

import pytest
import torch

from scripts.calib_from_dqc_state import STATE_KEYS, read_state


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(SystemExit, match=r"bad\.pt: expected a DQC state file"):
        read_state(str(bad))


def test_missing_keys_are_named(tmp_path):
    p = tmp_path / "partial.pt"
    torch.save({"best_bounds": {}}, p)
    with pytest.raises(SystemExit, match=r"partial\.pt: not a DQC state file .*no config, iteration"):
        read_state(str(p))


def test_complete_state_is_returned(tmp_path):
    p = tmp_path / "ok.pt"
    st = {k: 0 for k in STATE_KEYS} | {"best_bounds": {}, "config": {"iterations": 4000}}
    torch.save(st, p)
    assert read_state(str(p))["config"]["iterations"] == 4000
