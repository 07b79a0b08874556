"""A minimal OpenAI-style engine that answers instantly: the upstream for gateway tests and for
benchmarks/gateway_bench.py (so only proxy cost is measured). Not a model: answers are canned.

    python -m cortex.testing.fake_engine --port 9001 [--api-key KEY] [--chunks 20] [--model NAME]...

Request fields it understands besides the OpenAI ones: `fake_chunks` (SSE events to send),
`fake_delay` (seconds between events), `fake_status` (answer with this status),
`fake_headers` (extra response headers of a plain answer, e.g. hop-by-hop ones), `fake_hold`
(a name: each token event waits for a permit of that name, given by `FakeEngine.release`, so a
test decides when a stream moves on instead of guessing how long it takes).
GET /_last returns the last request's body and headers (to check pass-through). GET /v1/models
lists `models` (the names the gateway's health pass looks for).
"""

from __future__ import annotations

import argparse
import asyncio
import threading

import httptools
import orjson


def _chat_json(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the fake engine."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13},
        }
    )


def _completion_json(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "text": " world", "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        }
    )


def _embedding_json(model: str) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3},
        }
    )


def _chunk(model: str, i: int, chat: bool) -> bytes:
    if chat:
        choice = {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": f"t{i} ", "finish_reason": None}
        obj = "text_completion"
    return (
        b"data: "
        + orjson.dumps(
            {"id": "chatcmpl-fake", "object": obj, "created": 1700000000, "model": model, "choices": [choice]}
        )
        + b"\n\n"
    )


class _Gate:
    """Permits for the token events of streams held on one name (used on the engine's loop only)."""

    def __init__(self) -> None:
        self.permits = 0
        self.opened = False
        self.waiters: list[asyncio.Future] = []

    async def take(self) -> None:
        while not self.opened and self.permits == 0:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter
        if not self.opened:
            self.permits -= 1

    def release(self, n: int | None) -> None:
        if n is None:
            self.opened = True
        else:
            self.permits += n
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


class _Conn(asyncio.Protocol):
    def __init__(self, engine: "FakeEngine") -> None:
        self.engine = engine
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []
        self.headers: dict[str, str] = {}
        self.url = b""
        self.streaming = False
        self.task: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.engine.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.engine.connections.discard(self)
        if self.streaming:
            self.engine.cancelled += 1
        if self.task is not None:
            self.task.cancel()  # a stream held on a gate would otherwise wait forever

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None  # connection_made comes before any data
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        headers = self.headers
        url = self.url
        self.body, self.headers, self.url = [], {}, b""
        self.engine.requests += 1
        method = self.parser.get_method()
        if url == b"/health":
            if self.engine.health_silent:
                return  # an engine too busy to answer its health endpoint: the check times out
            status = 200 if self.engine.healthy else 503
            self._send(status, b'{"status":"ok"}' if status == 200 else b'{"error":{"message":"loading"}}')
            return
        if url == b"/_last":
            self._send(200, orjson.dumps(self.engine.last))
            return
        if url == b"/v1/models" and method == b"GET":  # before `last`: the gateway's health passes ask it
            if self.engine.api_key and headers.get("authorization") != f"Bearer {self.engine.api_key}":
                self._send(401, b'{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}')
                return
            self._send(
                200,
                orjson.dumps(
                    {
                        "object": "list",
                        "data": [{"id": m, "object": "model", "owned_by": "fake"} for m in self.engine.models],
                    }
                ),
            )
            return
        self.engine.last = {"body": body.decode(errors="replace"), "headers": headers, "path": url.decode()}
        if self.engine.api_key and headers.get("authorization") != f"Bearer {self.engine.api_key}":
            self._send(401, b'{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}')
            return
        if method != b"POST":
            self._send(404, b'{"error":{"message":"not found"}}')
            return
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._send(400, b'{"error":{"message":"bad json"}}')
            return
        model = request.get("model", "fake")
        if "fake_status" in request:
            self._send(int(request["fake_status"]), b'{"error":{"message":"fake failure","type":"server_error"}}')
            return
        if url == b"/v1/embeddings":
            self._send(200, _embedding_json(model))
        elif url in (b"/v1/chat/completions", b"/v1/completions"):
            chat = url == b"/v1/chat/completions"
            if request.get("stream"):
                n = int(request.get("fake_chunks", self.engine.chunks))
                usage = bool((request.get("stream_options") or {}).get("include_usage"))
                hold = request.get("fake_hold")
                self.streaming = True
                self.task = asyncio.get_running_loop().create_task(
                    self._stream(
                        model,
                        n,
                        float(request.get("fake_delay", 0)),
                        chat,
                        usage,
                        self.engine.gate(str(hold)) if hold is not None else None,
                    )
                )
            elif request.get("fake_delay"):
                # A slow non-streaming answer (a long generation); cancelled if the caller leaves.
                self.streaming = True
                asyncio.get_running_loop().call_later(float(request["fake_delay"]), self._late, chat, model)
            else:
                extra = "".join(f"{k}: {v}\r\n" for k, v in (request.get("fake_headers") or {}).items())
                self._send(200, _chat_json(model) if chat else _completion_json(model), extra.encode())
        else:
            self._send(404, b'{"error":{"message":"not found"}}')

    def _late(self, chat: bool, model: str) -> None:
        assert self.transport is not None  # a request came in on it
        if not self.transport.is_closing():
            self.streaming = False
            self._send(200, _chat_json(model) if chat else _completion_json(model))

    def _send(self, status: int, body: bytes, extra_headers: bytes = b"") -> None:
        assert self.transport is not None  # a request came in on it
        self.transport.write(
            b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
            % (status, len(body), extra_headers)
            + body
        )

    async def _stream(self, model: str, n: int, delay: float, chat: bool, usage: bool, gate: _Gate | None) -> None:
        t = self.transport
        assert t is not None  # a request came in on it
        t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(n):
            if gate is not None:
                await gate.take()
            if t.is_closing():
                return
            data = _chunk(model, i, chat)
            t.write(b"%x\r\n%s\r\n" % (len(data), data))
            # Yield so each event is its own write, as an engine emitting tokens does.
            await asyncio.sleep(delay)
        if usage:
            data = (
                b"data: "
                + orjson.dumps(
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": 1700000000,
                        "model": model,
                        "choices": [],
                        "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
                    }
                )
                + b"\n\n"
            )
            t.write(b"%x\r\n%s\r\n" % (len(data), data))
        done = b"data: [DONE]\n\n"
        t.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        self.streaming = False
        self.task = None


class FakeEngine:
    """Serve on 127.0.0.1:`port` (0 picks one) in a background thread; `kill()` drops every
    connection at once, as a crashed engine does."""

    def __init__(
        self, port: int = 0, api_key: str | None = None, chunks: int = 20, models: tuple[str, ...] = ("fake",)
    ) -> None:
        self.port = port
        self.api_key = api_key
        self.models = models  # what GET /v1/models lists (it answers any model name in requests)
        self.chunks = chunks
        self.healthy = True
        self.health_silent = False  # True: /health gets no answer (requests still do)
        self.requests = 0
        self.cancelled = 0
        self.last: dict = {}
        self.connections: set[_Conn] = set()
        self.gates: dict[str, _Gate] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the fake engine was not started")
        return self._loop

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gate(self, name: str) -> _Gate:
        return self.gates.setdefault(name, _Gate())

    def release(self, name: str, events: int | None = None) -> None:
        """Let `events` more token events of the streams held on `name` go (None: all of them,
        now and later). Callable from any thread, before or after the streams arrive."""
        self._running_loop().call_soon_threadsafe(lambda: self.gate(name).release(events))

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Conn(self), "127.0.0.1", self.port, backlog=4096, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> "FakeEngine":
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(self.serve())
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="fake-engine")
        self._thread.start()
        if not ready.wait(120):
            raise RuntimeError("fake engine did not start")
        return self

    def kill(self) -> None:
        """Close the listener and reset every open connection (like kill -9)."""
        done = threading.Event()

        def do() -> None:
            assert self._server is not None  # serve() made it before the loop ran
            self._server.close()
            for conn in list(self.connections):
                assert conn.transport is not None  # connection_made added it to the set
                conn.transport.abort()
            done.set()

        self._running_loop().call_soon_threadsafe(do)
        if not done.wait(120):
            raise RuntimeError("fake engine did not close its connections")

    def restart(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.serve(), self._running_loop())
        fut.result(120)

    def stop(self) -> None:
        if self._loop is not None:
            self.kill()
            self._loop.call_soon_threadsafe(self._loop.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--api-key")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument(
        "--model", action="append", help="a model name GET /v1/models lists (repeatable; default: fake)"
    )
    args = parser.parse_args()
    engine = FakeEngine(args.port, args.api_key, args.chunks, tuple(args.model or ["fake"]))

    async def run() -> None:
        await engine.serve()
        print(f"fake engine on {engine.base_url}", flush=True)
        await asyncio.Event().wait()

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main()
