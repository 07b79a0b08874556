"""/metrics for the whole gateway when it runs several worker processes.

Each worker counts its own requests in plain dicts (metrics.py: nothing shared on the hot path)
and publishes a snapshot of them (`Metrics.snapshot`, marshal-encoded) into its own region of a
shared memory mapping, every maintenance tick (0.5 s) and whenever it answers a scrape. The
worker that answers a scrape publishes first, then adds up every worker's last snapshot. So a
scrape sees the other workers' numbers at most one tick old, and every number a scrape ever
showed was published first, which keeps the sums monotonic:

- a worker that dies leaves its last snapshot in its region; the supervisor starts its
  replacement on the same index, which takes that snapshot as its starting point (`inherited`)
  and publishes the two added up. Counters never go back when a worker is replaced; what the
  dead worker counted after its last publish (under one tick, never shown) is lost with it,
  like its requests in flight. Gauges (client connections) are not inherited.
- Per-key series stay bounded for the whole gateway: which keys get a label of their own is
  claimed in a table the workers share (`KeyLabels`), first come first served up to
  `gateway_metrics_max_keys`, the rest summed under key="other" in every worker alike.

A region holds two buffers and a sequence number: the worker (its region's only writer) writes
the buffer the readers are not told to read, then bumps the sequence; a reader copies the buffer
the sequence names and tries again if the sequence moved meanwhile. A worker that dies mid-write
leaves the previous snapshot readable.
"""

from __future__ import annotations

import logging
import marshal
import mmap
from contextlib import AbstractContextManager
from typing import Any

log = logging.getLogger("cortex.gateway")

# Bytes per worker region. Anonymous shared pages are only backed once written, so a large bound
# costs nothing until used; a snapshot of thousands of series is a few hundred kB.
REGION_BYTES = 16 * 1024 * 1024
HEADER = 32  # sequence, length of buffer 0, length of buffer 1 (8 bytes each), padding
# Key ids with their own /metrics series across the workers (gateway_metrics_max_keys above this
# is capped here), and bytes per id (ids are "key-" + 12 hex digits).
KEY_LABELS = 4096
KEY_BYTES = 64
READ_TRIES = 100


class SnapshotTooLarge(ValueError):
    pass


class MetricsExchange:
    """The workers' published snapshots and the shared key-label table. Made by the supervisor
    before it forks (inflight.InFlightBoard makes one); `worker` is set in each worker."""

    def __init__(self, workers: int, lock: AbstractContextManager) -> None:
        self.workers = workers
        self.buffer = (REGION_BYTES - HEADER) // 2
        self._map = mmap.mmap(-1, workers * REGION_BYTES)  # anonymous and MAP_SHARED: forks share it
        self._words = memoryview(self._map).cast("q")
        self._bytes = memoryview(self._map)
        self.labels = KeyLabels(lock)
        self.worker = -1
        self._warned = False

    def _base(self, worker: int) -> int:
        return worker * REGION_BYTES

    def publish(self, snapshot: dict) -> None:
        """Write this worker's snapshot where the others read it."""
        data = marshal.dumps(snapshot)
        if len(data) > self.buffer:
            if not self._warned:
                log.error(
                    "this worker's metrics snapshot is %d bytes, more than the %d a worker may publish; "
                    "other workers' /metrics answers show its last smaller one",
                    len(data),
                    self.buffer,
                )
                self._warned = True
            return
        base = self._base(self.worker)
        word = base // 8
        sequence = self._words[word]
        target = (sequence + 1) % 2  # the buffer readers are not reading
        start = base + HEADER + target * self.buffer
        self._bytes[start : start + len(data)] = data
        self._words[word + 1 + target] = len(data)
        self._words[word] = sequence + 1

    def read(self, worker: int) -> dict | None:
        """A worker's last published snapshot, None if it never published."""
        base = self._base(worker)
        word = base // 8
        error: Exception | None = None
        for _ in range(READ_TRIES):
            sequence = self._words[word]
            if sequence == 0:
                return None
            which = sequence % 2
            length = self._words[word + 1 + which]
            start = base + HEADER + which * self.buffer
            data = bytes(self._bytes[start : start + length])
            if self._words[word] == sequence:  # not rewritten while copied
                try:
                    return marshal.loads(data)
                except (ValueError, EOFError, TypeError) as e:
                    error = e  # only on a CPU that reorders stores (the sequence seen before the bytes): again
        log.warning(
            "could not read worker %d's metrics snapshot (it kept publishing%s); left out of this scrape",
            worker,
            f"; last decode error: {error!r}" if error is not None else "",
        )
        return None

    def others(self) -> list[dict]:
        """Every other worker's last snapshot."""
        found = (self.read(i) for i in range(self.workers) if i != self.worker)
        return [snap for snap in found if snap is not None]


class KeyLabels:
    """Key ids that have their own /metrics series, shared by the workers: a count and up to
    KEY_LABELS ids, appended under the workers' lock (inflight.ProcessLock). Each worker asks once
    per key (usage.UsageBook caches the answer), so the lock is off the request path."""

    def __init__(self, lock: AbstractContextManager) -> None:
        self._lock = lock
        self._map = mmap.mmap(-1, 8 + KEY_LABELS * KEY_BYTES)
        self._count = memoryview(self._map)[:8].cast("q")

    def claim(self, key_id: str, max_keys: int) -> bool:
        """True when the key has (or now gets) its own series."""
        raw = key_id.encode()
        if len(raw) >= KEY_BYTES:
            return False
        entry = raw.ljust(KEY_BYTES, b"\0")
        with self._lock:
            count = self._count[0]
            for i in range(count):
                at = 8 + i * KEY_BYTES
                if self._map[at : at + KEY_BYTES] == entry:
                    return True
            if count >= min(max_keys, KEY_LABELS):
                return False
            at = 8 + count * KEY_BYTES
            self._map[at : at + KEY_BYTES] = entry
            self._count[0] = count + 1
            return True


def without_gauges(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A dead worker's snapshot as its replacement inherits it: counters only."""
    return {name: value for name, value in snapshot.items() if name != "connections_open"}
