"""Progress bars: hidden under --quiet, and in logs that are not a terminal."""

from __future__ import annotations

import io

from tqdm import tqdm

from edge_sr.logutil import progress_disabled


def test_progress_bars_only_on_a_terminal_unless_asked(monkeypatch):
    monkeypatch.delenv("EDGE_SR_QUIET", raising=False)
    monkeypatch.delenv("EDGE_SR_PROGRESS", raising=False)
    assert progress_disabled() is None  # tqdm decides: a terminal shows bars
    log = io.StringIO()  # a log file: not a terminal
    for _ in tqdm(range(3), file=log, disable=progress_disabled()):
        pass
    assert log.getvalue() == ""
    monkeypatch.setenv("EDGE_SR_PROGRESS", "1")
    assert progress_disabled() is False
    for _ in tqdm(range(3), file=log, disable=progress_disabled()):
        pass
    assert "3/3" in log.getvalue()
    monkeypatch.setenv("EDGE_SR_QUIET", "1")  # --quiet wins
    assert progress_disabled() is True
