"""The gateway: a raw ASGI application (no framework on the hot path).

Routes: POST /v1/chat/completions, /v1/completions, /v1/embeddings (proxied by `model`),
GET /v1/models, GET /health, GET /metrics, GET /openapi.json, and the admin API under /admin
(see ADMIN_ROUTES). Run it with `cortex gateway` (uvicorn, uvloop, httptools).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import time
from typing import Any, Awaitable, Callable

import httpx
import orjson

from ..settings import Settings
from . import openapi
from .accesslog import AccessLog
from .identity import verify_replica
from .metrics import Metrics
from .registry import Registry, RegistryError
from .routing import UNCHECKED, Replica, RoutingTable
from .upstream import ClosedError, UpstreamConnection, UpstreamError

log = logging.getLogger("cortex.gateway")

# Seconds a proxied request runs before the gateway starts watching for the client leaving.
WATCH_AFTER = 0.05
PROXY_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
# Upstream response headers that describe the upstream connection, not the response.
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"transfer-encoding", b"proxy-connection", b"upgrade", b"te", b"trailer", b"server")
)
USAGE_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
USAGE_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected; nothing more can be sent to it."""


class BodyTooLarge(Exception):
    pass


class AbortResponse(Exception):
    """The replica failed after the response started and the format has no error event: the
    server closes the client's connection so a truncated body is never taken as complete."""


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


async def send_error(send: Send, status: int, message: str, code: str, extra_headers: list | None = None) -> None:
    body = error_body(message, ERROR_TYPES.get(status, "server_error"), code)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, payload: Any) -> None:
    body = orjson.dumps(payload)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
    })
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BodyTooLarge()
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


class RequestState:
    """Per-request flags shared with the disconnect watcher."""

    __slots__ = ("done", "client_gone", "conn", "timer", "watcher")

    def __init__(self) -> None:
        self.done = False
        self.client_gone = False
        self.conn: UpstreamConnection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.watcher: asyncio.Task | None = None

    def stop_watching(self) -> None:
        self.done = True
        assert self.timer is not None  # set right after the state is made
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


class Gateway:
    """The ASGI application. `settings` decides auth mode, limits and the registry file."""

    def __init__(self, settings: Settings, registry: Registry | None = None,
                 access_log: AccessLog | None = None) -> None:
        self.settings = settings
        self.registry = registry or Registry(settings.gateway_db)
        self.admin_token = settings.resolve_admin_token(create=True).encode()
        self.no_auth = settings.gateway_no_auth
        self.max_body = settings.gateway_max_body_bytes
        self.access_log = access_log if settings.gateway_access_log else None
        self.retry_after = str(max(1, math.ceil(settings.gateway_health_interval))).encode()
        self.table = RoutingTable(settings.gateway_connect_timeout)
        self.metrics = Metrics()
        self._data_version = -1
        self._tasks: list[asyncio.Task] = []
        self._health_client: httpx.AsyncClient | None = None
        self._checks: set[asyncio.Task] = set()  # checks of new replicas, held until done
        self.reload()

    # --- state ------------------------------------------------------------------------------

    def reload(self) -> None:
        """Rebuild the routing table from the registry."""
        self._data_version = self.registry.data_version()
        before = set(self.table.replicas.values())
        gone = self.table.sync(self.registry.replicas(), self.registry.aliases(), self.registry.keys())
        for replica in gone:
            if replica.in_flight == 0:
                replica.pool.close()
        self._check_new([r for r in self.table.replicas.values() if r not in before])

    def _maybe_reload(self) -> None:
        if self.registry.data_version() != self._data_version:
            self.reload()

    def _release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        if replica.in_flight == 0:
            if replica.state == "draining" and not replica.removed:
                self._finish_drain(replica)
            elif replica.removed:
                replica.pool.close()

    def _finish_drain(self, replica: Replica) -> None:
        log.info("replica %s drained; removing it", replica.id)
        try:
            self.registry.deregister(replica.id)
        except RegistryError:
            pass  # already removed by another process or an admin call
        self.reload()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def startup(self) -> None:
        self._health_client = httpx.AsyncClient(timeout=self.settings.gateway_health_timeout)
        self._tasks.append(asyncio.create_task(self._maintain()))
        self._tasks.append(asyncio.create_task(self._health_loop()))

    async def shutdown(self) -> None:
        for task in (*self._tasks, *self._checks):
            task.cancel()
        for task in (*self._tasks, *self._checks):
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        if self._health_client is not None:
            await self._health_client.aclose()
        for replica in self.table.replicas.values():
            replica.pool.close()
        if self.access_log is not None:
            self.access_log.flush()

    async def _maintain(self) -> None:
        """Pick up other processes' registry writes; fail requests whose replica went silent."""
        while True:
            await asyncio.sleep(0.5)
            try:
                self._maybe_reload()
            except Exception:
                log.exception("reloading the registry %s failed; keeping the current table", self.registry.path)
            now = time.monotonic()
            for replica in list(self.table.replicas.values()):
                replica.pool.abort_stalled(now, self.settings.gateway_read_timeout)
                # Drained by another process, or before a restart: remove once idle here.
                if replica.state == "draining" and replica.in_flight == 0 and not replica.removed:
                    self._finish_drain(replica)
            if self.access_log is not None:
                self.access_log.flush()

    async def _health_loop(self) -> None:
        while True:
            replicas = list(self.table.replicas.values())
            if replicas:
                results = await asyncio.gather(*(self.check_health(r) for r in replicas), return_exceptions=True)
                for replica, result in zip(replicas, results):
                    if isinstance(result, Exception):  # a bug, not a down replica: keep checking the rest
                        log.error("health check of %s crashed: %r", replica.id, result)
            await asyncio.sleep(self.settings.gateway_health_interval)

    async def check_health(self, replica: Replica) -> bool:
        """/health without the engine's key, then whether the registered engine is the one that
        answers (cortex.gateway.identity); only then is the replica routable."""
        assert self._health_client is not None  # made in start(), before the health loop runs
        verdict = await verify_replica(self._health_client, replica.url, replica.model, replica.engine_api_key)
        ok = verdict.healthy
        if ok != replica.healthy or (not ok and verdict.reason != replica.reason and verdict.impostor):
            if ok:
                log.info("replica %s (%s) is healthy", replica.id, replica.model)
            elif verdict.impostor:
                log.error("replica %s (%s) at %s taken out: %s", replica.id, replica.model, replica.url, verdict.reason)
            else:
                log.warning("replica %s (%s) taken out: %s", replica.id, replica.model, verdict.reason)
        replica.healthy, replica.reason = ok, verdict.reason
        return ok

    def _check_new(self, replicas: list[Replica]) -> None:
        """Verify replicas the registry just added (another process's registration, a restart)
        now rather than at the next health pass: until then they are not routable."""
        if self._health_client is None or not replicas:
            return  # not serving yet: the health loop's first pass checks them
        for replica in replicas:
            task = self.loop.create_task(self._check_unchecked(replica))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _check_unchecked(self, replica: Replica) -> None:
        if replica.reason == UNCHECKED:  # not since marked healthy by its registration
            await self.check_health(replica)

    def _mark_failed(self, replica: Replica, error: UpstreamError) -> None:
        if replica.healthy:
            log.warning("replica %s (%s) taken out after a failed request: %s", replica.id, replica.model, error)
            replica.healthy = False

    # --- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            if path in PROXY_PATHS:
                if scope["method"] != "POST":
                    await send_error(send, 405, f"{path} accepts POST", "method_not_allowed")
                    return
                await self.proxy(scope, receive, send)
            elif path.startswith("/admin"):
                await self.admin(scope, receive, send)
            elif path == "/v1/models" and scope["method"] == "GET":
                await self.list_models(scope, send)
            elif path == "/health" and scope["method"] == "GET":
                await send_json(send, 200, {"status": "ok", "models": len(self.table.available_models())})
            elif path == "/metrics" and scope["method"] == "GET":
                body = self.metrics.render(self.table.replicas.values())
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/plain; version=0.0.4")]})
                await send({"type": "http.response.body", "body": body})
            elif path == "/openapi.json" and scope["method"] == "GET":
                await send_json(send, 200, openapi.schema())
            else:
                await send_error(send, 404, f"no route {scope['method']} {path}", "not_found")
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    raise
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- client auth --------------------------------------------------------------------------

    def authenticate(self, scope: Scope):
        """The caller's key record, True in no-auth mode, or an error message."""
        if self.no_auth:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                if value[:7].lower() != b"bearer ":
                    return "Authorization must be 'Bearer <key>'"
                record = self.table.keys_by_hash.get(hashlib.sha256(value[7:].strip()).hexdigest())
                if record is None:
                    return "invalid API key"
                if record.disabled:
                    return "this API key was revoked"
                if record.expires_at is not None and record.expires_at < time.time():
                    return "this API key has expired"
                return record
        return "missing API key: send 'Authorization: Bearer <key>' (create one with `cortex keys create`)"

    # --- /v1 ----------------------------------------------------------------------------------

    async def list_models(self, scope: Scope, send: Send) -> None:
        key = self.authenticate(scope)
        if isinstance(key, str):
            await send_error(send, 401, key, "invalid_api_key")
            return
        now = int(time.time())
        data = []
        for name in self.table.available_models():
            for model_id in [name, *self.table.aliases_of.get(name, [])]:
                if key is True or key.models is None or name in key.models or model_id in key.models:
                    data.append({"id": model_id, "object": "model", "created": now, "owned_by": "cortex"})
        await send_json(send, 200, {"object": "list", "data": data})

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        key = self.authenticate(scope)
        if isinstance(key, str):
            self.metrics.error("", "", "unauthorized")
            await send_error(send, 401, key, "invalid_api_key")
            return
        try:
            body = await read_body(receive, self.max_body)
        except BodyTooLarge:
            self.metrics.error("", "", "too_large")
            await send_error(send, 413, f"request body larger than {self.max_body} bytes", "request_too_large")
            return
        except ClientGone:
            return
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            self.metrics.error("", "", "bad_request")
            await send_error(send, 400, f"request body is not valid JSON: {exc}", "invalid_json")
            return
        model = payload.get("model") if type(payload) is dict else None
        if type(model) is not str:
            self.metrics.error("", "", "bad_request")
            await send_error(send, 400, "request body must be a JSON object with a string 'model'", "invalid_request")
            return
        replicas = self.table.models.get(model)
        if replicas is None:
            self.metrics.error("", "", "unknown_model")  # not the name: clients must not mint series
            await send_error(send, 404, f"The model '{model[:200]}' does not exist; GET /v1/models lists the served models",
                             "model_not_found")
            return
        served = self.table.canonical[model]
        if key is not True and key.models is not None and served not in key.models and model not in key.models:
            self.metrics.error(served, "", "forbidden_model")
            await send_error(send, 403, f"this API key may not use model '{model}'", "model_not_allowed")
            return

        target = scope["raw_path"] or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        tail = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        streaming = payload.get("stream") is True

        # Pick a replica; retry elsewhere while the replica has sent nothing.
        tried: tuple[Replica, ...] = ()
        attempts = 0
        state = RequestState()
        # Watch for the client leaving only once a request has lasted WATCH_AFTER: an instant
        # answer then costs a timer, not a task, and a long one still frees the engine's slot.
        state.timer = self.loop.call_later(WATCH_AFTER, self._start_watch, receive, state)
        while True:
            replica = self.table.pick(replicas, tried)
            if replica is None:
                state.stop_watching()
                self.metrics.error(served, "", "no_replica")
                await send_error(
                    send, 503, f"no healthy replica of model '{served}' is available; retry shortly",
                    "no_healthy_replica", [(b"retry-after", self.retry_after)],
                )
                return
            attempts += 1
            replica.in_flight += 1
            conn = None
            try:
                conn = state.conn = await replica.pool.acquire()
                t_sent = time.perf_counter()
                assert conn.transport is not None  # the pool hands out connected connections
                conn.transport.write(b"".join((b"POST ", target, b" HTTP/1.1\r\n", replica.request_head, tail, body)))
                await conn.response_headers()
                break
            except UpstreamError as exc:
                if conn is not None:
                    conn.finish()
                self._release(replica)
                if state.client_gone:
                    state.stop_watching()
                    self.metrics.error(served, replica.id, "client_disconnect")
                    return
                self.metrics.error(served, replica.id, exc.kind)
                if not exc.sent_nothing or attempts > len(replicas) + 4:
                    state.stop_watching()
                    await send_error(send, 502, f"replica of '{served}' failed: {exc}", "upstream_error")
                    return
                stale = conn is not None and conn.reused and isinstance(exc, ClosedError)
                if not stale:  # a stale keep-alive socket says nothing about the replica
                    self._mark_failed(replica, exc)
                    tried += (replica,)

        t_headers = time.perf_counter()
        status = conn.status
        headers = []
        sse = False
        for name, value in conn.headers:
            if name not in HOP_BY_HOP:
                headers.append((name, value))
                if name == b"content-type" and value.startswith(b"text/event-stream"):
                    sse = True
        overhead = (t_sent - t0) + (time.perf_counter() - t_headers)
        headers.append((b"x-cortex-replica", replica.id.encode()))
        headers.append((b"x-cortex-overhead-ms", b"%.3f" % (overhead * 1000.0)))
        error_kind = None
        ttfb = None
        last = b""
        prev = b""
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            while True:
                try:
                    data = await conn.read()
                except UpstreamError as exc:
                    if state.client_gone:
                        error_kind = "client_disconnect"
                        break
                    error_kind = exc.kind
                    self._mark_failed(replica, exc)
                    if sse:
                        event = b"data: " + error_body(
                            f"the replica serving '{served}' failed mid-response: {exc}", "server_error", "upstream_error"
                        ) + b"\n\n"
                        await send({"type": "http.response.body", "body": event, "more_body": False})
                        break
                    raise AbortResponse(str(exc)) from exc
                if data is None:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    break
                if ttfb is None:
                    ttfb = time.perf_counter() - t0
                prev, last = last, data
                if conn.complete and not conn.chunks:
                    await send({"type": "http.response.body", "body": data, "more_body": False})
                    break
                await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            state.stop_watching()
            if error_kind is not None and not conn.complete:
                conn.abort("request ended early")
            conn.finish()
            self._release(replica)
            elapsed = time.perf_counter() - t0
            metrics = self.metrics
            labels = (served, replica.id)
            metrics.requests[(served, replica.id, status)] += 1
            metrics.latency.observe(labels, elapsed)
            metrics.overhead.observe(labels, overhead)
            if ttfb is not None:
                metrics.ttfb.observe(labels, ttfb)
            if error_kind is not None:
                metrics.error(served, replica.id, error_kind)
            elif status >= 500:
                metrics.error(served, replica.id, "upstream_status_5xx")
            prompt_tokens = completion_tokens = None
            tail_bytes = prev + last if sse else last
            at = tail_bytes.rfind(b'"usage"')
            if at >= 0:
                found = USAGE_PROMPT.search(tail_bytes, at)
                if found:
                    prompt_tokens = int(found.group(1))
                    metrics.tokens[(served, replica.id, "prompt")] += prompt_tokens
                found = USAGE_COMPLETION.search(tail_bytes, at)
                if found:
                    completion_tokens = int(found.group(1))
                    metrics.tokens[(served, replica.id, "completion")] += completion_tokens
            if self.access_log is not None:
                self.access_log.write({
                    "ts": time.time(),
                    "path": scope["path"],
                    "model": served,
                    "replica": replica.id,
                    "key": None if key is True else key.id,
                    "client": scope["client"][0] if scope.get("client") else None,
                    "status": status,
                    "stream": streaming,
                    "error": error_kind,
                    "attempts": attempts,
                    "duration_ms": round(elapsed * 1000, 3),
                    "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 3),
                    "overhead_ms": round(overhead * 1000, 3),
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                })

    def _start_watch(self, receive: Receive, state: RequestState) -> None:
        if not state.done:
            state.watcher = self.loop.create_task(self._watch_client(receive, state))

    async def _watch_client(self, receive: Receive, state: RequestState) -> None:
        """Cancel the upstream request when the client goes away (the engine frees its slot)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not state.done:
                    state.client_gone = True
                    if state.conn is not None:
                        state.conn.abort("client disconnected")
                return

    # --- /admin -------------------------------------------------------------------------------

    def _admin_authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return value[:7].lower() == b"bearer " and hmac.compare_digest(value[7:].strip(), self.admin_token)
        return False

    async def admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The token is checked before the route is looked up, so no admin path answers without it.
        if not self._admin_authorized(scope):
            await send_error(send, 401, "admin API: send 'Authorization: Bearer <admin token>' "
                             "(CORTEX_ADMIN_TOKEN or the gateway's admin-token file)", "invalid_admin_token")
            return
        method, path = scope["method"], scope["path"]
        for route_method, pattern, handler in ADMIN_ROUTES:
            params = match(pattern, path)
            if params is None:
                continue
            if route_method != method:
                continue
            try:
                raw = await read_body(receive, 1024 * 1024)
                body = orjson.loads(raw) if raw else {}
                if not isinstance(body, dict):
                    raise RegistryError("request body must be a JSON object")
                status, result = handler(self, body, **params)
            except ClientGone:
                return
            except BodyTooLarge:
                await send_error(send, 413, "admin request body larger than 1 MiB", "request_too_large")
                return
            except orjson.JSONDecodeError as exc:
                await send_error(send, 400, f"request body is not valid JSON: {exc}", "invalid_json")
                return
            except RegistryError as exc:
                await send_error(send, exc.status, str(exc), "registry_error")
                return
            await send_json(send, status, result)
            return
        await send_error(send, 404, f"no admin route {method} {path}", "not_found")

    # Admin handlers: (gateway, body, **path params) -> (status, JSON result).

    def _replica_view(self, replica_id: str) -> dict:
        live = self.table.replicas.get(replica_id)
        if live is not None:
            return live.public()
        return {**self.registry.replica(replica_id).public(), "healthy": None, "in_flight": 0}

    def admin_list_replicas(self, body: dict) -> tuple[int, Any]:
        aliases = self.registry.aliases()
        return 200, {
            "replicas": [self._replica_view(r.id) for r in self.registry.replicas()],
            "aliases": aliases,
        }

    def admin_register(self, body: dict) -> tuple[int, Any]:
        aliases = body.get("aliases") or []
        labels = body.get("labels") or {}
        for name in ("model", "url"):
            if not isinstance(body.get(name), str):
                raise RegistryError(f"'{name}' (string) is required")
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise RegistryError("'aliases' must be a list of names")
        if not isinstance(labels, dict):
            raise RegistryError("'labels' must be an object")
        engine_key = body.get("engine_api_key")
        if engine_key is not None and not isinstance(engine_key, str):
            raise RegistryError("'engine_api_key' must be a string")
        replica_id = body.get("id")
        if replica_id is not None and (not isinstance(replica_id, str) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", replica_id)):
            raise RegistryError("'id' must be 1-128 letters, digits or ._:-")
        if engine_key is not None and re.search(r"[\r\n]", engine_key):
            raise RegistryError("'engine_api_key' must not contain line breaks")
        record = self.registry.register(body["model"], body["url"], engine_key, aliases, replica_id, labels)
        self.reload()
        replica = self.table.replicas[record.id]
        replica.healthy, replica.reason = True, ""  # the registrant tested it; the next pass verifies it
        return 201, replica.public()

    def admin_drain(self, body: dict, id: str) -> tuple[int, Any]:
        self.registry.drain(id)
        self.reload()
        view = self._replica_view(id)
        replica = self.table.replicas.get(id)
        if replica is not None and replica.in_flight == 0:
            self._finish_drain(replica)
            view["state"] = "removed"
        return 200, view

    def admin_deregister(self, body: dict, id: str) -> tuple[int, Any]:
        self.registry.deregister(id)
        self.reload()
        return 200, {"id": id, "state": "removed"}

    def admin_list_keys(self, body: dict) -> tuple[int, Any]:
        return 200, {"keys": [k.public() for k in self.registry.keys()]}

    def admin_create_key(self, body: dict) -> tuple[int, Any]:
        name = body.get("name") or ""
        models = body.get("models")
        expires_at = body.get("expires_at")
        if not isinstance(name, str):
            raise RegistryError("'name' must be a string")
        if expires_at is not None and (isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))):
            raise RegistryError("'expires_at' must be a Unix time in seconds")
        key, record = self.registry.create_key(name, models, expires_at)
        self.reload()
        return 201, {**record.public(), "key": key}

    def admin_revoke_key(self, body: dict, id: str) -> tuple[int, Any]:
        self.registry.revoke_key(id)
        self.reload()
        return 200, {**self.registry.key(id).public()}


def match(pattern: str, path: str) -> dict[str, str] | None:
    want = pattern.strip("/").split("/")
    got = path.strip("/").split("/")
    if len(want) != len(got):
        return None
    params = {}
    for w, g in zip(want, got):
        if w.startswith("{"):
            if not g:
                return None
            params[w[1:-1]] = g
        elif w != g:
            return None
    return params


# Every admin route. The test suite enumerates this list, so a new route cannot skip auth.
ADMIN_ROUTES: list[tuple[str, str, Callable[..., tuple[int, Any]]]] = [
    ("GET", "/admin/replicas", Gateway.admin_list_replicas),
    ("POST", "/admin/replicas", Gateway.admin_register),
    ("POST", "/admin/replicas/{id}/drain", Gateway.admin_drain),
    ("DELETE", "/admin/replicas/{id}", Gateway.admin_deregister),
    ("GET", "/admin/keys", Gateway.admin_list_keys),
    ("POST", "/admin/keys", Gateway.admin_create_key),
    ("DELETE", "/admin/keys/{id}", Gateway.admin_revoke_key),
]

