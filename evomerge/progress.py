"""Progress for long work: a rich bar on a terminal, a few plain log lines otherwise.

rich's progress classes are imported only when a bar is shown on a terminal.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType


class Progress:
    """`with Progress("label") as bar: bar.update(done, total)`."""

    def __init__(self, label: str, *, stream=None, log_every_s: float = 10.0):
        self.label = label
        self.stream = stream or sys.stderr
        self.log_every_s = log_every_s
        self._rich = None
        self._task = None
        self._last_log = 0.0
        self._start = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.stream.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
            )
            self._rich.start()
            self._task = self._rich.add_task(self.label, total=None)
        return self

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=done, total=total, description=f"{self.label} {note}".strip())
            return
        now = time.perf_counter()
        finished = total is not None and done >= total
        if finished or now - self._last_log >= self.log_every_s:
            self._last_log = now
            of = f"/{total}" if total else ""
            print(f"{self.label}: {done}{of} {note} ({now - self._start:.0f} s)".rstrip(), file=self.stream, flush=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()
