"""A minimal HTTP/1.1 client for the hot path: pooled keep-alive connections to one replica.

Why not httpx here: on this machine an httpx request costs several hundred microseconds of
CPU, more than the whole per-request budget of the gateway (see benchmarks/gateway_bench.py).
This client is an asyncio Protocol around httptools' response parser: it writes one
pre-assembled request, hands body bytes to the caller as they arrive (pausing the socket when
the caller falls behind, so memory stays bounded), and returns the connection to its pool only
after a complete response on a keep-alive connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import ClassVar

import httptools

# Pause reading from a replica when this many body bytes wait for a slow client.
HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """The replica failed. `sent_nothing` means it sent no byte, so another replica may retry."""

    kind: ClassVar[str] = "upstream_error"  # ClassVar: a class attribute under mypyc (compiled.py) too

    def __init__(self, message: str, sent_nothing: bool) -> None:
        super().__init__(message)
        self.sent_nothing = sent_nothing


class ConnectError(UpstreamError):
    kind: ClassVar[str] = "connect"


class ConnectTimeout(ConnectError):
    """The replica did not accept the connection in time (unlike a refusal, a busy gateway can
    cause this: see looplag.py)."""


class ClosedError(UpstreamError):
    kind: ClassVar[str] = "upstream_closed"


class TimeoutError_(UpstreamError):
    kind: ClassVar[str] = "timeout"


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time."""

    __slots__ = (
        "pool",
        "transport",
        "parser",
        "status",
        "headers",
        "chunks",
        "buffered",
        "waiter",
        "headers_done",
        "complete",
        "error",
        "received",
        "paused",
        "closed",
        "framed",
        "last_activity",
        "reused",
        "keep_alive",
    )

    def __init__(self, pool: "ConnectionPool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        # The parser is kept: llhttp is ready for the next response once one completes.
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.waiter: asyncio.Future | None = None
        self.headers_done = False
        self.complete = False
        self.error: UpstreamError | None = None
        self.received = False
        self.paused = False
        self.framed = False
        self.keep_alive = False
        self.last_activity = time.monotonic()

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        self.last_activity = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = UpstreamError(f"replica sent invalid HTTP: {exc}", sent_nothing=not self.headers_done)
            assert self.transport is not None  # connection_made comes before any data
            self.transport.close()
        # One wake per read, not one per parser callback: the waiter runs after this returns anyway.
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if not self.complete and self.error is None:
            if self.headers_done and not self.framed:
                self.complete = True  # body delimited by the connection closing
            else:
                self.error = ClosedError(
                    "replica closed the connection" + (f": {exc}" if exc else ""),
                    sent_nothing=not self.received,
                )
        self._wake()

    # --- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Read here: after the message completes, llhttp has reset and always answers False.
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            assert self.transport is not None  # connection_made comes before any data
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- used by the gateway ---------------------------------------------------------------

    # The waits are written out in response_headers and read, not shared in a coroutine of
    # their own: one coroutine less to create and resume per wait on the hot path.

    async def response_headers(self) -> None:
        """Wait for the status line and headers (raises UpstreamError)."""
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            self.waiter = self.pool.loop.create_future()  # type: ignore[union-attr]  # set by connect
            try:
                await self.waiter
            finally:
                self.waiter = None

    def ready(self) -> bool:
        """Whether `read_ready` has something to give: body bytes, or the end of the body."""
        return bool(self.chunks) or self.complete

    def read_ready(self) -> bytes | None:
        """What `read` would return at once, when `ready()`: no coroutine (the usual case for a
        small answer, which comes whole in the read that brought its head)."""
        chunks = self.chunks
        if not chunks:
            return None  # complete
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.paused:
            self.paused = False
            assert self.transport is not None  # paused in on_body, after connection_made
            self.transport.resume_reading()
        return data

    async def read(self) -> bytes | None:
        """The body bytes that arrived since the last call; None at the end of the body."""
        while True:
            if self.chunks or self.complete:
                return self.read_ready()
            if self.error is not None:
                raise self.error
            self.waiter = self.pool.loop.create_future()  # type: ignore[union-attr]  # set by connect
            try:
                await self.waiter
            finally:
                self.waiter = None

    def abort(self, reason: str, kind: type[UpstreamError] = ClosedError) -> None:
        """Close the connection now (client went away, or the replica stalled)."""
        if self.error is None and not self.complete:
            self.error = kind(reason, sent_nothing=not self.received)
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def finish(self) -> None:
        """Give the connection back to the pool if it can carry another request."""
        self.pool.release(self)


class ConnectionPool:
    """Idle keep-alive connections to one replica (LIFO, so warm sockets are reused first)."""

    def __init__(self, host: str, port: int, connect_timeout: float, max_idle: int = 256) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle: deque[UpstreamConnection] = deque()
        self.busy: set[UpstreamConnection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def take(self) -> UpstreamConnection | None:
        """An idle kept-alive connection, ready for a request; None when there is none."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn._reset()
                conn.reused = True
                self.busy.add(conn)
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection (the gateway asks `take` first: an idle one needs no coroutine)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"connect to {self.host}:{self.port} timed out", sent_nothing=True) from None
        except OSError as exc:
            raise ConnectError(f"connect to {self.host}:{self.port} failed: {exc}", sent_nothing=True) from None
        self.busy.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        self.busy.discard(conn)
        if (
            conn.closed
            or not conn.complete
            or conn.error is not None
            or not conn.keep_alive
            or len(self.idle) >= self.max_idle
        ):
            if not conn.closed and conn.transport is not None:
                conn.transport.close()
            return
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.busy.discard(conn)
        if conn in self.idle:  # closed while idle; else it was busy, or already handed back closed
            self.idle.remove(conn)

    def abort_stalled(self, now: float, read_timeout: float) -> None:
        for conn in list(self.busy):
            if not conn.complete and not conn.paused and now - conn.last_activity > read_timeout:
                conn.abort(f"replica sent nothing for {read_timeout:g} s", TimeoutError_)

    def close(self) -> None:
        for conn in list(self.idle) + list(self.busy):
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
