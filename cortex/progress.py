"""Progress of long work (a download, a conversion, a build, an engine start, a benchmark) for
the person waiting on it, and for whatever else watches: one abstraction, several outlets.

A `Reporter` opens one bar per piece of work. Each change of a bar goes to its display on
`stream` (stderr by default; stdout stays for results) and to its sinks:

- a terminal gets live Rich bars (bytes with rate and ETA; counts with ETA; phases with the
  time so far). Bars of several threads share one live display.
- anything else (CI, a log file) gets plain lines, bounded so a log stays short: one when the
  work starts, one at each new tenth of the total, one per `every_s` seconds, one per new
  phase (`Bar.phase`), and one when it ends.
- a sink is any callable taking a `ProgressEvent`; the Prefect tasks pass one that keeps a
  progress artifact up to date, so the core never imports Prefect.

    reporter = Reporter(sinks=[my_sink])
    with reporter.task("download model.safetensors", total=size, unit="bytes") as bar:
        bar.update(got)                   # done so far (of the total)
    with reporter.task("engine llamacpp-model-x", done_word="ready") as bar:
        bar.phase("loading model")        # a new phase: said at once, even in plain lines

Core functions take `progress: Reporter | None`; None shows and sends nothing.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TextIO

State = Literal["started", "running", "done", "failed"]


@dataclass(frozen=True)
class ProgressEvent:
    """One change of one bar, as sinks see it."""

    label: str
    unit: str
    done: float
    total: float | None
    note: str  # the current phase or detail ("loading model"), or ""
    state: State
    elapsed_s: float

    @property
    def fraction(self) -> float | None:
        """done / total in [0, 1], 1 once done; None while the total is unknown."""
        if self.state == "done":
            return 1.0
        return min(1.0, max(0.0, self.done / self.total)) if self.total else None


ProgressSink = Callable[[ProgressEvent], None]

# A "[n/N]" step counter at the start of a line: ninja's and make's "[17/210]" (make's "[ 42%]"
# is not one), llama-quantize's "[  17/ 272] blk.0.attn_k.weight - ...".
_STEP = re.compile(r"^\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]")


def step_of(line: str) -> tuple[int, int] | None:
    """(n, N) of a line that starts with a "[n/N]" step counter, else None."""
    match = _STEP.match(line)
    return (int(match[1]), int(match[2])) if match else None


def format_bytes(n: float) -> str:
    """Decimal units, as download tools and the Hub show sizes: 98.0 MB, 1.4 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _count(n: float) -> str:
    return f"{n:.0f}" if float(n).is_integer() else f"{n:g}"


def describe(event: ProgressEvent, *, rate: str = "", done_word: str = "done") -> str:
    """`label: 52.4 MB/98.0 MB (53%), <rate>, <note>, <state>` (the parts there are)."""
    parts = []
    if event.unit == "bytes":
        if event.total:
            parts.append(
                f"{format_bytes(event.done)}/{format_bytes(event.total)} ({100 * event.done / event.total:.0f}%)"
            )
        elif event.done:
            parts.append(format_bytes(event.done))
    elif event.total:
        parts.append(f"{_count(event.done)}/{_count(event.total)} {event.unit}".rstrip())
    elif event.done:
        parts.append(f"{_count(event.done)} {event.unit}".rstrip())
    if rate:
        parts.append(rate)
    if event.note and event.state != "done":
        parts.append(event.note)
    said = {"started": "started", "running": "", "done": done_word, "failed": "failed"}[event.state]
    if said:
        parts.append(said)
    return f"{event.label}: {', '.join(parts)}"


class Bar:
    """One piece of work: what is done of how much, its phase; see `Reporter.task`."""

    def __init__(
        self, reporter: Reporter, label: str, total: float | None, unit: str, done_word: str, initial: float
    ) -> None:
        self.label, self.total, self.unit, self.done_word = label, total, unit, done_word
        self.done = self.initial = initial
        self.note = ""
        self.started = time.monotonic()
        self._reporter = reporter
        self._display = reporter._open_display(self)
        self._emit("started")

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float | None:
        """Units per second since the bar started (what was there at the start not counted)."""
        elapsed = self.elapsed_s
        return (self.done - self.initial) / elapsed if elapsed > 0 and self.done > self.initial else None

    def eta_s(self) -> float | None:
        rate = self.rate()
        return max(0.0, (self.total - self.done) / rate) if rate and self.total else None

    def update(self, done: float, total: float | None = None, note: str | None = None) -> None:
        """Set what is done so far (and the total, if it changed, and a detail to show)."""
        self.done = done
        self.total = total or self.total
        if note is not None:
            self.note = note
        self._emit("running")

    def advance(self, by: float = 1) -> None:
        self.update(self.done + by)

    def phase(self, note: str) -> None:
        """Enter a new phase ("loading model"): shown at once, in plain lines too. For the few
        stages of a piece of work, not for a detail that changes every second (`update`'s note)."""
        if note != self.note:
            self.note = note
            self._emit("running", phase=True)

    def _finish(self, ok: bool) -> None:
        self._emit("done" if ok else "failed")

    def _emit(self, state: State, phase: bool = False) -> None:
        event = ProgressEvent(self.label, self.unit, self.done, self.total, self.note, state, self.elapsed_s)
        self._display.show(self, event, phase)
        for sink in self._reporter.sinks:
            sink(event)


class Reporter:
    """Where progress goes: a display on `stream` (live on a terminal, plain lines elsewhere,
    none with display=False) and each sink."""

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        every_s: float = 30.0,
        sinks: Iterable[ProgressSink] = (),
        display: bool = True,
    ) -> None:
        self.stream, self.every_s, self.display = stream, every_s, display
        self.sinks = tuple(sinks)

    def with_sink(self, sink: ProgressSink) -> Reporter:
        return Reporter(stream=self.stream, every_s=self.every_s, sinks=(*self.sinks, sink), display=self.display)

    @contextmanager
    def task(
        self, label: str, total: float | None = None, unit: str = "", *, done_word: str = "done", initial: float = 0
    ) -> Iterator[Bar]:
        """A bar for `label` for the duration of the block: it ends "done" (or `done_word`) when
        the block completes, "failed" when it raises."""
        bar = Bar(self, label, total, unit, done_word, initial)
        ok = False
        try:
            yield bar
            ok = True
        finally:
            bar._finish(ok)

    def _open_display(self, bar: Bar) -> _Display:
        if not self.display:
            return _NoDisplay()
        out = self.stream or sys.stderr
        return _LiveDisplay(out) if out.isatty() else _PlainDisplay(out, self.every_s)


SILENT = Reporter(display=False)


def progress(
    label: str, total: float | None = None, unit: str = "", *, stream: TextIO | None = None, every_s: float = 30.0
) -> Any:
    """One bar on `stream` (stderr), no sinks: `Reporter(...).task(label, total, unit)`."""
    return Reporter(stream=stream, every_s=every_s).task(label, total, unit)


# --- displays ----------------------------------------------------------------------------------


class _Display:
    def show(self, bar: Bar, event: ProgressEvent, phase: bool) -> None:
        raise NotImplementedError


class _NoDisplay(_Display):
    def show(self, bar: Bar, event: ProgressEvent, phase: bool) -> None:
        pass


class _PlainDisplay(_Display):
    """Plain lines: start, each new tenth, every `every_s` seconds, each phase, end."""

    def __init__(self, stream: TextIO, every_s: float) -> None:
        self.stream, self.every_s = stream, every_s
        self.last_said = time.monotonic()
        self.last_tenth = 0

    def show(self, bar: Bar, event: ProgressEvent, phase: bool) -> None:
        if event.state == "started" and event.total:  # a resumed download starts past 0%
            self.last_tenth = int(10 * event.done / event.total)
        if event.state == "running" and not phase:
            now = time.monotonic()
            tenth = int(10 * event.done / event.total) if event.total else 0
            if (tenth <= self.last_tenth or tenth >= 10) and now - self.last_said < self.every_s:
                return  # (the end line says 100%)
            self.last_tenth = max(tenth, self.last_tenth)
        self.last_said = time.monotonic()
        print(self.line(bar, event), file=self.stream, flush=True)

    @staticmethod
    def line(bar: Bar, event: ProgressEvent) -> str:
        rate = ""
        if event.state == "running" and (per_s := bar.rate()):
            unit = event.unit or "units"
            rate = (
                f"{format_bytes(per_s)}/s"
                if event.unit == "bytes"
                else f"{per_s:.0f} {unit}/s"
                if per_s >= 100
                else f"{per_s:.3g} {unit}/s"
            )
            if (eta := bar.eta_s()) is not None:
                rate += f", ETA {eta:.0f} s"
        return f"cortex: {describe(event, rate=rate, done_word=bar.done_word)} ({event.elapsed_s:.0f} s)"


class _LiveDisplay(_Display):
    def __init__(self, stream: TextIO) -> None:
        self.board = _LiveBoard.for_stream(stream)
        self.task: Any = None

    def show(self, bar: Bar, event: ProgressEvent, phase: bool) -> None:
        if event.state == "started":
            self.task = self.board.add(event)
        elif event.state == "running":
            self.board.update(self.task, event)
        else:
            self.board.remove(self.task, event, bar.done_word)


class _LiveBoard:
    """One live Rich display per stream, shared by the bars of every thread: Rich allows one
    live display at a time, and deploys run tasks side by side. Log handlers writing to the
    same stream print above the bars while it is live (not through them)."""

    _boards: dict[int, _LiveBoard] = {}
    _boards_lock = threading.Lock()

    @classmethod
    def for_stream(cls, stream: TextIO) -> _LiveBoard:
        with cls._boards_lock:
            return cls._boards.setdefault(id(stream), cls(stream))

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.progress: Any = None
        self.active = 0
        self.moved: list[tuple[Any, str, Any]] = []

    def add(self, event: ProgressEvent) -> Any:
        with self.lock:
            if self.progress is None:
                self._start()
            self.active += 1
            return self.progress.add_task(
                event.label, total=event.total, completed=event.done, unit=event.unit, note=event.note
            )

    def update(self, task: Any, event: ProgressEvent) -> None:
        with self.lock:
            if self.progress is not None:
                self.progress.update(task, completed=event.done, total=event.total, note=event.note)

    def remove(self, task: Any, event: ProgressEvent, done_word: str) -> None:
        with self.lock:
            if self.progress is None:
                return
            note = done_word if event.state == "done" else "failed"
            total = event.total if event.total else (1 if event.state == "done" else None)
            completed = total if event.state == "done" and total else event.done
            self.progress.update(task, completed=completed, total=total, note=note)
            self.progress.stop_task(task)
            self.active -= 1
            if self.active == 0:
                self._stop()

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(file=self.stream)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            _amount_column(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.progress.start()
        # Log lines written straight to the stream would land inside the live area and be
        # overwritten; through the console they print above it.
        proxy = _ConsoleProxy(console)
        for handler in _handlers():
            if getattr(handler, "stream", None) is self.stream:
                self.moved.append((handler, "stream", self.stream))
                handler.stream = proxy  # type: ignore[attr-defined]
            rich_console = getattr(handler, "console", None)
            if rich_console is not None and getattr(rich_console, "file", None) is self.stream:
                self.moved.append((rich_console, "file", self.stream))
                rich_console.file = proxy

    def _stop(self) -> None:
        self.progress.stop()
        self.progress = None
        for target, attribute, original in self.moved:
            setattr(target, attribute, original)
        self.moved = []


class _ConsoleProxy:
    """A text stream that prints whole lines through a live Rich console (above its bars)."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        if "\n" in self.buffer:
            lines, _, self.buffer = self.buffer.rpartition("\n")
            from rich.text import Text

            self.console.print(Text.from_ansi(lines), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.console.file.fileno() if hasattr(self.console.file, "fileno") else -1


def _handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [h for lg in loggers for h in lg.handlers]


def _amount_column() -> Any:
    """Rich loads only when a terminal shows bars."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class AmountColumn(ProgressColumn):
        """17/210 steps · 52.4/98.0 MB 12.3 MB/s ETA 0:00:04 · nothing for a phase-only bar."""

        def render(self, task: Any) -> Text:
            unit = task.fields.get("unit", "")
            if unit == "bytes":
                text = (
                    f"{format_bytes(task.completed)}/{format_bytes(task.total)}"
                    if task.total
                    else format_bytes(task.completed)
                )
                if task.speed:
                    text += f" {format_bytes(task.speed)}/s"
            elif task.total:
                text = f"{_count(task.completed)}/{_count(task.total)} {unit}".rstrip()
            elif task.completed:
                text = f"{_count(task.completed)} {unit}".rstrip()
            else:
                return Text("")
            remaining = task.time_remaining
            if task.total and remaining is not None and not task.finished:
                text += f" ETA {int(remaining) // 60}:{int(remaining) % 60:02d}"
            return Text(text)

    return AmountColumn()
