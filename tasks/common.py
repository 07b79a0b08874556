"""What every Cortex task shares: its Prefect options, the shape of its artifact keys, and the
progress artifact its long work keeps up to date."""

from __future__ import annotations

import re
import time
from typing import Any, cast
from uuid import UUID

from prefect.cache_policies import NO_CACHE

from cortex.progress import ProgressEvent, Reporter, describe

# No task is cached or keeps its result in Prefect: each call must really start, test, measure or
# build (what is reusable, e.g. a built GGUF, is cached by Cortex itself).
TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def artifact_key(*parts: str) -> str:
    """`parts` joined by dashes as a Prefect artifact key, which allows lowercase letters,
    digits and dashes only; the same parts always give the same key, so a flow can find a
    subflow's artifacts by recomputing it."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class ProgressArtifact:
    """A Prefect progress artifact that follows one task's progress bars (a sink of
    `cortex.progress.Reporter`): created at 0 when the task starts, updated at most once per
    `every_s` seconds (at once when a bar starts, ends or enters a new phase), 100 at `finish`.

    Its percentage is the bytes (or other `unit`) done of `total` when the task knows the total
    of all its bars (a download), else the mean over `parts` bars of each one's fraction done
    (a build of two files, a benchmark of four levels). Its description is the latest bar's
    state: "download model.safetensors: 52.4 MB/98.0 MB (53%)"."""

    def __init__(
        self,
        key: str,
        description: str,
        *,
        total: float | None = None,
        unit: str = "bytes",
        parts: int = 1,
        every_s: float = 1.0,
    ) -> None:
        from prefect.artifacts import create_progress_artifact

        self.total, self.unit, self.parts, self.every_s = total, unit, max(1, parts), every_s
        self.bars: dict[str, ProgressEvent] = {}
        self.last_sent = 0.0
        # called from sync code, so the id itself (Prefect's dispatch types it as maybe a coroutine)
        self.id = cast(UUID, create_progress_artifact(progress=0.0, key=key, description=description))

    def reporter(self) -> Reporter:
        """A reporter that shows bars on stderr (live or plain lines) and feeds this artifact."""
        return Reporter(sinks=[self])

    def __call__(self, event: ProgressEvent) -> None:
        before = self.bars.get(event.label)
        self.bars[event.label] = event
        urgent = event.state != "running" or (before is not None and before.note != event.note)
        now = time.monotonic()
        if urgent or now - self.last_sent >= self.every_s:
            self.last_sent = now
            self._send(describe(event))

    def part_done(self, label: str, note: str) -> None:
        """Count a part that needed no work (a file already in the cache) as done."""
        self.bars[label] = ProgressEvent(label, "", 1, 1, note, "done", 0.0)
        self._send(f"{label}: {note}")

    def percent(self) -> float:
        if self.total:
            done = sum(
                (e.total or e.done) if e.state == "done" else e.done for e in self.bars.values() if e.unit == self.unit
            )
            return 100.0 * done / self.total
        return 100.0 * sum(e.fraction or 0.0 for e in self.bars.values()) / max(self.parts, len(self.bars))

    def finish(self, description: str) -> None:
        self._send(description, percent=100.0)

    def _send(self, description: str, percent: float | None = None) -> None:
        from prefect.artifacts import update_progress_artifact

        value = self.percent() if percent is None else percent
        update_progress_artifact(self.id, progress=max(0.0, min(100.0, value)), description=description)
