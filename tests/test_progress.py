"""Progress for a CI log (batch/progress.py): how often a stage speaks, the ETA, and when a run counts as CI."""

from __future__ import annotations

import io
import re

import pytest

from batch.progress import Bars, Lines, Progress, interactive, reporter


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def said(stream: io.StringIO) -> list[str]:
    lines = stream.getvalue().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", line) for line in lines), lines
    return [line.split(" ", 1)[1] for line in lines]


def test_progress_lines_at_most_every_interval_and_always_the_last_step() -> None:
    slow = io.StringIO()
    bar = Lines(slow, interval=3600).stage("animate", 4)
    for _ in range(4):
        bar.update(1)
    assert said(slow)[0] == "animate: 4 steps to run" and len(said(slow)) == 2
    assert re.fullmatch(r"animate: 4/4 done in \d+\.\ds", said(slow)[1])

    each = io.StringIO()
    bar = Lines(each, interval=0).stage("voice", 3)
    for _ in range(3):
        bar.update(1)
    assert [re.sub(r"\d+s$", "Ns", t) for t in said(each)[1:3]] == [
        "voice: 1/3 done, ETA Ns",
        "voice: 2/3 done, ETA Ns",
    ]


def test_progress_ci_variable_or_no_terminal_means_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert interactive(Tty()) and not interactive(io.StringIO())
    assert isinstance(reporter(True, Tty()), Bars) and isinstance(reporter(True, io.StringIO()), Lines)
    assert type(reporter(False, Tty())) is Progress
    for value, ci in (("true", True), ("1", True), ("false", False), ("0", False), ("", False)):
        monkeypatch.setenv("CI", value)
        assert interactive(Tty()) is not ci, value
