"""Progress (msfp_compiler/progress.py): one log line per interval when stderr is not a terminal, none when off."""

from __future__ import annotations

import logging

from msfp_compiler.progress import Progress


def test_log_lines_when_not_a_terminal(caplog, monkeypatch) -> None:
    monkeypatch.setenv("MSFP_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="msfp"):
        with Progress(4, "calibration", unit="steps") as p:  # pytest's stderr is not a terminal
            for _ in range(4):
                p.update()
            p.set_postfix("loss 0.5")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("calibration: 1/4 steps (25%), ") and "left" in lines[0]
    assert len([ln for ln in lines if "/4 steps" in ln]) == 3  # 1..3; the last update is the "done" line
    assert lines[-1].startswith("calibration: done, 4 steps in ")


def test_interval_limits_the_lines(caplog, monkeypatch) -> None:
    monkeypatch.setenv("MSFP_PROGRESS_INTERVAL", "3600")
    with caplog.at_level(logging.INFO, logger="msfp"):
        with Progress(1000, "sampling") as p:
            for _ in range(1000):
                p.update()
    assert not caplog.records  # a short step inside one interval stays quiet


def test_disabled_is_silent(caplog, monkeypatch) -> None:
    monkeypatch.setenv("MSFP_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="msfp"):
        with Progress(3, "plots", enabled=False) as p:
            for _ in range(3):
                p.update()
    assert not caplog.records
