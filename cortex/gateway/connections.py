"""Limits on client connections, enforced where uvicorn parses HTTP, before the app runs.

Why (measured, issue 15): under plain uvicorn + httptools, one client without a key that
streamed one endless header in 1 MiB chunks slowed keyed requests from 30 ms to 20 s and got a
healthy replica taken out: httptools appends each piece of a header value to one bytes object,
so every chunk copies all the ones before it, on the event loop. Gateway memory grew from 75 to
371 MiB, and connections that never finished their headers were never closed.

`GuardedHttpToolsProtocol` is uvicorn's httptools protocol with, per connection:

- a head size limit: the parser never sees more than `max_header_bytes` of one request head
  (request line and headers); past that the client gets 431 and the connection is closed;
- a head deadline: the head must be complete `header_timeout` seconds after the connection
  opened (or after its first byte, on a kept-alive connection), else 408 and close;
- a body stall limit (`body_timeout` without a byte of the body arriving: 408 and close) and a
  send stall limit (the client reads nothing for `send_timeout`: the connection is dropped);
- at most `max_per_client` open connections per client address (429 and close).

Idle kept-alive connections are closed by uvicorn's own `timeout_keep_alive`.

It also writes a response's head and its first body bytes in one system call (`HeadWithBody`):
uvicorn writes the head the moment the app sends `http.response.start`, and the body with the
next message, two writes where one does. Measured with py-spy at c=64 (issue 14), the head's
separate write was a fifth of the gateway's CPU per request: on loopback each write also runs
the client's receive path and wakes it.

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
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..settings import Settings
from .asgi import ERROR_TYPES, error_body

LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    send_timeout: float
    max_per_client: int  # 0: no limit

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConnectionLimits":
        return cls(
            max_header_bytes=settings.gateway_max_header_bytes,
            header_timeout=settings.gateway_header_timeout,
            body_timeout=settings.gateway_body_timeout,
            send_timeout=settings.gateway_send_timeout,
            max_per_client=settings.gateway_max_connections_per_client,
        )

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024:
            raise ValueError(f"CORTEX_GATEWAY_MAX_HEADER_BYTES={self.max_header_bytes}: at least 1024")
        for name in ("header_timeout", "body_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CORTEX_GATEWAY_{name.upper()}={getattr(self, name)}: must be above 0 seconds")
        if self.max_per_client < 0:
            raise ValueError(f"CORTEX_GATEWAY_MAX_CONNECTIONS_PER_CLIENT={self.max_per_client}: 0 or more")


class ConnectionGuard:
    """The client connections of one server process: counts per address, the deadline sweep,
    connections answered while lingering, and how many were refused for what."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: set[GuardedHttpToolsProtocol] = set()
        self.per_client: dict[str, int] = {}
        self.lingering: dict[asyncio.Transport, float] = {}  # transport -> loop time to drop it
        self.rejected: Counter[str] = Counter()  # error code -> connections
        shortest = min(limits.header_timeout, limits.body_timeout, limits.send_timeout)
        self.interval = min(max(shortest / 4, 0.05), 1.0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def admit(self, protocol: GuardedHttpToolsProtocol) -> bool:
        address = protocol.client[0] if protocol.client else ""
        count = self.per_client.get(address, 0)
        if self.limits.max_per_client and count >= self.limits.max_per_client:
            return False
        self.per_client[address] = count + 1
        protocol.address = address
        self.open.add(protocol)
        self._arm(protocol.loop)
        return True

    def forget(self, protocol: GuardedHttpToolsProtocol) -> None:
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


class HeadWithBody:
    """The transport as one request's uvicorn cycle sees it: the cycle's first write (the
    response head) is held and goes out with the next write (the first body bytes), or at the
    end of this turn of the event loop when no body follows in it (a stream whose first event is
    still on its way, which then gets its head as early as before, give or take one turn)."""

    __slots__ = ("transport", "held", "fresh")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.held: bytes | None = None
        self.fresh = True  # nothing written yet

    def write(self, data: bytes) -> None:
        if self.fresh:
            self.fresh = False
            self.held = data
            asyncio.get_running_loop().call_soon(self.flush)
            return
        held = self.held
        if held is not None:
            self.held = None
            data = held + data
        self.transport.write(data)

    def flush(self) -> None:
        held = self.held
        if held is not None:
            self.held = None
            if not self.transport.is_closing():
                self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of `guard` (see the module's docstring).
    Use `protocol_class(guard)`, which makes the subclass uvicorn instantiates per connection."""

    guard: ConnectionGuard
    max_head: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.address = ""
        # Where a request stands, from uvicorn's own state and one callback: a head is pending
        # while `self.cycle` is still the cycle that was current when the head began
        # (`head_cycle`); on_headers_complete makes a new cycle, whose body is arriving until
        # on_message_complete records it as `done_cycle` (uvicorn's own `more_body` is not
        # cleared when the app answered before the body was in).
        self.head_cycle: Any = None
        self.done_cycle: Any = None
        self.stall_cycle: Any = None
        self.head_left = self.max_head
        self.head_since: float | None = None  # loop time the pending head began
        self.reads = 0  # data events during a body: the stall check compares them
        self.reads_seen = 0
        self.stalled_since = 0.0
        self.write_paused_since: float | None = None

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_since = self.loop.time()  # a connection that sends nothing times out too
        if not self.guard.admit(self):
            self.reject(
                429,
                f"too many connections from {self.client[0] if self.client else 'this client'} "
                f"(at most {self.guard.limits.max_per_client}); reuse connections or retry later",
                "too_many_connections",
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is not self.done_cycle and cycle is not self.head_cycle:  # a body
            self.reads += 1
            super().data_received(data)
            if cycle is not None and self.scope is not cycle.scope:
                self._count_head_after_body(cycle)
            return
        if cycle is not self.head_cycle or self.head_since is None:  # the first byte of a new head
            self.head_cycle = cycle
            self.head_left = self.max_head
            self.head_since = self.loop.time()
        left = self.head_left
        if len(data) <= left:
            self.head_left = left - len(data)
            super().data_received(data)
            return
        # More than the head may still hold: let the parser see only what is allowed, and go
        # on only if the head ended within it (the rest is body or the next request).
        if left > 0:
            super().data_received(data[:left])
        if self.transport.is_closing():
            return
        if self.cycle is not self.head_cycle:  # on_headers_complete ran: a new cycle
            self.data_received(data[left:])
            return
        self.reject(431, f"request head larger than {self.max_head} bytes", "request_header_too_large")

    def _count_head_after_body(self, body_cycle: Any) -> None:
        """A read ended a body and a next head began in it (uvicorn made that head a new scope):
        count what the parser took of the head, which it parsed unchecked."""
        taken = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) + 16
        if self.cycle is body_cycle:  # the head is not complete yet: the rest counts against it
            self.head_cycle, self.head_left, self.head_since = body_cycle, self.max_head - taken, self.loop.time()
        if taken > self.max_head:
            self.reject(431, f"request head larger than {self.max_head} bytes", "request_header_too_large")

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not before and cycle is not None:  # a new request: its own head-with-body writer
            cycle.transport = HeadWithBody(self.transport)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self.done_cycle = self.cycle
        super().on_message_complete()

    def pause_writing(self) -> None:
        self.write_paused_since = self.loop.time()
        super().pause_writing()

    def resume_writing(self) -> None:
        self.write_paused_since = None
        super().resume_writing()

    # --- limits ------------------------------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        limits = self.guard.limits
        cycle = self.cycle
        if cycle is self.head_cycle:  # a head is pending (or, before any byte, the first one)
            if self.head_since is not None and now - self.head_since > limits.header_timeout:
                self.reject(408, f"request head not complete within {limits.header_timeout:g} s", "header_timeout")
        elif cycle is not self.done_cycle:  # a body is arriving
            if self.flow.read_paused or cycle is not self.stall_cycle or self.reads != self.reads_seen:
                # Progress, a new body, or uvicorn holding the body back: the stall clock restarts.
                self.stall_cycle, self.reads_seen, self.stalled_since = cycle, self.reads, now
            elif now - self.stalled_since > limits.body_timeout:
                if cycle.response_complete:
                    # Answered without its body (a 401, say): nothing more to say, only to close.
                    self.guard.rejected["body_timeout"] += 1
                    self.transport.close()
                else:
                    self.reject(408, f"request body stalled for {limits.body_timeout:g} s", "body_timeout")
        elif self.write_paused_since is not None and now - self.write_paused_since > limits.send_timeout:
            self.guard.rejected["send_timeout"] += 1
            self.transport.abort()  # the client reads nothing: no answer can reach it

    def reject(self, status: int, message: str, code: str) -> None:
        """Answer `status` with an OpenAI-style error and close the connection."""
        self.guard.rejected[code] += 1
        transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete  # a request here is still being answered
        if busy and cycle.response_started:
            transport.abort()  # mid-response: there is no room for another answer
            return
        body = error_body(message, ERROR_TYPES[status], code)
        transport.write(
            b"%scontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (STATUS_LINE[status], len(body), body)
        )
        if busy:
            transport.close()  # its body stalled; connection_lost tells the app the client is gone
            return
        # No request in progress: hand the socket to a discarding protocol (lingering close).
        self.guard.forget(self)
        self.connections.discard(self)
        self._unset_keepalive_if_required()
        self.guard.linger(transport, self.loop)


def protocol_class(guard: ConnectionGuard) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to pass as uvicorn's `http=`: one per guard (uvicorn makes one
    instance per connection and gives it no other way to reach shared state)."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"guard": guard, "max_head": guard.limits.max_header_bytes},
    )
