"""Progress displays of ``extract`` and ``train``, on stderr so that stdout keeps the summaries.

rich draws live bars on a terminal; in a log (not a TTY) it prints each bar's final state and
the lines printed through it, so the epoch lines stay readable there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from invcache.training.loop import TrainProgress


class _Display:
    """A rich Progress started on the first report and stopped on leaving the ``with`` block."""

    def __init__(self, *columns, console: Console | None = None) -> None:
        self.progress = Progress(*columns, console=console or Console(stderr=True), transient=False)
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()


class ExtractBar(_Display):
    """``extract``: images done of this process's share, img/s and MB/s since the start, and an ETA."""

    def __init__(self, description: str, console: Console | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                         TextColumn("eta"), TimeRemainingColumn(), console=console)
        self.clock = clock
        self.started = 0.0
        self.images = 0
        self.raw_bytes = 0

    def plan(self, total: int) -> None:
        # The bar starts once the library has checked the settings, so a rejected run prints only its error.
        self.progress.start()
        self.task = self.progress.add_task("extract", total=total, rate="")
        self.started = self.clock()

    def advance(self, images: int, raw_bytes: int) -> None:
        self.images += images
        self.raw_bytes += raw_bytes
        elapsed = max(self.clock() - self.started, 1e-9)
        self.progress.update(self.task, advance=images,
                             rate=f"{self.images / elapsed:.1f} img/s  {self.raw_bytes / elapsed / 1e6:.1f} MB/s")


class TrainDisplay(_Display):
    """``train``: "epoch k/N", a bar over the epoch's steps, samples/s, the running train loss, the
    whole run's ETA, and one line per finished epoch (``event.summary()``: train loss and validation loss,
    or validation AP for ``train detr``)."""

    def __init__(self, console: Console | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("{task.fields[stats]}"), TextColumn("run eta {task.fields[eta]}"),
                         console=console)
        self.clock = clock
        self.epoch = 0
        self.step = 0  # steps done in the epoch in progress
        self.steps = 0  # steps in an epoch, as the step reports give it
        self.finished = 0  # steps of the epochs this invocation finished
        self.anchor: tuple[float, int] | None = None  # (time, steps done) at the first report

    def __call__(self, event: TrainProgress) -> None:
        if event.epoch_done:
            # This report comes after validation and carries the epoch's losses, not its steps: the bar keeps
            # the last step report's.
            self.finished += self.steps
            self.step = 0
            if self.task is not None:
                self.progress.update(self.task, eta=self._eta((event.epochs - event.epoch) * self.steps))
            self.progress.console.print(event.summary())
            return
        description = f"epoch {event.epoch}/{event.epochs}"
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(description, total=event.steps, stats="", eta="")
        elif event.epoch != self.epoch:
            self.progress.reset(self.task, total=event.steps, description=description)
        self.epoch, self.step, self.steps = event.epoch, event.step, event.steps
        loss = f"  loss {event.train_loss:.4f}" if event.train_loss is not None else ""
        left = event.steps - event.step + (event.epochs - event.epoch) * event.steps
        self.progress.update(self.task, completed=event.step, stats=f"{event.samples_per_s:.0f} samples/s{loss}",
                             eta=self._eta(left))

    def _eta(self, steps_left: int) -> str:
        """Time for the run's remaining steps at the rate measured since this invocation's first report (so a
        resumed run's earlier epochs do not count, and validation time does)."""
        now, done = self.clock(), self.finished + self.step
        if self.anchor is None:
            self.anchor = (now, done)
        start, done_at_start = self.anchor
        if done <= done_at_start or now <= start:
            return "-:--:--"
        seconds = round(steps_left * (now - start) / (done - done_at_start))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
