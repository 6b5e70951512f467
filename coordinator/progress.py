"""Progress of the long set-up phases (writing shards, shipping them), for people and for logs.

On a terminal a rich bar is drawn on stderr (never stdout: generated text goes there, and a bar's
line breaks must not end up in it). Elsewhere (a pipe, a service's journal) the same progress
arrives as log lines every 10 % or 5 s, so a non-interactive run is never silent for a minute.
Either way the phase ends with one INFO line saying what it did and how fast.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

log = logging.getLogger("edgeweave.progress")

#: a log line at every step of this fraction of the total or this often (seconds), whichever
#: comes first, but never two within LOG_GAP_S (a fast phase logs only its start and its end)
LOG_EVERY_S = 5.0
LOG_EVERY_FRACTION = 0.1
LOG_GAP_S = 1.0


def _amount(value: float, unit: str) -> str:
    return f"{value / 1e6:.1f} MB" if unit == "bytes" else f"{value:g} {unit}"


class PhaseProgress:
    """`with PhaseProgress("shipping shards", total_bytes, "bytes") as p: p.update(done)`."""

    def __init__(self, description: str, total: float, unit: str = "bytes", *, bar: bool = True) -> None:
        self.description, self.total, self.unit = description, max(float(total), 0.0), unit
        self.done = 0.0
        self._bar: Any = None
        self._task: Any = None
        self._use_bar = bar and sys.stderr.isatty()
        self._start = self._last_log = 0.0
        self._next_fraction = LOG_EVERY_FRACTION

    def __enter__(self) -> PhaseProgress:
        self._start = self._last_log = time.perf_counter()
        if self._use_bar:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn()]
            if self.unit == "bytes":
                columns.insert(2, DownloadColumn())
            self._bar = Progress(*columns, transient=True, console=Console(stderr=True))
            self._task = self._bar.add_task(self.description, total=self.total)
            self._bar.start()
        else:
            log.info("%s: %s to go", self.description, _amount(self.total, self.unit))
        return self

    def update(self, done: float) -> None:
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
            return
        now = time.perf_counter()
        fraction = done / self.total if self.total else 1.0
        if now - self._last_log >= LOG_GAP_S and (fraction >= self._next_fraction or now - self._last_log >= LOG_EVERY_S):
            while self._next_fraction <= fraction:
                self._next_fraction += LOG_EVERY_FRACTION
            self._last_log = now
            log.info("%s: %.0f%% (%s of %s)%s", self.description, 100 * fraction, _amount(done, self.unit),
                     _amount(self.total, self.unit), self._rate(done, now))

    def _rate(self, done: float, now: float) -> str:
        elapsed = now - self._start
        if self.unit != "bytes" or elapsed <= 0:
            return ""
        return f" at {done / elapsed / 1e6:.1f} MB/s"

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
        if exc_type is None:
            now = time.perf_counter()
            log.info("%s: done, %s in %.1f s%s", self.description, _amount(self.done, self.unit), now - self._start,
                     self._rate(self.done, now))
