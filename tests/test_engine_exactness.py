"""``benchmarks.engine_exactness``: the noise floor's spread over seeds (the arithmetic only; the
engines themselves are benchmarks, not tests)."""

from __future__ import annotations

import pytest

from benchmarks.engine_exactness import floor_summary, main


def test_floor_summary_counts_draws_as_far_as_the_engine():
    s = floor_summary([-0.02, 0.004, -0.0136, 0.03], engine_delta=-0.0136)
    assert s["noise_floor_mean_abs_delta_db"] == pytest.approx(0.0169)
    assert s["noise_floor_max_abs_delta_db"] == pytest.approx(0.03)
    assert s["noise_floor_at_least_engine"] == 3  # 0.02, 0.0136 (a tie counts) and 0.03


def test_noise_seeds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["engines/x", "--noise-floor", "--noise-seeds", "0"])
    assert "--noise-seeds: expected a positive count, got 0" in capsys.readouterr().err
