"""Progress that fits the terminal: a rich bar on a TTY, plain timestamped log lines otherwise."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressBar:
    """Count work units with rate (units/s) and ETA; `with ProgressBar(total, "tokens", "prepare") as bar: bar.advance(n)`."""

    def __init__(self, total: int | None, unit: str, description: str, *, log_every_s: float = 10.0):
        self.total, self.unit, self.description = total, unit, description
        self.done = 0
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
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total, rate="")
        return self

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def advance(self, n: int) -> None:
        """Record n more units of work."""
        self.done += n
        now = time.perf_counter()
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, rate=f"{self.rate:,.0f} {self.unit}/s")
        elif now - self._last_log >= self._log_every:
            self._last_log = now
            print(self._line(), file=sys.stderr, flush=True)

    def _line(self) -> str:
        total = f"/{self.total:,}" if self.total else ""
        eta = ""
        if self.total and self.done:
            eta = f", ETA {max(self.total - self.done, 0) / max(self.rate, 1e-9):.0f}s"
        return f"[{self.description}] {self.done:,}{total} {self.unit} ({self.rate:,.0f} {self.unit}/s{eta})"

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif exc_type is None:
            print(self._line() + " done", file=sys.stderr, flush=True)
