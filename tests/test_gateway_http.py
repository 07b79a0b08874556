"""The gateway's own HTTP/1.1 server (cortex/gateway/http.py), byte by byte on real sockets:
pipelining, HTTP/1.0, Connection: close, chunked bodies both ways, HEAD, Expect: 100-continue,
the idle keep-alive timeout, malformed requests, and a graceful stop. A real gateway process in
front of the fake engine each time; waits are hang guards, never assertions on speed."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from cortex.gateway.http import Request
from cortex.testing.gateway import Gateways

GUARD = 60.0  # seconds: a hang guard, not an expectation


@pytest.fixture
def gateway(tmp_path):
    gateways = Gateways(tmp_path, own_homes=True)
    yield gateways
    gateways.stop_all()


@pytest.fixture
def served(gateway, engine):
    """A gateway with the fake engine registered as "smol", and a client key."""
    gw = gateway()
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
        key = c.create_key()["key"]
    return gw, key


class Wire:
    """A raw client connection that reads whole responses, keeping what follows for the next."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD)
        self.buf = b""

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"the gateway closed the connection; unread: {self.buf[:200]!r}")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def response(self, head_only: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, headers, body) of the next response; the body as its framing delimits it."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            assert name.lower() not in headers, f"header {name!r} twice: {head!r}"
            headers[name.lower()] = value.strip()
        if head_only or status == 100:
            return status, headers, b""
        if b"content-length" in headers:
            return status, headers, self._take(int(headers[b"content-length"]))
        if headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size = int(self._line(), 16)
                if size == 0:
                    assert self._line() == b"", "chunked body without its final empty line"
                    return status, headers, body
                body += self._take(size)
                assert self._take(2) == b"\r\n"
        return status, headers, self.until_closed()

    def until_closed(self) -> bytes:
        """What the gateway still sends until it closes the connection (a reset counts as closed)."""
        data, self.buf = self.buf, b""
        deadline = time.monotonic() + GUARD
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
        raise AssertionError(f"the gateway kept the connection open for {GUARD} s; got {data[:200]!r}")


def chat(key: str, body: dict, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    payload = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/%s\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (version, key.encode(), len(payload), extra, payload)
    )


HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
HI = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}


def events(body: bytes) -> list[bytes]:
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def test_pipelined_requests_are_answered_in_order(served):
    gw, key = served
    with Wire(gw.port) as w:
        w.send(
            HEALTH
            + chat(key, HI)
            + b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n"  # no key: 401
            + chat(key, {**HI, "stream": True})
            + HEALTH
        )
        answers = [w.response() for _ in range(5)]
        assert [status for status, _, _ in answers] == [200, 200, 401, 200, 200]
        assert json.loads(answers[1][2])["object"] == "chat.completion"
        assert answers[1][1][b"x-cortex-model"] == b"smol"
        assert json.loads(answers[2][2])["error"]["code"] == "invalid_api_key"
        assert events(answers[3][2])[-1] == b"[DONE]"
        # and the connection is still good for more
        w.send(HEALTH)
        assert w.response()[0] == 200


def test_http_10_and_connection_close(served):
    gw, key = served
    # HTTP/1.0: answered with a length, then closed.
    with Wire(gw.port) as w:
        w.send(b"GET /health HTTP/1.0\r\n\r\n")
        status, headers, body = w.response()
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert headers[b"connection"] == b"close"
        assert w.until_closed() == b""
    # HTTP/1.0 asking to keep the connection: kept, and said so.
    with Wire(gw.port) as w:
        for _ in range(2):
            w.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = w.response()
            assert status == 200 and headers[b"connection"] == b"keep-alive"
    # A stream to an HTTP/1.0 client is not chunked (1.0 has no chunks): it ends with the connection.
    with Wire(gw.port) as w:
        w.send(chat(key, {**HI, "stream": True}, version=b"1.0"))
        status, headers, body = w.response()
        assert status == 200 and b"transfer-encoding" not in headers and headers[b"connection"] == b"close"
        assert events(body)[-1] == b"[DONE]" and len(events(body)) == 21
    # HTTP/1.1 with Connection: close.
    with Wire(gw.port) as w:
        w.send(b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        status, headers, _ = w.response()
        assert status == 200 and headers[b"connection"] == b"close"
        assert w.until_closed() == b""


def test_chunked_both_ways(served):
    gw, key = served
    with Wire(gw.port) as w:
        # A stream (no length from the engine) goes out chunked, and the connection carries on.
        w.send(chat(key, {**HI, "stream": True}))
        status, headers, body = w.response()
        assert status == 200 and headers[b"transfer-encoding"] == b"chunked"
        assert headers[b"content-type"].startswith(b"text/event-stream")
        got = events(body)
        assert got[-1] == b"[DONE]" and len(got) == 21
        assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in got[:-1])
        # A chunked request body, in pieces of 7 bytes: the engine gets it whole.
        payload = json.dumps(HI).encode()
        pieces = b"".join(
            b"%x\r\n%s\r\n" % (len(payload[i : i + 7]), payload[i : i + 7]) for i in range(0, len(payload), 7)
        )
        w.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % (key.encode(), pieces)
        )
        status, _, body = w.response()
        assert status == 200 and json.loads(body)["object"] == "chat.completion", body
        w.send(HEALTH)
        assert w.response()[0] == 200


def test_head_has_no_body_and_expect_100_continue_is_answered(served):
    gw, key = served
    with Wire(gw.port) as w:
        w.send(b"HEAD /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        status, headers, _ = w.response(head_only=True)
        assert int(headers[b"content-length"]) > 0  # what a GET would get...
        w.send(HEALTH)  # ...but no body bytes: the next thing on the wire is the next response
        assert w.response()[0] == 200
        payload = json.dumps(HI).encode()
        w.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
            % (key.encode(), len(payload))
        )
        assert w.response()[0] == 100
        w.send(payload)
        status, _, body = w.response()
        assert status == 200 and json.loads(body)["object"] == "chat.completion"


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: gw\r\nno colon here\r\n\r\n",
        b"GET /health HTTP/9.9\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_a_malformed_request_gets_400_in_openai_shape_and_a_close(gateway, garbage):
    gw = gateway()
    with Wire(gw.port) as w:
        w.send(garbage)
        status, headers, body = w.response()
        error = json.loads(body)["error"]
        assert status == 400 and error["code"] == "invalid_http_request" and error["type"] == "invalid_request_error"
        assert headers[b"connection"] == b"close"
        assert w.until_closed() == b""
    # After a good request on the same connection, the good one is answered first.
    with Wire(gw.port) as w:
        w.send(HEALTH + garbage)
        assert w.response()[0] == 200
        assert w.response()[0] == 400
        assert w.until_closed() == b""


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(gateway):
    gw = gateway(CORTEX_GATEWAY_KEEP_ALIVE_TIMEOUT="1")
    with Wire(gw.port) as w:
        w.send(HEALTH)
        assert w.response()[0] == 200
        assert w.until_closed() == b""  # closed by the gateway, without a word


def test_a_response_header_with_cr_or_lf_is_refused():
    """The one check on response heads (http.py's docstring): a value that would start a header
    of its own is refused, whoever made it; ordinary heads pass."""

    def request() -> Request:  # _head reads no connection
        return Request(None, "GET", "/", b"/", b"", [], None, True, False)  # type: ignore[arg-type]

    head = request()._head(200, [(b"content-type", b"application/json"), (b"content-length", b"2")])
    assert head == b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
    for value in (b"a\r\nx-injected: 1", b"a\nx-injected: 1", b"a\rb"):
        with pytest.raises(ValueError, match="CR or LF"):
            request()._head(200, [(b"x-a", value)])


def test_a_replica_header_with_a_bare_line_feed_never_reaches_the_client(served):
    """Headers copied from a replica went through llhttp, which refuses CR/LF in a value: the
    reply fails as invalid HTTP instead of carrying an injected header."""
    gw, key = served
    with Wire(gw.port) as w:
        w.send(chat(key, {**HI, "fake_headers": {"X-Evil": "a\nX-Injected: yes"}}))
        status, headers, body = w.response()
    assert status >= 500 and b"x-injected" not in headers, (status, headers, body)


def test_sigterm_lets_the_stream_in_flight_finish_then_stops(served):
    gw, key = served
    with Wire(gw.port) as w:
        w.send(chat(key, {**HI, "stream": True, "fake_chunks": 20, "fake_delay": 0.1}))
        while b"data: " not in w.buf:  # the stream is under way
            w._fill()
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        status, headers, body = w.response()
        assert status == 200 and events(body)[-1] == b"[DONE]" and len(events(body)) == 21
        assert w.until_closed() == b""  # closed after that answer, not kept alive
    assert gw.proc.wait(GUARD) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=GUARD).close()
    # the shutdown ran: the access-log line of that request was written
    lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
    assert any(line.get("path") == "/v1/chat/completions" and line.get("stream") for line in lines), gw.log()[-2000:]
