"""The gateway: the application the server of http.py runs (no framework on the hot path).

Routes: POST /v1/chat/completions, /v1/completions, /v1/embeddings (proxied by `model`),
GET /v1/models, GET /health, GET /metrics, GET /openapi.json, and the admin API under /admin
(see admin.ADMIN_ROUTES). Run it with `cortex gateway` (the server of http.py: httptools on uvloop),
which calls `startup()` before the first request and `shutdown()` after the last.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import Any

import httpx
import orjson

from ..settings import Settings
from . import admin, openapi
from .accesslog import AccessLog
from .errors import BodyTooLarge, ClientGone, error_body
from .http import Request
from .connections import ConnectionGuard
from .identity import verify_replica
from .inflight import InFlightBoard
from .limits import KeyState, Limiter, ask_for_usage, strip_usage_event
from .looplag import LoopLag
from .metrics import Metrics, merge_snapshots, render
from .registry import Registry, RegistryError, RegistryUnavailable, open_registry
from .routing import UNCHECKED, Replica, RoutingTable
from .upstream import ClosedError, ConnectTimeout, UpstreamConnection, UpstreamError
from .usage import UsageBook
from .workermetrics import without_gauges

log = logging.getLogger("cortex.gateway")

PROXY_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
# Upstream response headers that describe the upstream connection, not the response.
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"transfer-encoding", b"proxy-connection", b"upgrade", b"te", b"trailer", b"server")
)


def usage_int(data: bytes, name: bytes, start: int) -> int | None:
    """The integer after the first `name` (a quoted key such as b'"prompt_tokens"') from `start`
    and a colon, JSON whitespace allowed around it; None when there is none. A scan, not a regex:
    it runs for every response (the token counts of metrics, usage and limits)."""
    at = data.find(name, start)
    if at < 0:
        return None
    at += len(name)
    end = data.find(b",", at)
    brace = data.find(b"}", at)
    if end < 0 or 0 <= brace < end:
        end = brace
    if end < 0:
        return None
    value = data[at:end].strip()
    if value[:1] != b":":
        return None
    value = value[1:].strip()
    return int(value) if value.isdigit() else None


# A timeout is not held against a replica when the event loop lagged by more than this share of
# the time the gateway waited (see looplag.py).
LAG_EXCUSES = 0.1
# Seconds between reminders while the registry stays unreachable (RegistryOutage).
OUTAGE_REMINDER_S = 60.0


class RegistryOutage:
    """The log of the maintenance loop's registry calls while they fail: one line when the
    registry goes away (with the error; its traceback too when the error is not the database
    being unreachable, since that may be a bug), a reminder at most every OUTAGE_REMINDER_S,
    one line when it is back. The loop tries every 0.5 s: a line per try would bury the log."""

    def __init__(self, location: str, doing: str, clock=time.monotonic) -> None:
        self.location = location
        self.doing = doing  # "reading", "writing usage to"
        self.clock = clock
        self.since: float | None = None  # when the current outage began
        self.reminded = 0.0
        self.failures = 0

    def failed(self, exc: Exception) -> None:
        now = self.clock()
        self.failures += 1
        if self.since is None:
            self.since = self.reminded = now
            log.error(
                "%s the registry %s failed: %s; routing goes on with the current table and usage is kept "
                "in memory until it is back (retrying, a reminder every %.0f s)",
                self.doing,
                self.location,
                exc,
                OUTAGE_REMINDER_S,
                exc_info=not isinstance(exc, RegistryUnavailable),
            )
        elif now - self.reminded >= OUTAGE_REMINDER_S:
            self.reminded = now
            log.error(
                "%s the registry %s still fails after %.0f s (%d failed tries): %s",
                self.doing,
                self.location,
                now - self.since,
                self.failures,
                exc,
            )

    def recovered(self) -> None:
        if self.since is not None:
            log.info(
                "registry %s back (%s it works again) after %.0f s",
                self.location,
                self.doing,
                self.clock() - self.since,
            )
            self.since, self.failures = None, 0


TOKEN_CACHE = 100_000  # tokens remembered per registry version (RoutingTable.keys_by_token)


def _ms(seconds: float) -> float:
    """Milliseconds to 3 places (what round(x * 1000, 3) gives, at a fraction of its cost)."""
    return int(seconds * 1e6 + 0.5) / 1e3


def _ms_bytes(seconds: float) -> bytes:
    """Milliseconds to 3 places, as b"0.123" (integer formatting: `%.3f` goes through printf)."""
    us = int(seconds * 1e6 + 0.5)
    return b"%d.%03d" % (us // 1000, us % 1000)


class AbortResponse(Exception):
    """The replica failed after the response started and the format has no error event: the
    server closes the client's connection so a truncated body is never taken as complete."""


class ProxyCall:
    """One proxied request as it moves through the steps of `Gateway.proxy`; `client_left`
    (the server's callback when the client goes) reads and sets its flags (`done`,
    `client_gone`, `conn`)."""

    __slots__ = (
        "t0",
        "key",
        "served",
        "replicas",
        "streaming",
        "done",
        "client_gone",
        "conn",
        "replica",
        "attempts",
        "t_sent",
        "status",
        "sse",
        "overhead",
        "ttfb",
        "prev",
        "last",
        "error_kind",
        "limit",
        "limit_headers",
        "strip_usage",
        "payload",
        "fallback_from",
    )

    replica: Replica  # set by _connect

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.key: Any = True  # the caller's ApiKeyRecord, or True in no-auth mode
        self.served = ""
        self.replicas: list[Replica] = []
        self.streaming = False
        self.done = False
        self.client_gone = False
        self.conn: UpstreamConnection | None = None
        self.attempts = 0
        self.t_sent = t0
        self.status = 0
        self.sse = False
        self.overhead = 0.0
        self.ttfb: float | None = None
        self.prev = self.last = b""  # the last two body chunks, where `usage` is
        self.error_kind: str | None = None
        self.limit: KeyState | None = None  # the key's rate-limit state, when it has limits
        self.limit_headers: list[tuple[bytes, bytes]] = []
        self.strip_usage = False  # the gateway asked for the stream's usage event; the client did not
        self.payload: Any = None  # the parsed body (affinity key, fallback model rewrite)
        # (primary model, why it could not serve) once the request went to a fallback
        self.fallback_from: tuple[str, str] | None = None

    def client_left(self) -> None:
        """The client went away: cancel the upstream request (the engine frees its slot)."""
        if not self.done:
            self.client_gone = True
            if self.conn is not None:
                self.conn.abort("client disconnected")


class Gateway:
    """The application: called with each request (http.Request). `settings` decides auth mode,
    limits and the registry file."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry | None = None,
        access_log: AccessLog | None = None,
        connections: ConnectionGuard | None = None,
        board: InFlightBoard | None = None,
    ) -> None:
        self.settings = settings
        # with several workers (server.py): the shared in-flight counts, and which worker this is
        self.worker = board.worker if board is not None else 0
        # the source as it is, or its mypyc build (compiled.py), for /health
        self.code = "interpreted" if __file__.endswith(".py") else "compiled"
        self.connections = connections  # the server's client-connection limits, for /metrics
        self.registry = registry or open_registry(settings.gateway_db)
        self.admin_token = settings.resolve_admin_token(create=True).encode()
        self.no_auth = settings.gateway_no_auth
        self.max_body = settings.gateway_max_body_bytes
        self.access_log = access_log if settings.gateway_access_log else None
        self.retry_after = str(max(1, math.ceil(settings.gateway_health_interval))).encode()
        self.table = RoutingTable(
            settings.gateway_connect_timeout, settings.gateway_affinity, settings.gateway_affinity_load_ratio, board
        )
        self.metrics = Metrics()
        # With several workers, the whole gateway's /metrics (workermetrics.py): what this worker
        # publishes, on top of what a worker before it on this index published before it died.
        self.exchange = board.metrics if board is not None else None
        inherited = self.exchange.read(self.worker) if self.exchange is not None else None
        self._inherited = without_gauges(inherited) if inherited is not None else None
        self.lag = LoopLag()
        self.limiter = Limiter()
        self.usage = UsageBook(
            settings.gateway_metrics_max_keys, self.exchange.labels if self.exchange is not None else None
        )
        self._flushed_at = time.monotonic()
        self._data_version = -1
        # one log line when the registry stops answering the maintenance loop, one when it is back
        self.read_outage = RegistryOutage(self.registry.location, "reading")
        self.write_outage = RegistryOutage(self.registry.location, "writing usage to")
        self._tasks: list[asyncio.Task] = []
        self._health_client: httpx.AsyncClient | None = None
        self._checks: set[asyncio.Task] = set()  # checks of new replicas, held until done
        self.loop: asyncio.AbstractEventLoop  # the serving loop, set by startup()
        self.reload()

    # --- state ------------------------------------------------------------------------------

    def reload(self) -> None:
        """Rebuild the routing table from the registry."""
        self._data_version = self.registry.data_version()
        before = set(self.table.replicas.values())
        keys = self.registry.keys()
        gone = self.table.sync(self.registry.replicas(), self.registry.aliases(), keys, self.registry.fallbacks())
        self.limiter.sync(keys, self.registry)
        for replica in gone:
            if replica.count.mine == 0:  # else closed when this process's last request on it ends
                replica.close()
        self._check_new([r for r in self.table.replicas.values() if r not in before])

    def _maybe_reload(self) -> None:
        if self.registry.data_version() != self._data_version:
            self.reload()

    def _release(self, replica: Replica) -> None:
        count = replica.count
        count.add(-1)
        if count.mine == 0:
            if replica.removed:
                replica.close()
            elif replica.state == "draining" and count.total() == 0:  # no worker has one in flight
                self.finish_drain(replica)

    def replica_view(self, replica_id: str) -> dict:
        """A replica as the admin API shows it: live state if this process routes to it."""
        live = self.table.replicas.get(replica_id)
        if live is not None:
            return live.public()
        return {**self.registry.replica(replica_id).public(), "healthy": None, "in_flight": 0}

    def finish_drain(self, replica: Replica) -> None:
        log.info("replica %s drained; removing it", replica.id)
        try:
            self.registry.deregister(replica.id)
        except RegistryError:
            pass  # already removed by another process or an admin call
        self.reload()

    def publish_metrics(self) -> dict:
        """This worker's counters (plus what it inherited), written for the other workers to read;
        returned for a scrape this worker answers."""
        assert self.exchange is not None
        snap = self.metrics.snapshot(self.connections, self.usage)
        if self._inherited is not None:
            snap = merge_snapshots([self._inherited, snap])
        self.exchange.publish(snap)
        return snap

    def metrics_text(self) -> bytes:
        """GET /metrics: this process's numbers, or with several workers the whole gateway's."""
        if self.exchange is None:
            return self.metrics.render(self.table.replicas.values(), self.connections, self.usage)
        snap = merge_snapshots([self.publish_metrics(), *self.exchange.others()])
        return render(snap, self.table.replicas.values())

    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()  # kept: the hot path asks for it per request
        if self.exchange is not None:
            self.publish_metrics()  # a replacement worker's inherited counters show at once
        self.lag.start()
        self._health_client = httpx.AsyncClient(timeout=self.settings.gateway_health_timeout)
        self._tasks.append(asyncio.create_task(self._maintain()))
        self._tasks.append(asyncio.create_task(self._health_loop()))

    async def shutdown(self) -> None:
        self.lag.stop()
        for task in (*self._tasks, *self._checks):
            task.cancel()
        stopped = (*self._tasks, *self._checks)
        # cancelled as asked, or ended before with an error of its own, which is logged here
        for task, outcome in zip(stopped, await asyncio.gather(*stopped, return_exceptions=True)):
            if isinstance(outcome, Exception):
                log.error("gateway task %s had failed: %r", task.get_name(), outcome, exc_info=outcome)
        self._tasks.clear()
        if self._health_client is not None:
            await self._health_client.aclose()
        for replica in self.table.replicas.values():
            replica.close()
        try:
            self.flush_usage()
        except Exception:
            log.exception("writing usage to the registry %s at shutdown failed", self.registry.location)
        if self.access_log is not None:
            self.access_log.flush()
        if self.exchange is not None:
            self.publish_metrics()  # the last numbers, for a worker started in this one's place

    def flush_usage(self) -> bool:
        """Write the usage counted since the last flush and the limited keys' state to the
        registry in one transaction, and take in what other gateways on it used (limits.py).
        False when there was nothing to write."""
        self._flushed_at = time.monotonic()
        now = self.limiter.clock()
        snapshot = self.limiter.snapshot()
        rows = self.usage.take()
        if not rows and not snapshot:
            return False
        try:
            totals, today = self.registry.flush_usage(int(now // 3600), rows, snapshot, now - now % 86400)
        except BaseException:
            self.usage.put_back(rows)  # the limiter's pending counts stay until an exchange
            raise
        self.limiter.exchange(totals, today)
        return True

    async def _maintain(self) -> None:
        """Pick up other processes' registry writes; fail requests whose replica went silent."""
        while True:
            await asyncio.sleep(0.5)
            try:
                self._maybe_reload()
            except Exception as exc:  # logged once per outage, not every 0.5 s
                self.read_outage.failed(exc)
            else:
                self.read_outage.recovered()
            now = time.monotonic()
            for replica in list(self.table.replicas.values()):
                replica.pool.abort_stalled(now, self.settings.gateway_read_timeout)
                # Drained by another process, or before a restart: remove once idle here.
                if replica.state == "draining" and replica.in_flight == 0 and not replica.removed:
                    self.finish_drain(replica)
            if self.access_log is not None:
                self.access_log.flush()
            if self.exchange is not None:
                self.publish_metrics()
            if now - self._flushed_at >= self.settings.gateway_usage_flush_interval:
                try:
                    wrote = self.flush_usage()
                except Exception as exc:  # kept in memory and written at the next flush
                    self.write_outage.failed(exc)
                else:
                    if wrote:
                        self.write_outage.recovered()

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
        started = self.loop.time()
        began = time.perf_counter()
        verdict = await verify_replica(self._health_client, replica.url, replica.model, replica.engine_api_key)
        if verdict.timed_out and self._gateway_was_busy(replica, started, verdict.reason):
            return replica.healthy
        if verdict.timed_out and replica.healthy and replica.answered >= began:
            # An engine too busy to answer /health in time (llama-server's HTTP threads starved by
            # its own load) while it answers proxied requests is alive: taking it out would turn
            # load into an outage, as when the last replica of a model takes a lost host's share.
            log.warning(
                "not counting a health timeout of replica %s (%s): it answered requests meanwhile (%s)",
                replica.id,
                replica.model,
                verdict.reason,
            )
            self.metrics.error(
                self.table.canonical.get(replica.model, replica.model), replica.id, "timeout_while_answering"
            )
            return True
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

    async def engine_metrics(self, url: str, engine_api_key: str | None) -> tuple[int, bytes, bytes]:
        """(status, content type, body) of the engine's GET /metrics, asked with its key;
        admin.AdminError 502 when it does not answer."""
        assert self._health_client is not None  # made in startup(), before any request is served
        headers = {"Authorization": f"Bearer {engine_api_key}"} if engine_api_key else {}
        try:
            response = await self._health_client.get(
                url.rstrip("/") + "/metrics", headers=headers, timeout=self.settings.gateway_metrics_timeout
            )
        except httpx.HTTPError as exc:
            raise admin.AdminError(
                502, f"the engine at {url} did not answer /metrics: {type(exc).__name__}: {exc}", "engine_unreachable"
            ) from None
        content_type = response.headers.get("content-type", "text/plain; version=0.0.4").encode("latin-1")
        return response.status_code, content_type, response.content

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

    def _gateway_was_busy(self, replica: Replica, since: float, failure: str) -> bool:
        """True when this gateway's own event loop was held up long enough since loop time
        `since` to explain a timeout: the replica's answer may be sitting unread in the socket,
        so the failure says nothing about the replica and is not counted."""
        lag = self.lag.worst_since(since)
        if lag <= LAG_EXCUSES * (self.loop.time() - since):
            return False
        log.warning(
            "not counting a timeout of replica %s (%s): this gateway's event loop was %.2f s behind "
            "while it waited (%s)",
            replica.id,
            replica.model,
            lag,
            failure,
        )
        self.metrics.error(self.table.canonical.get(replica.model, replica.model), replica.id, "timeout_while_busy")
        return True

    def _mark_failed(self, replica: Replica, error: UpstreamError) -> None:
        if isinstance(error, ConnectTimeout) and self._gateway_was_busy(
            replica, self.loop.time() - self.settings.gateway_connect_timeout, str(error)
        ):
            return
        if replica.healthy:
            log.warning("replica %s (%s) taken out after a failed request: %s", replica.id, replica.model, error)
            replica.healthy = False

    # --- requests -----------------------------------------------------------------------------

    async def __call__(self, request: Request) -> None:
        path, method = request.path, request.method
        if path in PROXY_PATHS:
            if method != "POST":
                request.send_error(405, f"{path} accepts POST", "method_not_allowed")
                return
            await self.proxy(request)
        elif path.startswith("/admin"):
            # in a Task of its own: the admin API uses httpx, which needs a current task (http.Run)
            await asyncio.ensure_future(admin.handle(self, request))
        elif path == "/v1/models" and method == "GET":
            self.list_models(request)
        elif path == "/health" and method == "GET":
            request.send_json(
                200,
                {
                    "status": "ok",
                    "models": len(self.table.available_models()),
                    "worker": self.worker,
                    "code": self.code,
                },
            )
        elif path == "/metrics" and method == "GET":
            request.send_raw(200, self.metrics_text(), b"text/plain; version=0.0.4")
        elif path == "/openapi.json" and method == "GET":
            request.send_json(200, openapi.schema())
        else:
            request.send_error(404, f"no route {method} {path}", "not_found")

    # --- client auth --------------------------------------------------------------------------

    def authenticate(self, request: Request):
        """The caller's key record, True in no-auth mode, or an error message."""
        if self.no_auth:
            return True
        value = request.header(b"authorization")
        if value is None:
            return "missing API key: send 'Authorization: Bearer <key>' (create one with `cortex keys create`)"
        if value[:7].lower() != b"bearer ":
            return "Authorization must be 'Bearer <key>'"
        token = value[7:].strip()
        table = self.table
        record = table.keys_by_token.get(token)
        if record is None:
            record = table.keys_by_hash.get(hashlib.sha256(token).hexdigest())
            if record is None:
                return "invalid API key"
            if len(table.keys_by_token) < TOKEN_CACHE:  # only tokens of real keys: at most one per key
                table.keys_by_token[token] = record
        if record.disabled:
            return "this API key was revoked"
        if record.expires_at is not None and record.expires_at < time.time():
            return "this API key has expired"
        return record

    # --- /v1 ----------------------------------------------------------------------------------

    def list_models(self, request: Request) -> None:
        key = self.authenticate(request)
        if isinstance(key, str):
            request.send_error(401, key, "invalid_api_key")
            return
        now = int(time.time())
        data = []
        for name in self.table.available_models():
            for model_id in [name, *self.table.aliases_of.get(name, [])]:
                if key is True or key.models is None or name in key.models or model_id in key.models:
                    data.append({"id": model_id, "object": "model", "created": now, "owned_by": "cortex"})
        request.send_json(200, {"object": "list", "data": data})

    async def proxy(self, request: Request) -> None:
        """Admit the request, connect it to a replica, relay the answer, account for it. Each
        step answers the client itself when it ends the request early."""
        call = ProxyCall(time.perf_counter())
        body = await self._admit(call, request)
        if body is None or not await self._connect(call, request, body):
            return
        try:
            await self._relay(call, request)
        finally:
            self._account(call, request)

    async def _admit(self, call: ProxyCall, request: Request) -> bytes | None:
        """Authenticate the key, read and parse the body, resolve the model and check the key
        may use it. The body (unchanged, for the replica), or None once answered."""
        key = self.authenticate(request)
        if isinstance(key, str):
            self.metrics.error("", "", "unauthorized")
            request.send_error(401, key, "invalid_api_key")
            return None
        try:
            body = await request.read_body(self.max_body)
        except BodyTooLarge:
            self.metrics.error("", "", "too_large")
            request.send_error(413, f"request body larger than {self.max_body} bytes", "request_too_large")
            return None
        except ClientGone:
            return None
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            self.metrics.error("", "", "bad_request")
            request.send_error(400, f"request body is not valid JSON: {exc}", "invalid_json")
            return None
        model = payload.get("model") if type(payload) is dict else None
        if type(model) is not str:
            self.metrics.error("", "", "bad_request")
            request.send_error(
                400, "request body must be a JSON object with a string 'model'", "invalid_request", param="model"
            )
            return None
        replicas = self.table.models.get(model)
        if replicas is None:
            self.metrics.error("", "", "unknown_model")  # not the name: clients must not mint series
            request.send_error(
                404,
                f"The model '{model[:200]}' does not exist; GET /v1/models lists the served models",
                "model_not_found",
                param="model",
            )
            return None
        served = self.table.canonical[model]
        if key is not True and key.models is not None and served not in key.models and model not in key.models:
            self.metrics.error(served, "", "forbidden_model")
            request.send_error(403, f"this API key may not use model '{model}'", "model_not_allowed", param="model")
            return None
        call.key, call.served, call.replicas = key, served, replicas
        call.streaming = payload.get("stream") is True
        if key is not True:
            state = self.limiter.states.get(key.id)
            if state is not None:
                refusal, headers = self.limiter.admit(state)
                if refusal is not None:
                    self.metrics.error(served, "", "rate_limited")
                    self.usage.refused(key.id, served)
                    request.send_error(
                        429, refusal.message, refusal.code, headers + self.limiter.refusal_headers(refusal)
                    )
                    return None
                call.limit, call.limit_headers = state, headers
                if call.streaming and state.strip_usage:
                    asked = ask_for_usage(payload, body)
                    if asked is not None:
                        body, call.strip_usage = asked, True
        call.payload = payload
        return body

    async def _connect(self, call: ProxyCall, request: Request, body: bytes) -> bool:
        """Send the request to a replica (routing.RoutingTable.pick) and wait for its response
        head; retry on another while the replica has sent nothing, and once the model has no
        replica left to try, go down its fallback list. False once the client has been answered."""
        target = request.raw_path
        if request.query:
            target += b"?" + request.query
        tail = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        replicas, served = call.replicas, call.served
        tried: tuple[Replica, ...] = ()
        attempts = 0  # on the current model
        chain: tuple[str, ...] | None = None  # fallbacks, looked up once the model has no replica left
        done: set[str] = set()
        failure: UpstreamError | None = None
        # The client leaving aborts the upstream request (the engine frees its slot): a callback
        # from the server, no task or timer per request.
        request.on_gone(call.client_left)
        while True:
            replica = self.table.pick(replicas, tried, call.payload)
            if replica is None or attempts > len(replicas) + 4:  # the model has nothing left to try
                if chain is None:
                    chain, done = self.table.fallback_chain(call.payload["model"]), {served}
                    # kept for the fallback metric, counted once a fallback serves
                    failed = replica is not None or bool(tried)
                    call.fallback_from = (served, "failed_before_first_byte" if failed else "no_healthy_replica")
                fallback = self._next_fallback(call, chain, done)
                if fallback is not None:
                    served, replicas = fallback
                    call.served, call.replicas, tried, attempts = served, replicas, (), 0
                    # the engine behind the fallback serves its own name, not the one asked for
                    body = orjson.dumps({**call.payload, "model": served})
                    tail = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                    continue
                call.done = True
                if replica is not None:  # attempts used up (stale keep-alive sockets without end)
                    request.send_error(502, f"replica of '{served}' failed: {failure}", "upstream_error")
                    return False
                self.metrics.error(served, "", "no_replica")
                also = f" (nor on its fallbacks {', '.join(chain)})" if chain else ""
                request.send_error(
                    503,
                    f"no healthy replica of model '{call.payload['model'] if chain else served}' is available"
                    f"{also}; retry shortly",
                    "no_healthy_replica",
                    [(b"retry-after", self.retry_after)],
                )
                return False
            call.attempts += 1
            attempts += 1
            replica.count.add(1)
            conn = None
            try:
                # an idle kept-alive connection without a coroutine; a new one is awaited
                conn = call.conn = replica.pool.take() or await replica.pool.connect()
                call.t_sent = time.perf_counter()
                assert conn.transport is not None  # the pool hands out connected connections
                conn.transport.write(b"".join((b"POST ", target, b" HTTP/1.1\r\n", replica.request_head, tail, body)))
                await conn.response_headers()
                call.replica = replica
                return True
            except UpstreamError as exc:
                if conn is not None:
                    conn.finish()
                self._release(replica)
                if call.client_gone:
                    call.done = True
                    self.metrics.error(served, replica.id, "client_disconnect")
                    return False
                self.metrics.error(served, replica.id, exc.kind)
                if not exc.sent_nothing:  # the response began: nothing may be retried
                    call.done = True
                    request.send_error(502, f"replica of '{served}' failed: {exc}", "upstream_error")
                    return False
                failure = exc
                stale = conn is not None and conn.reused and isinstance(exc, ClosedError)
                if not stale:  # a stale keep-alive socket says nothing about the replica
                    self._mark_failed(replica, exc)
                    tried += (replica,)

    def _next_fallback(
        self, call: ProxyCall, chain: tuple[str, ...], done: set[str]
    ) -> tuple[str, list[Replica]] | None:
        """The first fallback in `chain` that is registered, not tried yet (`done`, which it
        extends) and allowed to the caller's key, as (served name, replicas). Fallbacks are
        not followed transitively: only the requested name's own list counts."""
        key = call.key
        for name in chain:
            replicas = self.table.models.get(name)
            if replicas is None:
                continue  # not registered (any more)
            served = self.table.canonical[name]
            if served in done:
                continue
            done.add(served)
            if key is not True and key.models is not None and served not in key.models and name not in key.models:
                continue  # a fallback does not widen what the key may use
            return served, replicas
        return None

    async def _relay(self, call: ProxyCall, request: Request) -> None:
        """Pass the replica's status, end-to-end headers and body to the client as they come."""
        t_headers = time.perf_counter()
        conn = call.conn
        assert conn is not None  # _connect succeeded
        replica = call.replica
        replica.answered = t_headers
        call.status = conn.status
        headers = []
        sse = False
        for header in conn.headers:
            name = header[0]
            if name not in HOP_BY_HOP:
                headers.append(header)
                if name == b"content-type" and header[1].startswith(b"text/event-stream"):
                    sse = True
        call.sse = sse
        call.overhead = overhead = (call.t_sent - call.t0) + (time.perf_counter() - t_headers)
        headers += (
            replica.id_header,
            (b"x-cortex-model", call.served.encode()),
            (b"x-cortex-overhead-ms", _ms_bytes(overhead)),
        )
        if call.limit_headers:
            headers += call.limit_headers
        request.start(call.status, headers)
        ttfb = None
        prev = last = b""
        strip = call.strip_usage and sse
        try:  # locals in the loop (one per chunk), stored on the call once at the end
            while True:
                try:
                    data = conn.read_ready() if conn.ready() else await conn.read()
                except UpstreamError as exc:
                    if call.client_gone:
                        call.error_kind = "client_disconnect"
                        return
                    call.error_kind = exc.kind
                    self._mark_failed(replica, exc)
                    if sse:
                        event = (
                            b"data: "
                            + error_body(
                                f"the replica serving '{call.served}' failed mid-response: {exc}",
                                "server_error",
                                "upstream_error",
                            )
                            + b"\n\n"
                        )
                        request.end(event)
                        return
                    raise AbortResponse(str(exc)) from exc
                if data is None:
                    request.end()
                    return
                if ttfb is None:
                    ttfb = time.perf_counter() - call.t0
                prev, last = last, data
                if strip and b'"usage"' in data:
                    data = strip_usage_event(data)
                    if not data and not (conn.complete and not conn.chunks):
                        continue  # the read held only the usage event: nothing to send
                if conn.complete and not conn.chunks:
                    request.end(data)
                    return
                if request.write(data):  # the client is behind
                    await request.drain()
        finally:
            call.ttfb, call.prev, call.last = ttfb, prev, last

    def _account(self, call: ProxyCall, request: Request) -> None:
        """Free the connection and the replica's slot; record metrics and the access-log line."""
        call.done = True
        conn, replica, served, status, error_kind = call.conn, call.replica, call.served, call.status, call.error_kind
        assert conn is not None
        if error_kind is not None and not conn.complete:
            conn.abort("request ended early")
        conn.finish()
        self._release(replica)
        elapsed = time.perf_counter() - call.t0
        metrics = self.metrics
        labels = (served, replica.id)
        metrics.requests[(served, replica.id, status)] += 1
        metrics.latency.observe(labels, elapsed)
        metrics.overhead.observe(labels, call.overhead)
        ttfb = call.ttfb
        if ttfb is not None:
            metrics.ttfb.observe(labels, ttfb)
        if error_kind is not None:
            metrics.error(served, replica.id, error_kind)
        elif status >= 500:
            metrics.error(served, replica.id, "upstream_status_5xx")
        if call.fallback_from is not None:
            primary, reason = call.fallback_from
            metrics.fallbacks[(primary, served, reason)] += 1
        prompt_tokens = completion_tokens = None
        tail_bytes = call.prev + call.last if call.sse else call.last
        at = tail_bytes.rfind(b'"usage"')
        if at >= 0:
            prompt_tokens = usage_int(tail_bytes, b'"prompt_tokens"', at)
            if prompt_tokens is not None:
                metrics.tokens[(served, replica.id, "prompt")] += prompt_tokens
            completion_tokens = usage_int(tail_bytes, b'"completion_tokens"', at)
            if completion_tokens is not None:
                metrics.tokens[(served, replica.id, "completion")] += completion_tokens
        key = call.key
        if key is not True:
            self.usage.record(key.id, served, prompt_tokens, completion_tokens, error_kind is not None or status >= 400)
            if call.limit is not None:
                self.limiter.charge(call.limit, (prompt_tokens or 0) + (completion_tokens or 0))
        if self.access_log is not None:
            client = request.client
            self.access_log.write(
                {
                    "ts": time.time(),
                    "path": request.path,
                    "model": served,
                    "replica": replica.id,
                    "key": None if key is True else key.id,
                    "client": None if client is None else client[0],
                    "status": status,
                    "stream": call.streaming,
                    "error": error_kind,
                    "attempts": call.attempts,
                    "duration_ms": _ms(elapsed),
                    "ttfb_ms": None if ttfb is None else _ms(ttfb),
                    "overhead_ms": _ms(call.overhead),
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                }
            )
