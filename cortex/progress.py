"""Progress of long work (a build, a download, an engine start) for the person waiting on it.

A terminal gets a live Rich progress bar on stderr; anything else (CI, a log file) gets plain
lines, one when the work starts, at most one per `every_s` seconds while it runs (and at each
tenth of the total), and one when it ends, so a log shows that work goes on without flooding.
stdout stays for results.

    with progress("building llama.cpp", total=210, unit="steps") as bar:
        bar.update(17)            # done so far (of the total)
        bar.update(18, total=211) # the total may change
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class _Plain:
    def __init__(self, label: str, total: float | None, unit: str, stream: TextIO, every_s: float) -> None:
        self.label, self.total, self.unit, self.stream, self.every_s = label, total, unit, stream, every_s
        self.started = time.monotonic()
        self.last_said = self.started
        self.last_tenth = 0
        self.done = 0.0
        self._say("started")

    def _say(self, what: str) -> None:
        of = f"/{self.total:g}" if self.total else ""
        count = f" {self.done:g}{of} {self.unit}".rstrip() if self.done or self.total else ""
        print(f"cortex: {self.label}:{count}{' ' + what if what else ''} ({time.monotonic() - self.started:.0f} s)",
              file=self.stream, flush=True)

    def update(self, done: float, total: float | None = None) -> None:
        self.done = done
        self.total = total or self.total
        now = time.monotonic()
        tenth = int(10 * done / self.total) if self.total else 0
        if tenth > self.last_tenth or now - self.last_said >= self.every_s:
            self.last_tenth, self.last_said = max(tenth, self.last_tenth), now
            self._say("")

    def finish(self, ok: bool) -> None:
        self._say("done" if ok else "failed")


class _Live:
    def __init__(self, label: str, total: float | None, unit: str, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(unit), TimeElapsedColumn(), console=Console(file=stream),
                                 transient=False)
        self.progress.start()
        self.task = self.progress.add_task(label, total=total)

    def update(self, done: float, total: float | None = None) -> None:
        if total:
            self.progress.update(self.task, completed=done, total=total)
        else:
            self.progress.update(self.task, completed=done)

    def finish(self, ok: bool) -> None:
        self.progress.stop()


@contextmanager
def progress(label: str, total: float | None = None, unit: str = "", *, stream: TextIO | None = None,
             every_s: float = 30.0) -> Iterator[_Plain | _Live]:
    """A progress reporter for `label`: live on a terminal, plain lines elsewhere."""
    out = stream or sys.stderr
    bar: _Plain | _Live = _Live(label, total, unit, out) if out.isatty() else _Plain(label, total, unit, out, every_s)
    ok = False
    try:
        yield bar
        ok = True
    finally:
        bar.finish(ok)
