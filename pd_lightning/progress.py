"""Progress of the lab's long loops, one way everywhere: a rich bar on a terminal, plain log lines otherwise.

Data preparation, logit generation and training (`callbacks.TrainingProgress`) all count their work
with `ProgressBar`; off a terminal its lines go through `logging` (`pd_lightning.logs`), so they land
where the rest of the status output does and a caller silences them by logger level.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)


class ProgressBar:
    """Count work units with rate (units/s) and ETA; `with ProgressBar(total, "tokens", "prepare") as bar: bar.advance(n)`.

    `start`: units already done before this session (a resumed run), counted in the total but not in
    the rate. `advance(n, note=...)` shows a short status beside the count (a training loss).
    """

    def __init__(self, total: int | None, unit: str, description: str, *, start: int = 0, log_every_s: float = 10.0):
        self.total, self.unit, self.description = total, unit, description
        self.done = self.first = start
        self.note = ""
        self.start = time.perf_counter()
        self._log_every = log_every_s
        self._last_log = self.start
        self._rich: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressBar:
        if sys.stderr.isatty():
            self._rich = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total, completed=self.done, rate="", note="")
        return self

    @property
    def rate(self) -> float:
        """Units per second in this session."""
        return (self.done - self.first) / max(time.perf_counter() - self.start, 1e-9)

    def due(self) -> bool:
        """Whether the next `advance` shows anything: a bar redraws at most 10 times a second, plain lines
        every `log_every_s`. A caller whose note costs something to make (the loss read back from the
        trainer's metrics) makes it only when due, not at every step."""
        interval = 0.1 if self._rich is not None else self._log_every
        return time.perf_counter() - self._last_log >= interval

    def advance(self, n: int, *, note: str | None = None) -> None:
        """Record n more units of work (and, with `note`, replace the status shown beside them)."""
        self.done += n
        if note is not None:
            self.note = note
        if not self.due():
            return
        self._last_log = time.perf_counter()
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, rate=f"{_amount(self.rate)} {self.unit}/s", note=self.note)
        else:
            log.info(self._line())

    def _line(self) -> str:
        total = f"/{self.total:,}" if self.total else ""
        eta = ""
        if self.total and self.done > self.first:
            eta = f", ETA {max(self.total - self.done, 0) / max(self.rate, 1e-9):.0f}s"
        note = f" {self.note}" if self.note else ""
        return f"[{self.description}] {self.done:,}{total} {self.unit} ({_amount(self.rate)} {self.unit}/s{eta}){note}"

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, rate=f"{_amount(self.rate)} {self.unit}/s", note=self.note)
            self._rich.stop()
        elif exc_type is None:
            log.info(self._line() + " done")


def _amount(rate: float) -> str:
    """A rate for humans: thousands separated when large, three digits when small (0.412 steps/s)."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
