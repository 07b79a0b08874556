"""The admin API under /admin: one table (`ADMIN_ROUTES`) declares each route's method, path
pattern, handler and body model. The router below and the OpenAPI document (openapi.py) both
read it, so a route cannot be served without being documented, or documented without its
body being checked.

Bodies are pydantic models that refuse unknown fields: a misspelt `engine_api_key` is a 400
naming the field, not a replica registered without its key.
"""

from __future__ import annotations

import hmac
import inspect
from dataclasses import dataclass
from urllib.parse import parse_qsl
from typing import TYPE_CHECKING, Annotated, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BodyTooLarge, ClientGone
from .limits import KeyLimits
from .registry import RegistryError
from .usage import summarize

if TYPE_CHECKING:
    from .app import Gateway
    from .http import Request

ADMIN_MAX_BODY = 1024 * 1024
Name = Annotated[str, Field(min_length=1)]
Limit = Annotated[int, Field(ge=1)] | None


class Body(BaseModel):
    """An admin request body: JSON types as written (no "5" for 5), no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Registration(Body):
    """POST /admin/replicas."""

    model: Name = Field(description="The served model name clients put in `model`.")
    url: str = Field(description="The engine's base URL, http://host:port.")
    engine_api_key: Annotated[str, Field(pattern=r"^[^\r\n]*$")] | None = Field(
        None, description="The key the engine requires; sent by the gateway, never shown."
    )
    aliases: list[Name] | None = Field(None, description="Other names routed to this model.")
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")] | None = Field(
        None, description="Replica id (1-128 letters, digits or ._:-); default: <model>-<random>."
    )
    labels: dict[str, Any] | None = Field(None, description="Free-form labels shown in listings.")
    fallbacks: list[Name] | None = Field(
        None,
        description="Models tried in order when this one has no healthy replica or its replica fails "
        "before answering; replaces the model's list (null: keep it).",
    )


class Fallbacks(Body):
    """PUT /admin/fallbacks (the name in the body: an alias may contain '/')."""

    name: Name = Field(description="The model or alias the list belongs to.")
    fallbacks: list[Name] = Field(description="Models tried in order; [] removes the list.")


class NewKey(Body):
    """POST /admin/keys."""

    name: str = Field("", description="A name for people; not a secret.")
    models: list[Name] | None = Field(None, description="Models the key may use; null for all.")
    expires_at: Annotated[float, Field(allow_inf_nan=False)] | None = Field(
        None, description="Unix time in seconds after which the key is refused."
    )
    rpm: Limit = Field(None, description="Requests per minute (token bucket); null: no limit.")
    tpm: Limit = Field(None, description="Tokens (prompt + completion) per minute; null: no limit.")
    budget_tokens_per_day: Limit = Field(None, description="Tokens per UTC day; null: no budget.")


class LimitsUpdate(Body):
    """PATCH /admin/keys/{id}: the fields given replace the key's limits; null removes one."""

    rpm: Limit = Field(None, description="Requests per minute; null removes the limit.")
    tpm: Limit = Field(None, description="Tokens per minute; null removes the limit.")
    budget_tokens_per_day: Limit = Field(None, description="Tokens per UTC day; null removes the budget.")


class UsageQuery(BaseModel):
    """GET /admin/usage query parameters (strings in the URL, so not strict)."""

    model_config = ConfigDict(extra="forbid")

    since: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1e11)] | None = Field(
        None, description="Unix time; usage from the hour holding it on (default: all recorded)."
    )


# --- handlers: (gateway, body or None, **path params) -> JSON result -------------------------------


def list_replicas(gw: Gateway, body: None) -> Any:
    return {
        "replicas": [gw.replica_view(r.id) for r in gw.registry.replicas()],
        "aliases": gw.registry.aliases(),
        "fallbacks": gw.registry.fallbacks(),
    }


def register(gw: Gateway, body: Registration) -> Any:
    record = gw.registry.register(
        body.model, body.url, body.engine_api_key, body.aliases or [], body.id, body.labels or {}, body.fallbacks
    )
    gw.reload()
    replica = gw.table.replicas[record.id]
    # the deploy flow registers only replicas that passed their smoke test; the next health pass
    # verifies its identity (cortex.gateway.identity)
    replica.healthy, replica.reason = True, ""
    return replica.public()


def drain(gw: Gateway, body: None, id: str) -> Any:
    gw.registry.drain(id)
    gw.reload()
    view = gw.replica_view(id)
    replica = gw.table.replicas.get(id)
    if replica is not None and replica.in_flight == 0:
        gw.finish_drain(replica)
        view["state"] = "removed"
    return view


def deregister(gw: Gateway, body: None, id: str) -> Any:
    gw.registry.deregister(id)
    gw.reload()
    return {"id": id, "state": "removed"}


def list_fallbacks(gw: Gateway, body: None) -> Any:
    return {"fallbacks": gw.registry.fallbacks()}


def set_fallbacks(gw: Gateway, body: Fallbacks) -> Any:
    chain = gw.registry.set_fallbacks(body.name, body.fallbacks)
    gw.reload()
    return {"name": body.name, "fallbacks": chain}


def list_keys(gw: Gateway, body: None) -> Any:
    return {"keys": [k.public() for k in gw.registry.keys()]}


def create_key(gw: Gateway, body: NewKey) -> Any:
    limits = KeyLimits(body.rpm, body.tpm, body.budget_tokens_per_day)
    key, record = gw.registry.create_key(body.name, body.models, body.expires_at, limits)
    gw.reload()
    return {**record.public(), "key": key}


def update_key(gw: Gateway, body: LimitsUpdate, id: str) -> Any:
    current = gw.registry.key(id).limits.public()
    changed = {name: getattr(body, name) for name in body.model_fields_set}
    record = gw.registry.set_key_limits(id, KeyLimits(**{**current, **changed}))
    gw.reload()
    return record.public()


def usage(gw: Gateway, body: None, query: UsageQuery) -> Any:
    gw.flush_usage()  # this gateway's counts so far; other gateways' as of their last flush
    names = {k.id: k.name for k in gw.registry.keys()}
    return {
        "since": query.since,
        "flush_interval_s": gw.settings.gateway_usage_flush_interval,
        "usage": summarize(gw.registry.usage(query.since), names),
    }


@dataclass(frozen=True)
class PassThrough:
    """A handler's answer sent as it is (not JSON): an engine's Prometheus text."""

    body: bytes
    content_type: bytes


class AdminError(Exception):
    """An admin call that failed outside the registry (an engine that did not answer)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


async def replica_metrics(gw: Gateway, body: None, id: str) -> PassThrough:
    """The engine's own /metrics, fetched with its key: llama-server (`--metrics`) requires the
    key there, and an operator's Prometheus then needs only the admin token, not every engine's."""
    record = gw.registry.replica(id)  # 404 for an unknown id
    status, content_type, text = await gw.engine_metrics(record.url, record.engine_api_key)
    if status != 200:
        raise AdminError(
            502,
            f"replica {id}'s engine at {record.url} answered /metrics with {status}: {text[:300].decode(errors='replace')}",
            "engine_metrics_unavailable",
        )
    return PassThrough(text, content_type)


def revoke_key(gw: Gateway, body: None, id: str) -> Any:
    gw.registry.revoke_key(id)
    gw.reload()
    return gw.registry.key(id).public()


@dataclass(frozen=True)
class AdminRoute:
    method: str
    path: str  # segments in braces are path parameters, passed to the handler by name
    handler: Callable[..., Any]
    summary: str
    body: type[Body] | None = None
    query: type[BaseModel] | None = None  # query parameters, passed to the handler as `query`
    status: int = 200  # on success
    content_type: str = "application/json"  # of a success
    errors: tuple[int, ...] = ()  # besides 401 (every route), 400 (a body) and 404 (a path parameter)

    @property
    def params(self) -> list[str]:
        return [s[1:-1] for s in self.path.strip("/").split("/") if s.startswith("{")]

    def match(self, path: str) -> dict[str, str] | None:
        want = self.path.strip("/").split("/")
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


# Every admin route. The test suite enumerates this table, so a new route cannot skip auth.
ADMIN_ROUTES: tuple[AdminRoute, ...] = (
    AdminRoute("GET", "/admin/replicas", list_replicas, "List replicas and aliases"),
    AdminRoute(
        "POST",
        "/admin/replicas",
        register,
        "Register a replica (registering the same model and url again updates it)",
        body=Registration,
        status=201,
        errors=(409,),
    ),
    AdminRoute("POST", "/admin/replicas/{id}/drain", drain, "Drain a replica (no new requests; removed when idle)"),
    AdminRoute("DELETE", "/admin/replicas/{id}", deregister, "Deregister a replica now"),
    AdminRoute(
        "GET",
        "/admin/replicas/{id}/metrics",
        replica_metrics,
        "The replica's engine's Prometheus metrics (vLLM /metrics, llama-server --metrics), fetched with its key",
        content_type="text/plain",
        errors=(502,),
    ),
    AdminRoute("GET", "/admin/fallbacks", list_fallbacks, "List fallback lists (model or alias -> models)"),
    AdminRoute(
        "PUT",
        "/admin/fallbacks",
        set_fallbacks,
        "Set the fallback list of a model or alias ([] removes it)",
        body=Fallbacks,
    ),
    AdminRoute("GET", "/admin/keys", list_keys, "List API keys (no secrets)"),
    AdminRoute("POST", "/admin/keys", create_key, "Create an API key (the key is shown once)", body=NewKey, status=201),
    AdminRoute("DELETE", "/admin/keys/{id}", revoke_key, "Revoke an API key"),
    AdminRoute(
        "PATCH", "/admin/keys/{id}", update_key, "Change an API key's rate limits and budget", body=LimitsUpdate
    ),
    AdminRoute(
        "GET",
        "/admin/usage",
        usage,
        "Requests, tokens, errors and rate-limited requests per API key and model",
        query=UsageQuery,
    ),
)


def authorized(request: Request, token: bytes) -> bool:
    value = request.header(b"authorization")
    return value is not None and value[:7].lower() == b"bearer " and hmac.compare_digest(value[7:].strip(), token)


def _invalid_body(exc: ValidationError) -> tuple[str, str, str | None]:
    """A 400's message, code and `param` (the first bad field, dotted: `aliases.0`)."""
    problems = []
    first: str | None = None
    for error in exc.errors(include_url=False):
        if error["type"] == "json_invalid":
            return f"request body is not valid JSON: {error['msg']}", "invalid_json", None
        field = ".".join(str(part) for part in error["loc"])
        first = first or field or None
        problems.append(f"{field}: {error['msg']}" if field else f"body: {error['msg']}")
    return "invalid request body: " + "; ".join(problems), "invalid_request", first


async def handle(gw: Gateway, request: Request) -> None:
    # The token is checked before the route is looked up, so no admin path answers without it.
    if not authorized(request, gw.admin_token):
        request.send_error(
            401,
            "admin API: send 'Authorization: Bearer <admin token>' "
            "(CORTEX_ADMIN_TOKEN or the gateway's admin-token file)",
            "invalid_admin_token",
        )
        return
    method, path = request.method, request.path
    for route in ADMIN_ROUTES:
        params = route.match(path)
        if params is None or route.method != method:
            continue
        body = None
        if route.body is not None:
            try:
                raw = await request.read_body(ADMIN_MAX_BODY)
                body = route.body.model_validate_json(raw or b"{}")
            except ClientGone:
                return
            except BodyTooLarge:
                request.send_error(413, f"admin request body larger than {ADMIN_MAX_BODY} bytes", "request_too_large")
                return
            except ValidationError as exc:
                message, code, param = _invalid_body(exc)
                request.send_error(400, message, code, param=param)
                return
        if route.query is not None:
            try:
                query = dict(parse_qsl(request.query.decode("latin-1"), keep_blank_values=True))
                params["query"] = route.query.model_validate(query)  # type: ignore[assignment]
            except ValidationError as exc:
                message, code, param = _invalid_body(exc)
                request.send_error(400, message.replace("request body", "query"), code, param=param)
                return
        try:
            result = route.handler(gw, body, **params)
            if inspect.isawaitable(result):
                result = await result
        except RegistryError as exc:
            request.send_error(exc.status, str(exc), "registry_error")
            return
        except AdminError as exc:
            request.send_error(exc.status, str(exc), exc.code)
            return
        if isinstance(result, PassThrough):
            request.send_raw(route.status, result.body, result.content_type)
        else:
            request.send_json(route.status, result)
        return
    request.send_error(404, f"no admin route {method} {path}", "not_found")


def body_schemas() -> dict[str, dict]:
    """JSON Schema of each body model, for the OpenAPI document's components."""
    schemas = {}
    for route in ADMIN_ROUTES:
        if route.body is not None:
            schemas[route.body.__name__] = route.body.model_json_schema(ref_template="#/components/schemas/{model}")
    return schemas
