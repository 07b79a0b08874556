"""Requests in flight per replica, counted across the worker processes of one gateway.

Least-in-flight routing (routing.py) must see every worker's requests, or N workers balance
N separate halves of the load. `cortex gateway --workers N` makes an `InFlightBoard` before it
forks the workers: an anonymous shared memory mapping (MAP_SHARED, inherited by the forked
workers, gone with the last of them) of slots, one per replica id:

    slot = [id hash, count of worker 0 .. count of worker N-1, holds of worker 0 .. N-1]

Each worker writes only its own count cells, so an increment needs no lock: a worker's cell has
one writer, the worker's single event-loop thread, and an aligned 8-byte store is not torn on the
platforms we run on. A reader sums the N cells of a slot; a sum may be a moment old (another
worker's update not yet visible), which only matters as much as a request arriving a moment
later would. The slot of a replica id is found by open addressing on a hash of the id, the same
in every worker, so workers that load the registry at different moments agree on it. Taking and
giving back a slot (when a worker first routes to a replica, and when it has dropped it and has
nothing in flight on it) is rare and goes under one lock shared by the workers; a slot is freed
once no worker holds it. When a worker dies, the supervisor zeroes its cells (`forget_worker`)
before starting its replacement: its requests died with it.

The lock is a POSIX record lock (`fcntl.lockf`) on the memory file that holds the slots, not a
semaphore: the kernel releases a process's record locks when it dies, so a worker killed while
it holds the lock (the OOM killer, SIGKILL) cannot leave the others blocked. A slot it was
changing is left either not yet claimed or claimed with its hold, which `forget_worker` drops.

The board also carries the workers' shared /metrics (`metrics`, workermetrics.py).

A gateway with one worker uses `LocalCount`, a plain integer, as before.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import tempfile
from typing import Protocol

from .workermetrics import MetricsExchange

log = logging.getLogger("cortex.gateway")

EMPTY = 0
FREED = -1  # a freed slot: probing continues past it, a claim may reuse it
DEFAULT_SLOTS = 8192


class InFlightCount(Protocol):
    mine: int  # this worker's requests in flight on the replica

    def add(self, n: int) -> None: ...

    def total(self) -> int: ...

    def release(self) -> None: ...


class LocalCount:
    """One process's count: the whole gateway when it runs one worker."""

    __slots__ = ("mine",)

    def __init__(self) -> None:
        self.mine = 0

    def add(self, n: int) -> None:
        self.mine += n

    def total(self) -> int:
        return self.mine

    def release(self) -> None:
        pass


class SharedCount:
    """A replica's slot on the board, as one worker uses it."""

    __slots__ = ("mine", "board", "slot", "cell", "first", "end")

    def __init__(self, board: "InFlightBoard", slot: int) -> None:
        self.mine = 0
        self.board = board
        self.slot = slot
        base = slot * board.stride
        self.first, self.end = base + 1, base + 1 + board.workers
        self.cell = self.first + board.worker

    def add(self, n: int) -> None:
        self.mine += n
        cells = self.board.cells
        cells[self.cell] += n

    def total(self) -> int:
        return sum(self.board.cells[self.first : self.end])

    def release(self) -> None:
        """This worker no longer routes to the replica and has nothing in flight on it."""
        if self.slot >= 0:
            self.board.give_back(self.slot)
            self.slot = -1


class BoardFull(RuntimeError):
    pass


class ProcessLock:
    """A lock between processes that dies with its holder: a POSIX record lock on byte 0 of a
    file they share (inherited across fork). Not reentrant and not for threads of one process:
    the record lock belongs to the process, and each worker is one event-loop thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> "ProcessLock":
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0, os.SEEK_SET)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0, os.SEEK_SET)


def _shared_file(size: int) -> int:
    """A file descriptor of `size` zero bytes that lives in memory and vanishes with its last user."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("cortex-gateway-board")
    else:  # macOS: an unlinked temporary file
        fd = os.dup(tempfile.TemporaryFile().fileno())
    os.ftruncate(fd, size)
    return fd


class InFlightBoard:
    """The shared slots of one gateway's workers (see the module's docstring). Made in the
    supervisor before the workers fork; each worker calls `attach(index)` first thing."""

    def __init__(self, workers: int, slots: int = DEFAULT_SLOTS) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.slots = slots
        self.stride = 1 + 2 * workers  # id hash, counts, holds
        self._fd = _shared_file(slots * self.stride * 8)
        self._map = mmap.mmap(self._fd, slots * self.stride * 8)  # MAP_SHARED: the forked workers share it
        self.cells = memoryview(self._map).cast("q")
        self._lock = ProcessLock(self._fd)
        self.metrics = MetricsExchange(workers, self._lock)
        self.worker = -1

    def attach(self, worker: int) -> None:
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} is not in 0..{self.workers - 1}")
        self.worker = self.metrics.worker = worker

    @staticmethod
    def _hash(replica_id: str) -> int:
        value = int.from_bytes(hashlib.blake2b(replica_id.encode(), digest_size=8).digest(), "big") >> 1
        return value or 1  # 0 marks an empty slot

    def count(self, replica_id: str) -> SharedCount:
        """This worker's count on the replica's slot, holding the slot until `release`."""
        if self.worker < 0:
            raise RuntimeError("InFlightBoard.attach(worker) was not called in this process")
        key = self._hash(replica_id)
        cells, stride = self.cells, self.stride
        hold = 1 + self.workers + self.worker
        with self._lock:
            reuse = -1
            start = key % self.slots
            for probe in range(self.slots):
                slot = (start + probe) % self.slots
                held = cells[slot * stride]
                if held == key:
                    cells[slot * stride + hold] += 1
                    return SharedCount(self, slot)
                if held == FREED and reuse < 0:
                    reuse = slot
                elif held == EMPTY:
                    if reuse < 0:
                        reuse = slot
                    break
            if reuse < 0:
                raise BoardFull(f"all {self.slots} in-flight slots are taken; restart the gateway")
            base = reuse * stride
            cells[base : base + stride] = memoryview(bytes(8 * stride)).cast("q")
            cells[base] = key
            cells[base + hold] = 1
            return SharedCount(self, reuse)

    def give_back(self, slot: int) -> None:
        base = slot * self.stride
        with self._lock:
            hold = base + 1 + self.workers + self.worker
            if self.cells[hold] > 0:
                self.cells[hold] -= 1
            if not any(self.cells[base + 1 + self.workers : base + self.stride]):
                self.cells[base] = FREED

    def forget_worker(self, worker: int) -> None:
        """Zero a dead worker's counts and holds (called by the supervisor before it replaces it)."""
        cells, stride = self.cells, self.stride
        with self._lock:
            for slot in range(self.slots):
                base = slot * stride
                if cells[base] not in (EMPTY, FREED):
                    cells[base + 1 + worker] = 0
                    cells[base + 1 + self.workers + worker] = 0
                    if not any(cells[base + 1 + self.workers : base + stride]):
                        cells[base] = FREED
