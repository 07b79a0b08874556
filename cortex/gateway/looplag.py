"""How far behind the gateway's event loop runs, so a check that timed out because the gateway
itself was busy is not blamed on the replica.

A timeout is measured on the loop's clock. If a callback holds the loop for 3 s, a 2 s health
check times out even when the replica answered at once: its answer sits unread in the socket
until the loop is free, and by then the timer has fired. A tick every INTERVAL records how late
it ran; `worst_since` gives the largest delay seen since a moment, including one still in
progress (a tick that is overdue now), so the caller can tell a slow replica from a slow
gateway.
"""

from __future__ import annotations

import asyncio
from collections import deque

INTERVAL = 0.1
# A delay under this is noise (scheduling, GC); only longer ones are kept.
NOTABLE = 0.01


class LoopLag:
    def __init__(self) -> None:
        self.delays: deque[tuple[float, float]] = deque(maxlen=1024)  # (loop time of the tick, its delay)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._handle = self._loop.call_later(INTERVAL, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        delay = now - self._last - INTERVAL
        if delay > NOTABLE:
            self.delays.append((now, delay))
        self._last = now
        self._handle = self._loop.call_later(INTERVAL, self._tick)

    def worst_since(self, since: float) -> float:
        """The longest the loop was held up between loop time `since` and now, in seconds."""
        if self._loop is None:
            return 0.0
        worst = max(0.0, self._loop.time() - self._last - INTERVAL)  # the tick due now has not run yet
        for at, delay in reversed(self.delays):
            if at < since:
                break
            worst = max(worst, delay)
        return worst
