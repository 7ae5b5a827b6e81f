"""Progress without a terminal: the line's content, its interval, and every long phase's lines.

Lines are read from a buffer standing in for a pipe. The thread's timing is never asserted:
a test waits (with a generous limit) for lines to appear, then checks what they say.
"""

from __future__ import annotations

import io
import pickle
import re
import shutil
import time
from pathlib import Path

import pytest

from campar_ray import progress
from campar_ray.cli import main
from campar_ray.config import DataConfig, load_config
from campar_ray.data.manifest import read_manifest
from campar_ray.progress import Progress, duration, interval
from campar_ray.run.checkpoints import stage1_checkpoints
from campar_ray.train.inference import write_logits
from campar_ray.train.monitor import ROWS_KEY, EpochPrinter
from campar_ray.tune.search import _TrialLines


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


def _phase_lines(text: str, label: str) -> list[str]:
    """The progress lines of one phase (``label`` then a count)."""
    return [line for line in text.splitlines() if re.match(rf"{re.escape(label)} \d+", line)]


@pytest.mark.ray
def test_every_long_phase_after_training_shows_lines_on_a_pipe(
    tiny_run, tmp_path, capsys, monkeypatch
):
    """Logits, fit-cfar, evaluate and predict on a copy of the session's tiny run, with a
    short interval: each phase prints its lines (training's are the epoch printer's, above)."""
    monkeypatch.setenv(progress.ENV, "0.01")
    run_dir = str(shutil.copytree(tiny_run.run_dir, tmp_path / "run"))
    config = load_config(f"{run_dir}/config.yaml")
    table, info = read_manifest(config.data.manifest, with_bytes=False)
    checkpoint = stage1_checkpoints(run_dir)[-1][0]
    write_logits(checkpoint, table, info, run_dir, config.data, config.train, progress=False)
    bundle, images = str(tmp_path / "bundle"), f"{Path(tiny_run.manifest).parent}/images/*"
    for argv in (
        ["fit-cfar", "--run-dir", run_dir, "--solver", "local"],
        ["evaluate", "--run-dir", run_dir, "--angle-images", "16", "--cam-images", "1"],
        ["bundle", "--run-dir", run_dir, "--out", bundle],
        ["predict", "--model", bundle, "--input", images, "--out", str(tmp_path / "p.csv")],
    ):
        assert main(argv) == 0, argv
    err = capsys.readouterr().err
    for label in ("[stage1] logits", "[cfar] ALS, dictionary, fc2", "[evaluate] Fig. 7 angles",
                  "[predict]"):  # fmt: skip
        lines = _phase_lines(err, label)
        assert lines, f"no progress line of {label!r} in:\n{err}"
        assert all(", ETA " in line and " elapsed" in line for line in lines)


class _Trial:
    def __init__(self, trial_id: str, value: float | None) -> None:
        self.trial_id, self.last_result = trial_id, {"val_mA": value}


def test_a_search_prints_each_trial_and_its_progress_lines(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "0.01")
    lines = _TrialLines(total=4, done=1, metric="val_mA")  # one trial finished before a resume
    pickle.dumps(lines)  # Tune pickles its callbacks with the run config
    lines.setup()
    lines.on_trial_complete(0, [], _Trial("a", 0.5))
    lines.on_trial_complete(0, [], _Trial("b", 0.7))
    time.sleep(0.1)
    lines.on_experiment_end([])
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        "[tune] trial 2/4 a: val_mA 50.00 (best val_mA 50.00)",
        "[tune] trial 3/4 b: val_mA 70.00 (best val_mA 70.00)",
    ]
    timed = _phase_lines("\n".join(out), "[tune]")
    assert timed and all(line.startswith("[tune] 3/4 trials (75%)") for line in timed)
    assert timed[-1].endswith("best val_mA 70.00")


def test_a_training_that_has_not_posted_yet_says_it_is_starting(monkeypatch):
    monkeypatch.setenv(progress.ENV, "0.01")
    piped = io.StringIO()
    printer = EpochPrinter(1, DataConfig(), piped, bar=False)
    printer.starting()
    lines = _wait_for_lines(piped, 1)
    printer.show({"epoch": 1, ROWS_KEY: 64, "epoch_rows": 200})  # the first post ends it
    count = len(piped.getvalue().splitlines())
    printer.close()
    assert re.fullmatch(r"\[stage1\] starting, \d+s elapsed", lines[0])
    assert "starting" not in "".join(piped.getvalue().splitlines()[count:])
