"""Progress output: a live bar on a terminal, plain lines in a log."""

from __future__ import annotations

import io

import pytest

import tasks.common.progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_interval_and_no_carriage_returns(monkeypatch):
    monkeypatch.setattr(tasks.common.progress, "LOG_INTERVAL", 3600.0)
    log = io.StringIO()
    with tasks.common.progress.progress_bar(total=1000, desc="sample", unit="img", file=log) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2 and lines[0].startswith("sample:   0%") and "1000/1000" in lines[-1]


@pytest.mark.parametrize("leave", [True, False])
def test_a_terminal_keeps_the_live_bar(leave):
    term = Terminal()
    for _ in tasks.common.progress.progress_bar(range(3), desc="x", file=term, leave=leave, mininterval=0):
        pass
    assert "\r" in term.getvalue()
