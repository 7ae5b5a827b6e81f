"""Progress without a terminal: the line's content, its interval, and every long phase's lines.

Lines are read from a buffer standing in for a pipe. The thread's timing is never asserted:
a test waits (with a generous limit) for lines to appear, then checks what they say.
"""

from __future__ import annotations

import io
import time

import pytest

from campar_ray import progress
from campar_ray.config import DataConfig, load_config
from campar_ray.progress import Progress, duration, interval
from campar_ray.train.monitor import ROWS_KEY, EpochPrinter


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_says_done_rate_and_eta():
    clock = _Clock()
    reporter = Progress("[stage1] logits", 1000, every=60, stream=io.StringIO(), clock=clock)
    reporter.start()
    clock.now += 10
    reporter.update(250)
    line = reporter.line()
    reporter.close()
    assert line == "[stage1] logits 250/1000 images (25%), 25 images/s, ETA 30s, 10s elapsed"


def test_an_unknown_total_or_no_progress_yet_gives_no_eta_figure():
    clock = _Clock()
    unknown = Progress("[x]", None, "steps", every=60, stream=io.StringIO(), clock=clock)
    clock.now += 90
    unknown.update(3)
    assert unknown.line() == "[x] 3 steps, 0.0333 steps/s, 1m30s elapsed"
    waiting = Progress("[y]", 10, "trials", initial=4, every=60, stream=io.StringIO(), clock=clock)
    clock.now += 5
    assert waiting.line() == "[y] 4/10 trials (40%), 0 trials/s, ETA unknown, 5s elapsed"


def test_durations_stay_short():
    assert [duration(s) for s in (4.4, 187, 7500)] == ["4s", "3m07s", "2h05m"]


def _wait_for_lines(stream: io.StringIO, count: int) -> list[str]:
    deadline = time.monotonic() + 30
    while len(stream.getvalue().splitlines()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return stream.getvalue().splitlines()


def test_a_pipe_gets_a_line_every_interval_while_the_phase_is_blocked():
    piped = io.StringIO()
    with Progress("[predict]", 50, every=0.01, stream=piped) as reporter:
        reporter.update(5)
        lines = _wait_for_lines(piped, 3)  # nothing else happens: the lines come by time
    assert len(lines) >= 3
    assert all(line.startswith("[predict] 5/50 images (10%), ") for line in lines)
    count = len(piped.getvalue().splitlines())
    time.sleep(0.05)
    assert len(piped.getvalue().splitlines()) == count  # closed: no more lines


def test_a_terminal_gets_the_bar_and_no_lines():
    terminal = io.StringIO()
    with Progress("[predict]", 50, every=0.01, stream=terminal, bar=True, redraw=0) as bar:
        bar.update(20)
        time.sleep(0.05)
    assert "20/50" in terminal.getvalue() and "images/s, ETA" not in terminal.getvalue()


def test_the_interval_comes_from_the_config_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(progress, "_configured", None)
    assert interval() == progress.DEFAULT_SECONDS
    progress.set_interval(
        load_config(overrides=["tracking.progress_seconds=5"]).tracking.progress_seconds
    )
    assert interval() == 5
    monkeypatch.setenv(progress.ENV, "0.5")
    assert interval() == 0.5
    monkeypatch.setenv(progress.ENV, "soon")
    with pytest.raises(ValueError, match="CAMPAR_PROGRESS_SECONDS='soon'"):
        interval()


def test_a_quiet_trainings_epoch_shows_lines_on_a_pipe(monkeypatch):
    monkeypatch.setenv(progress.ENV, "0.01")
    piped = io.StringIO()
    printer = EpochPrinter(2, DataConfig(), piped, bar=False)
    printer.show({"epoch": 1, ROWS_KEY: 64, "epoch_rows": 200})
    lines = _wait_for_lines(piped, 2)
    printer.close()
    assert len(lines) >= 2
    assert all(line.startswith("[stage1] epoch 1/2 64/200 images (32%)") for line in lines)
