"""Limits on client connections, enforced where the gateway's server (http.py) parses HTTP,
before the app runs.

Why (measured, issue 15): under plain uvicorn + httptools, one client without a key that
streamed one endless header in 1 MiB chunks slowed keyed requests from 30 ms to 20 s and got a
healthy replica taken out: httptools appends each piece of a header value to one bytes object,
so every chunk copies all the ones before it, on the event loop. Gateway memory grew from 75 to
371 MiB, and connections that never finished their headers were never closed.

Per connection (`http.HttpProtocol` enforces them with the `ConnectionGuard` of its process):

- a head size limit: the parser never sees more than `max_header_bytes` of one request head
  (request line and headers); past that the client gets 431 and the connection is closed;
- a head deadline: the head must be complete `header_timeout` seconds after the connection
  opened (or after its first byte, on a kept-alive connection), else 408 and close;
- a body stall limit (`body_timeout` without a byte of the body arriving: 408 and close) and a
  send stall limit (the client reads nothing for `send_timeout`: the connection is dropped);
- an idle kept-alive connection is closed after `keep_alive_timeout`;
- at most `max_per_client` open connections per client address (429 and close).

Deadlines are checked by one sweep per process (a timer every quarter of the shortest timeout,
at most 1 s apart, only while connections are open), so a request pays no timer of its own.
A rejection answers in OpenAI's error shape and closes the way nginx does (a "lingering
close"): answer, shut the write side, then read and discard what the client still sends for up
to LINGER_SECONDS or LINGER_BYTES, so the client reads the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..settings import Settings

if TYPE_CHECKING:
    from .http import HttpProtocol

LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    send_timeout: float
    keep_alive_timeout: float
    max_per_client: int  # 0: no limit

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConnectionLimits":
        return cls(
            max_header_bytes=settings.gateway_max_header_bytes,
            header_timeout=settings.gateway_header_timeout,
            body_timeout=settings.gateway_body_timeout,
            send_timeout=settings.gateway_send_timeout,
            max_per_client=settings.gateway_max_connections_per_client,
            keep_alive_timeout=settings.gateway_keep_alive_timeout,
        )

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024:
            raise ValueError(f"CORTEX_GATEWAY_MAX_HEADER_BYTES={self.max_header_bytes}: at least 1024")
        for name in ("header_timeout", "body_timeout", "send_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CORTEX_GATEWAY_{name.upper()}={getattr(self, name)}: must be above 0 seconds")
        if self.max_per_client < 0:
            raise ValueError(f"CORTEX_GATEWAY_MAX_CONNECTIONS_PER_CLIENT={self.max_per_client}: 0 or more")


class ConnectionGuard:
    """The client connections of one server process: counts per address, the deadline sweep,
    connections answered while lingering, and how many were refused for what."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: set[HttpProtocol] = set()
        self.per_client: dict[str, int] = {}
        self.lingering: dict[asyncio.Transport, float] = {}  # transport -> loop time to drop it
        self.rejected: Counter[str] = Counter()  # error code -> connections
        shortest = min(limits.header_timeout, limits.body_timeout, limits.send_timeout, limits.keep_alive_timeout)
        self.interval = min(max(shortest / 4, 0.05), 1.0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def admit(self, protocol: HttpProtocol) -> bool:
        address = protocol.address
        count = self.per_client.get(address, 0)
        if self.limits.max_per_client and count >= self.limits.max_per_client:
            return False
        self.per_client[address] = count + 1
        self.open.add(protocol)
        self._arm(protocol.loop)
        return True

    def forget(self, protocol: HttpProtocol) -> None:
        if protocol in self.open:
            self.open.discard(protocol)
            left = self.per_client[protocol.address] - 1
            if left:
                self.per_client[protocol.address] = left
            else:
                del self.per_client[protocol.address]

    def linger(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        """Shut the write side once the answer is out, then discard input until the client
        closes, LINGER_BYTES arrived or LINGER_SECONDS passed."""
        if transport.is_closing():
            return
        try:
            transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            transport.close()
            return
        self.lingering[transport] = loop.time() + LINGER_SECONDS
        transport.set_protocol(_Discard(self, transport))
        self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None:
            self._loop = loop
            self._timer = loop.call_later(self.interval, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        assert self._loop is not None  # set with the timer
        now = self._loop.time()
        for protocol in list(self.open):
            protocol.check_deadlines(now)
        for transport, deadline in list(self.lingering.items()):
            if now >= deadline:
                self.lingering.pop(transport, None)
                transport.abort()
        if self.open or self.lingering:
            self._arm(self._loop)


class _Discard(asyncio.Protocol):
    """Reads and drops what a refused client still sends, so closing does not reset the
    connection before the client has read its answer."""

    def __init__(self, guard: ConnectionGuard, transport: asyncio.Transport) -> None:
        self.guard = guard
        self.transport = transport
        self.left = LINGER_BYTES

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0:
            self.guard.lingering.pop(self.transport, None)
            self.transport.abort()

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.lingering.pop(self.transport, None)
