"""The gateway's own HTTP/1.1 server: an asyncio Protocol around httptools' request parser (C)
that hands each request to the gateway with the least work per request, on uvloop.

Why (measured, issue 14): under uvicorn a bare ASGI app answering a constant already cost about
29 µs of CPU per request, and uvicorn's checks of response headers (a regex per header) another
12, more than the gateway's own steps. This server does only what the gateway needs, and not
through ASGI: the app gets a `Request` (method, path, headers, the body the parser already has)
that is also its responder (`start`/`write`/`end`, `respond`), with no message dicts and no
`receive`/`send` coroutines per message; a callback tells it when the client leaves; and a
response head goes out with the first body bytes in one write (on loopback each write also runs
the client's receive path and wakes it).

HTTP/1.1 as clients expect it: keep-alive (closed after `keep_alive_timeout` idle), HTTP/1.0 and
`Connection: close`, responses without a content-length sent chunked (close-delimited to an
HTTP/1.0 client), HEAD without a body, `Expect: 100-continue`, chunked request bodies (httptools
decodes them), pipelined requests answered in order (the next is parsed only when the previous
answer is complete; bytes that arrive before then wait, and reading pauses), a malformed request
answered 400 in OpenAI's error shape, and write flow control (`send` waits while the client is
behind). The client-connection limits of connections.py are enforced here, where the bytes come in.

Response headers are not checked one by one with a regex: the gateway makes its own headers, and
those it copies from a replica went through llhttp, which refuses CR, LF and NUL in a header value
(the replica's response then fails as invalid HTTP). One count of CR and LF over the whole head
still refuses a head with more lines than headers, so no header can inject another.
"""

from __future__ import annotations

import asyncio
import http
import logging
import signal
import socket
from collections import deque
from typing import Any, Callable, Coroutine, Protocol
from urllib.parse import unquote

import httptools
import orjson
import uvloop

from .errors import ERROR_TYPES, BodyTooLarge, ClientGone, error_body
from .connections import ConnectionGuard

log = logging.getLogger("cortex.gateway")


BACKLOG = 4096  # pending connections the listening socket holds
HIGH_WATER = 64 * 1024  # request body bytes the app has not read yet before reading pauses
MAX_PIPELINED = 64  # requests parsed ahead of the one being answered; more: 400 and close
# Seconds in-flight requests get to finish after SIGTERM/SIGINT before their connections are
# dropped; below the 30 s a multi-worker supervisor waits for a worker (server.py).
SHUTDOWN_GRACE = 25.0


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode())


STATUS_LINE = {code: _status_line(code) for code in range(100, 600)}
METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (shared by the workers of server.py)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port}: {exc} (another process holds the port? set --port or CORTEX_GATEWAY_PORT)"
        ) from None
    return sock


class Request:
    """One request on a connection, as the gateway sees it, and its response.

    The request: `method`, `path` (percent-decoded), `raw_path`, `query` (bytes), `headers`
    (names lower-cased), `client`, and the body through `read_body`. The response: `start`,
    then `write` (with `drain` between writes of a stream) and `end`; or in one call `respond`,
    `send_json`, `send_raw`, `send_error`. `on_gone` names a callback for the client leaving
    before the response is complete. No message dicts and no per-message coroutines: the body
    the parser already has is handed over as it is, and a response head goes out with the first
    body bytes in one write."""

    __slots__ = (
        "proto",
        "method",
        "path",
        "raw_path",
        "query",
        "headers",
        "client",
        "keep_alive",
        "http10",
        "head_only",
        "expect_100",
        "body",
        "buffered",
        "body_done",
        "started",
        "complete",
        "chunked",
        "held",
        "disconnected",
        "gone",
        "waiter",
    )

    def __init__(
        self,
        proto: HttpProtocol,
        method: str,
        path: str,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        keep_alive: bool,
        http10: bool,
    ) -> None:
        self.proto = proto
        self.method = method
        self.path = path
        self.raw_path = raw_path
        self.query = query
        self.headers = headers
        self.client = client
        self.keep_alive = keep_alive
        self.http10 = http10
        self.head_only = method == "HEAD"
        # Expect: 100-continue and no 100 sent yet; None: not looked up (only done when the body is late)
        self.expect_100: bool | None = None
        self.body: list[bytes] = []
        self.buffered = 0
        self.body_done = False  # the parser has seen the whole body
        self.started = False
        self.complete = False  # the response is sent in full
        self.chunked = False
        self.held: bytes | None = None  # the response head, waiting for the first body bytes
        self.disconnected = False
        self.gone: Callable[[], None] | None = None  # on_gone's callback
        self.waiter: asyncio.Future | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def on_gone(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` once if the client leaves before the response is complete (at once
        if it has left already); None: no more calls."""
        self.gone = callback
        if callback is not None and self.disconnected and not self.complete:
            self.gone = None
            callback()

    def client_left(self) -> None:
        """The connection is going (http.py): wake a wait for the body, tell the app."""
        self.disconnected = True
        self.wake()
        gone = self.gone
        if gone is not None and not self.complete:
            self.gone = None
            gone()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self.waiter = self.proto.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    # --- the request body ------------------------------------------------------------------------

    async def read_body(self, limit: int) -> bytes:
        """The whole body. Raises BodyTooLarge past `limit` bytes, ClientGone when the client
        leaves first. Returns at once when the body came with the head (the usual case)."""
        parts: list[bytes] = []
        size = 0
        while True:
            if self.disconnected:
                raise ClientGone()
            chunks = self.body
            if chunks:
                size += self.buffered
                self.body = []
                self.buffered = 0
                if size > limit:
                    raise BodyTooLarge()
                parts += chunks
                proto = self.proto
                if proto.read_paused and not proto.backlog:
                    proto.read_paused = False
                    proto.transport.resume_reading()
            if self.body_done:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self.expect_100 is None:
                self.expects_continue()
            if self.expect_100:
                self.expect_100 = False  # owed no more
                self.proto.transport.write(CONTINUE)
            await self._wait()

    def expects_continue(self) -> None:
        """Look up whether the client sent `Expect: 100-continue` (it waits for a 100 before its body)."""
        self.expect_100 = False
        for name, value in self.headers:
            if name == b"expect" and value.lower() == b"100-continue":
                self.expect_100 = True

    # --- the response ----------------------------------------------------------------------------

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The status and headers; without a content-length the body is sent chunked (to an
        HTTP/1.0 client: delimited by the connection closing). The head goes out with the first
        body bytes, or for a chunked body by the end of this turn of the loop."""
        if self.started:
            raise RuntimeError("response started twice")
        self.started = True
        if self.disconnected:
            return
        if not self.body_done and self.expect_100 is None:
            self.expects_continue()
        if self.expect_100 and not self.body_done:
            # Answered without asking for the body: the client may send it or not, so this
            # connection cannot be reused (nginx does the same).
            self.keep_alive = False
        self.held = self._head(status, headers)
        if not self.chunked and not self.head_only:
            return
        # A stream: its first bytes may be a while coming, so the head goes out by the end of
        # this turn of the loop whatever comes (with its first bytes when they come in time).
        self.proto.loop.call_soon(self.flush_head)

    def write(self, data: bytes) -> bool:
        """Body bytes, more to come. True when the client is behind: await `drain` before the
        next write."""
        self._send(data, True)
        return self.proto.write_paused

    def end(self, data: bytes = b"") -> None:
        """The last body bytes: the response is complete."""
        self._send(data, False)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response, head and body in one write."""
        self.start(status, headers)
        self._send(body, False)

    def send_raw(self, status: int, body: bytes, content_type: bytes) -> None:
        self.respond(status, [(b"content-type", content_type), (b"content-length", b"%d" % len(body))], body)

    def send_json(self, status: int, payload: Any) -> None:
        self.send_raw(status, orjson.dumps(payload), b"application/json")

    def send_error(
        self,
        status: int,
        message: str,
        code: str,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        param: str | None = None,
    ) -> None:
        """An error in OpenAI's shape, `status` with its error type (ERROR_TYPES)."""
        body = error_body(message, ERROR_TYPES.get(status, "server_error"), code, param)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if extra_headers:
            headers += extra_headers
        self.respond(status, headers, body)

    async def drain(self) -> None:
        """Wait while the client is behind (its socket's buffer is full)."""
        proto = self.proto
        if proto.write_paused:
            await proto.drain()

    def _send(self, body: bytes, more: bool) -> None:
        if not self.started or self.complete:
            raise RuntimeError("response body " + ("after the response ended" if self.complete else "before its start"))
        if self.disconnected:
            return
        if self.head_only:
            body = b""
        elif self.chunked:
            if body:
                body = b"%x\r\n%b\r\n" % (len(body), body)
            if not more:
                body += b"0\r\n\r\n"
        held = self.held
        if held is not None:
            self.held = None
            body = held + body
        proto = self.proto
        if body:
            proto.transport.write(body)
        if not more:
            self.complete = True
            proto.response_complete(self)

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        parts = [STATUS_LINE.get(status) or _status_line(status)]
        framed = False
        for name, value in headers:
            if name == b"content-length":
                framed = True
            parts += (name, b": ", value, b"\r\n")
        if not framed and status >= 200 and status != 204 and status != 304 and not self.head_only:
            if self.http10:
                self.keep_alive = False  # the body ends when the connection does
            else:
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        lines = len(parts) - 3 * len(headers)  # status, each header, our own, the empty line
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError(f"a response header holds CR or LF: {headers!r}")
        return head

    def flush_head(self) -> None:
        held = self.held
        if held is not None and not self.disconnected:
            self.held = None
            self.proto.transport.write(held)


class HttpProtocol(asyncio.Protocol):
    """One client connection (see the module's docstring): parses requests, runs the app for
    each in turn, and enforces the limits of the server's ConnectionGuard."""

    __slots__ = (
        "server",
        "loop",
        "guard",
        "limits",
        "max_head",
        "parser",
        "transport",
        "client",
        "address",
        "url",
        "headers",
        "active",
        "queue",
        "parsing",
        "backlog",
        "read_paused",
        "write_paused",
        "write_paused_since",
        "drained",
        "head_pending",
        "head_left",
        "head_since",
        "idle_since",
        "reads",
        "reads_seen",
        "stall_request",
        "stalled_since",
        "broken",
        "closed",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.guard = server.guard
        self.limits = server.guard.limits
        self.max_head = self.limits.max_header_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.client: tuple[str, int] | None = None
        self.address = ""
        # the head being parsed
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        # requests: the one being answered, those parsed ahead of it, the one whose body is being read
        self.active: Request | None = None
        self.queue: deque[Request] = deque()
        self.parsing: Request | None = None
        self.backlog = b""  # bytes that came while a request was answered, parsed after it
        self.read_paused = False
        self.write_paused = False
        self.write_paused_since: float | None = None
        self.drained: asyncio.Future | None = None
        # where the connection stands, for the limits
        self.head_pending = False  # a head began and is not complete
        self.head_left = self.max_head  # bytes the pending (or next) head may still take
        self.head_since: float | None = None  # loop time the pending head's first byte came
        self.idle_since: float | None = None  # loop time a kept-alive connection went idle
        self.reads = 0  # reads during a body: the stall check compares them
        self.reads_seen = 0
        self.stall_request: Request | None = None
        self.stalled_since = 0.0
        self.broken: tuple[int, str, str] | None = None  # the error to answer once the active request is done
        self.closed = False

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = (peer[0], peer[1])
            self.address = peer[0]
        self.head_since = self.loop.time()  # a connection that sends nothing times out too
        if not self.guard.admit(self):
            self.reject(
                429,
                f"too many connections from {self.address or 'this client'} "
                f"(at most {self.limits.max_per_client}); reuse connections or retry later",
                "too_many_connections",
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.guard.forget(self)
        self._drop_requests()
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        active = self.active
        if active is not None:
            if active.body_done:  # being answered: the next request waits its turn
                self.backlog += data
                if not self.read_paused:
                    self.read_paused = True
                    self.transport.pause_reading()
                return
            self.reads += 1  # its body is arriving
            self._feed(data)
            if active.body_done and active.complete and active.keep_alive:  # answered before its body was in
                self._finish(active)
            return
        # A head (the first byte of one, or more of a pending one): the parser sees no more of it
        # than the limit allows.
        if self.head_since is None:
            self.head_since = self.loop.time()
            self.head_left = self.max_head
            self.idle_since = None
        left = self.head_left
        if len(data) <= left:
            self.head_left = left - len(data)
            self._feed(data)
            return
        if left > 0:
            self._feed(data[:left])
        if self.closed or self.transport.is_closing():
            return
        if self.active is not None:  # the head ended within what was allowed: the rest is body or next
            self.data_received(data[left:])
            return
        self.reject(431, f"request head larger than {self.max_head} bytes", "request_header_too_large")

    def eof_received(self) -> bool:
        return False  # the client is done sending: close, and the app sees it gone

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_since = self.loop.time()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.write_paused_since = None
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            drained = self.drained
            if drained is None or drained.done():
                drained = self.drained = self.loop.create_future()
            await drained

    # --- httptools callbacks ---------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade (or CONNECT): the request is answered as plain HTTP; what follows is in
            # another protocol, so the connection closes after the answer.
            last = self.queue[-1] if self.queue else self.active
            if last is not None:
                last.keep_alive = False
        except httptools.HttpParserError as exc:
            error = (400, f"malformed HTTP request: {exc}", "invalid_http_request")
            active = self.active
            if active is None or not active.body_done:
                self.reject(*error)
            else:  # after a complete request: answer that first
                self.broken = error

    # No on_message_begin: the URL is the first part of every head (one Python call less each).
    def on_url(self, url: bytes) -> None:
        self.head_pending = True
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.head_pending = False
        if self.broken is not None:  # the connection ends after the active request: no more requests
            self.url, self.headers = b"", []
            return
        if self.active is not None:
            # Parsed ahead, in the read that ended the previous request: the feed did not meter
            # this head, so its size is checked here.
            if self._head_taken() > self.max_head:
                self.broken = (431, f"request head larger than {self.max_head} bytes", "request_header_too_large")
                self.url, self.headers = b"", []
                return
            if len(self.queue) >= MAX_PIPELINED:
                self.broken = (400, f"more than {MAX_PIPELINED} pipelined requests", "too_many_pipelined_requests")
                self.url, self.headers = b"", []
                return
        parser = self.parser
        url = self.url
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
            if b"#" in query:
                query = query.partition(b"#")[0]
            elif b"#" in raw_path:
                raw_path = raw_path.partition(b"#")[0]
        else:  # absolute form ("http://host/path"), or "*"
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raw_path, query = b"*", b""
            else:
                raw_path, query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path, encoding="latin-1")
        method = parser.get_method()
        request = Request(
            self,
            METHODS.get(method) or method.decode("latin-1"),
            path,
            raw_path,
            query,
            self.headers,
            self.client,
            parser.should_keep_alive(),
            parser.get_http_version() == "1.0",
        )
        self.url = b""
        self.headers = []
        self.parsing = request
        self.head_since = None
        if self.active is None:
            self._start(request)
        else:
            self.queue.append(request)

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None or request.complete:  # answered already: the rest is read and dropped
            return
        request.body.append(body)
        request.buffered += len(body)
        if request.buffered > HIGH_WATER and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        if request.waiter is not None:  # usually not: the body came with the head, before any wait
            request.wake()

    def on_message_complete(self) -> None:
        request = self.parsing
        if request is None:
            return
        self.parsing = None
        request.body_done = True
        if request.waiter is not None:
            request.wake()

    # --- requests ----------------------------------------------------------------------------------

    def _head_taken(self) -> int:
        """About how many bytes of the pending head the parser has taken (what it handed over)."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) + 16

    def _start(self, request: Request) -> None:
        self.active = request
        self.idle_since = None
        self.loop.call_soon(Run(self.server.run(request)).step)

    def response_complete(self, request: Request) -> None:
        if not request.keep_alive:
            if request.body_done and not self.backlog:
                self.transport.close()
            else:  # the client may still be sending: read it away so it gets the answer, not a reset
                self.guard.forget(self)
                self.closed = True
                self.guard.linger(self.transport, self.loop)
            self._drop_requests()
        elif request.body_done:
            self._finish(request)
        # else: the rest of the body is read and dropped; on_message_complete's read finishes it

    def _finish(self, request: Request) -> None:
        """The active request is answered and its body read: on to the next one."""
        self.active = None
        if self.broken is not None:
            self.reject(*self.broken)
            return
        if self.queue:
            self._start(self.queue.popleft())
        elif self.head_pending:  # the next head began in the read that ended this request
            self.head_since = self.loop.time()
            self.head_left = self.max_head - self._head_taken()
            if self.head_left < 0:
                self.reject(431, f"request head larger than {self.max_head} bytes", "request_header_too_large")
                return
        else:
            self.idle_since = self.loop.time()
        backlog = self.backlog
        if backlog:
            self.backlog = b""
            self.data_received(backlog)
        if self.read_paused and not self.backlog and not self.closed:
            active: Request | None = self.active
            if active is None or active.buffered <= HIGH_WATER:
                self.read_paused = False
                self.transport.resume_reading()

    def _drop_requests(self) -> None:
        """The connection is going: the requests on it see the client gone."""
        active = self.active
        if active is not None:
            active.client_left()
        self.queue.clear()

    def app_failed(self, request: Request, exc: BaseException) -> None:
        if not isinstance(exc, asyncio.CancelledError):
            log.error("Exception in the gateway while answering a request", exc_info=exc)
        self.app_unfinished(request)

    def app_unfinished(self, request: Request) -> None:
        """The app returned or raised without completing its response."""
        if request.complete or request.disconnected or self.closed:
            return
        if request.started:  # a truncated body must not pass for a whole one
            self.transport.close()
            self._drop_requests()
            return
        body = error_body("the gateway failed to answer this request; see its log", "server_error", "internal_error")
        self.transport.write(
            STATUS_LINE[500]
            + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body
        )
        request.started = request.complete = True
        self.transport.close()
        self._drop_requests()

    def shutdown(self) -> None:
        """The server is stopping: close when idle, else after the answer in progress."""
        if self.closed:
            return
        active = self.active
        if active is None:
            self.transport.close()
        else:
            active.keep_alive = False
            self.queue.clear()

    # --- limits ------------------------------------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        limits = self.limits
        active = self.active
        if active is None:
            if self.head_since is not None:
                if now - self.head_since > limits.header_timeout:
                    self.reject(408, f"request head not complete within {limits.header_timeout:g} s", "header_timeout")
            elif self.idle_since is not None and now - self.idle_since > limits.keep_alive_timeout:
                self.transport.close()  # idle kept-alive connection: closed without a word, like nginx
            return
        if self.write_paused_since is not None and now - self.write_paused_since > limits.send_timeout:
            self.guard.rejected["send_timeout"] += 1
            self._drop_requests()
            self.transport.abort()  # the client reads nothing: no answer can reach it
            return
        if not active.body_done:  # its body is arriving
            if self.read_paused or active is not self.stall_request or self.reads != self.reads_seen:
                # Progress, a new body, or the app holding the body back: the stall clock restarts.
                self.stall_request, self.reads_seen, self.stalled_since = active, self.reads, now
            elif now - self.stalled_since > limits.body_timeout:
                if active.complete:
                    # Answered without its body (a 401, say): nothing more to say, only to close.
                    self.guard.rejected["body_timeout"] += 1
                    self.transport.close()
                else:
                    self.reject(408, f"request body stalled for {limits.body_timeout:g} s", "body_timeout")

    def reject(self, status: int, message: str, code: str) -> None:
        """Answer `status` with an OpenAI-style error and close the connection."""
        transport = self.transport
        if self.closed or transport.is_closing():
            return
        self.guard.rejected[code] += 1
        active = self.active
        busy = active is not None and not active.complete  # a request here is still being answered
        if busy and active.started:  # type: ignore[union-attr]  # busy: active is set
            self._drop_requests()
            transport.abort()  # mid-response: there is no room for another answer
            return
        body = error_body(message, ERROR_TYPES[status], code)
        transport.write(
            STATUS_LINE[status]
            + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body
        )
        self._drop_requests()
        if busy:
            transport.close()  # its body stalled: the app sees the client gone
            return
        # No request in progress: hand the socket to a discarding protocol (lingering close).
        self.closed = True
        self.guard.forget(self)
        self.guard.linger(transport, self.loop)


class Run:
    """Runs the app for one request, in place of an asyncio.Task: each time the coroutine waits
    on a future, it is stepped again when that future is done (what a Task does, less what the
    gateway does not use: a Task per request cost about a tenth of the request's CPU, most of it
    in creating it, registering it in asyncio's task set and copying the context, measured with
    callgrind). A coroutine run this way has no current task, so whatever needs one
    (`asyncio.timeout`, anyio and httpx) runs in a Task of its own: Gateway.__call__ does that
    for the admin API. Nothing cancels a request's run: a client that leaves is told through
    Request.on_gone."""

    __slots__ = ("coro",)

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self.coro = coro

    def step(self, _done: object = None) -> None:
        try:
            awaited = self.coro.send(None)
        except StopIteration:
            return
        # (Server.run answers every Exception itself; anything else propagates to the loop)
        if awaited is None:  # a bare yield (asyncio.sleep(0)): again on the next turn
            asyncio.get_running_loop().call_soon(self.step)
            return
        awaited._asyncio_future_blocking = False  # as a Task does: the future is being waited on
        awaited.add_done_callback(self.step)


class App(Protocol):
    """What the server runs: the gateway (app.Gateway)."""

    async def __call__(self, request: Request) -> None: ...

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...


class Server:
    """One process's server: the app, its connections' guard, and the requests running."""

    def __init__(self, app: App, guard: ConnectionGuard) -> None:
        self.app = app
        self.guard = guard
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by serve()
        self.running = 0  # app calls in progress
        self.stopping: asyncio.Event | None = None
        self.force = False

    async def run(self, request: Request) -> None:
        self.running += 1
        try:
            await self.app(request)
        except BaseException as exc:
            request.proto.app_failed(request, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not request.complete:
                request.proto.app_unfinished(request)
        finally:
            self.running -= 1

    def _signal(self, signum: int) -> None:
        assert self.stopping is not None
        if self.stopping.is_set() and signum == signal.SIGINT:
            self.force = True  # a second Ctrl-C: stop waiting for requests
        self.stopping.set()

    async def serve(self, sock: socket.socket) -> None:
        """Start the app, accept on `sock` until SIGTERM or SIGINT, then stop accepting, let
        requests in flight finish (at most SHUTDOWN_GRACE seconds) and shut the app down."""
        loop = self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._signal, signum)
        await self.app.startup()
        try:
            server = await loop.create_server(lambda: HttpProtocol(self), sock=sock, backlog=BACKLOG)
            await self.stopping.wait()
            server.close()
            for proto in list(self.guard.open):
                proto.shutdown()
            deadline = loop.time() + SHUTDOWN_GRACE
            while (self.guard.open or self.running) and not self.force and loop.time() < deadline:
                await asyncio.sleep(0.1)
            for proto in list(self.guard.open):
                proto._drop_requests()
                proto.transport.abort()
            deadline = loop.time() + 1.0
            while self.running and loop.time() < deadline:  # the apps see their clients gone
                await asyncio.sleep(0.05)
        finally:
            await self.app.shutdown()


def run(app: App, guard: ConnectionGuard, sock: socket.socket) -> None:
    """Serve `app` (the gateway: called with each Request, with startup() and shutdown()) on `sock`, on
    uvloop, until SIGTERM or SIGINT."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(Server(app, guard).serve(sock))
