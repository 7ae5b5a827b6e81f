"""Progress of a long phase that does not need a terminal.

A bar redraws in place, which only a terminal shows: in a log file, under ``nohup``, in CI
or in a notebook's captured output it is either absent or hundreds of carriage returns. So
:class:`Progress` draws tqdm's bar when its stream is a terminal and otherwise prints one
line at a steady interval, by time, whatever the phase is doing (a phase blocked on its
first batch still shows that it is alive)::

    [stage1 logits] 3072/12000 images (26%), 41.2 images/s, ETA 3m37s, 1m15s elapsed

The interval is ``tracking.progress_seconds`` (the CLI hands it to :func:`set_interval`),
or ``CAMPAR_PROGRESS_SECONDS`` in the environment, which wins: a CI job or a notebook sets
it once for every command. No Ray here: the phases that report (training steps, writing
logits, CFAR fits, searches, evaluation, prediction) all count on the driver.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

ENV = "CAMPAR_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
_configured: float | None = None


def set_interval(seconds: float) -> None:
    """The process's interval between progress lines (``tracking.progress_seconds``)."""
    global _configured
    _configured = _checked(seconds, "tracking.progress_seconds")


def interval() -> float:
    """Seconds between progress lines: the environment's, else the configured, else 30."""
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            return _checked(float(raw), ENV)
        except ValueError:
            raise ValueError(f"{ENV}={raw!r} is not a number of seconds > 0") from None
    return DEFAULT_SECONDS if _configured is None else _configured


def _checked(seconds: float, name: str) -> float:
    if not 0 < seconds < float("inf"):
        raise ValueError(f"bad value {seconds!r} for {name}: expected seconds > 0")
    return float(seconds)


class Progress:
    """Items done of one phase: a tqdm bar on a terminal, else a line every ``every`` seconds
    (default :func:`interval`) from a daemon thread, with the count, rate and ETA. The bar
    redraws at most every ``redraw`` seconds (0: on every update, for rare updates).

    ``total`` may be unknown (``None``): the line then has no share or ETA. ``initial``: items
    done before (a resumed phase), left out of the rate. Use it as a context
    manager, or call :meth:`start` and :meth:`close`. Counting is cheap (two integers), so a
    loop may call :meth:`update` on every item.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "images",
        *,
        initial: int = 0,
        every: float | None = None,
        stream: TextIO | None = None,
        bar: bool | None = None,
        redraw: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = self._initial = initial
        self._note = ""
        self._every = interval() if every is None else _checked(every, "every")
        self._stream = stream if stream is not None else sys.stderr
        self._with_bar = _is_terminal(self._stream) if bar is None else bar
        self._redraw = redraw
        self._clock = clock
        self._started = clock()
        self._bar: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType
    ) -> None:
        self.close()

    def start(self) -> Progress:
        """Show the bar, or start the thread that prints the lines."""
        self._started = self._clock()
        if self._with_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=self.label,
                unit=self.unit,
                leave=False,
                file=self._stream,
                dynamic_ncols=True,
                mininterval=self._redraw,
                initial=self.done,
            )
        else:
            self._thread = threading.Thread(target=self._lines, name="campar-progress", daemon=True)
            self._thread.start()
        return self

    def update(self, count: int = 1) -> None:
        """``count`` more items done."""
        self.advance_to(self.done + count)

    def advance_to(self, done: int, total: int | None = None) -> None:
        """``done`` items done so far (of ``total``, when it became known or changed)."""
        if total is not None:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        self.done = done

    def note(self, text: str) -> None:
        """A short status shown after the count (e.g. the best value so far)."""
        self._note = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def line(self) -> str:
        """The progress line as it stands now."""
        elapsed = self._clock() - self._started
        if self.total is None and self.done == 0:  # nothing counted yet: alive, and how long
            return f"{self.label}, {duration(elapsed)} elapsed" + (
                f", {self._note}" if self._note else ""
            )
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{self.label} {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total is not None:
            left = (self.total - self.done) / rate if rate > 0 else None
            parts.append("ETA " + ("unknown" if left is None else duration(max(left, 0.0))))
        parts.append(f"{duration(elapsed)} elapsed")
        if self._note:
            parts.append(self._note)
        return ", ".join(parts)

    def close(self) -> None:
        """Stop the lines (or clear the bar); the phase prints its own result."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _lines(self) -> None:
        while not self._stop.wait(self._every):
            print(self.line(), file=self._stream, flush=True)


def duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``: short enough for a progress line."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
