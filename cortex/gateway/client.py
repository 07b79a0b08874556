"""The admin client the deploy flow and `cortex keys` use to talk to a running gateway.

client = GatewayClient(Settings.load())   # or gateway_client(mode): None where none is used
replica = client.register("smollm2", "http://127.0.0.1:8081", engine_api_key=key, aliases=["small"])
client.drain(old_replica_id)          # waits until its in-flight requests finished
client.deregister(replica_id)
client.remove_route(dead_replica_id)  # False if it had none
"""

from __future__ import annotations

import builtins
import time
from typing import Any, Literal, overload

import httpx

from ..settings import Settings, SettingsError


class GatewayError(Exception):
    """The gateway refused or could not be reached; the message says which and why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class GatewayClient:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        url: str | None = None,
        admin_token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        settings = settings or Settings.load()
        self.url = (url or settings.gateway_url).rstrip("/")
        token = admin_token or settings.resolve_admin_token()
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            response = self._http.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise GatewayError(
                f"gateway at {self.url} unreachable ({type(exc).__name__}: {exc}); "
                f"is `cortex gateway` running and CORTEX_GATEWAY_URL right?"
            ) from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise GatewayError(f"{method} {path}: {response.status_code}: {message}", response.status_code)
        return response.json()

    # --- replicas -----------------------------------------------------------------------------

    def register(
        self,
        model: str,
        replica_url: str,
        engine_api_key: str | None = None,
        aliases: list[str] | tuple[str, ...] = (),
        replica_id: str | None = None,
        labels: dict | None = None,
        fallbacks: builtins.list[str] | tuple[str, ...] | None = None,
    ) -> dict:
        """Route `model` (and its aliases) to the engine at `replica_url`. Returns the replica,
        whose "id" later goes to drain/deregister. Registering the same model+url again updates it.
        `fallbacks`, when given, replaces the model's fallback list."""
        body: dict[str, Any] = {
            "model": model,
            "url": replica_url,
            "engine_api_key": engine_api_key,
            "aliases": list(aliases),
            "labels": labels or {},
        }
        if replica_id:
            body["id"] = replica_id
        if fallbacks is not None:
            body["fallbacks"] = list(fallbacks)
        return self._call("POST", "/admin/replicas", body)

    def set_fallbacks(self, name: str, models: builtins.list[str] | tuple[str, ...]) -> dict:
        """Models tried in order when `name` (a model or alias) has no healthy replica, or its
        replica fails before answering; [] removes the list."""
        return self._call("PUT", "/admin/fallbacks", {"name": name, "fallbacks": list(models)})

    def drain(self, replica_id: str, wait: bool = True, timeout: float = 600.0) -> dict:
        """Stop sending new requests to a replica; the gateway removes it when its last
        in-flight request ends. With `wait`, return only once it is gone."""
        result = self._call("POST", f"/admin/replicas/{replica_id}/drain")
        if not wait or result.get("state") == "removed":
            return result
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(r["id"] == replica_id for r in self.list()["replicas"]):
                return {**result, "state": "removed"}
            time.sleep(0.2)
        raise GatewayError(f"replica {replica_id} still has requests in flight after {timeout:g} s")

    def deregister(self, replica_id: str) -> dict:
        """Remove a replica at once (requests in flight finish on their open connections)."""
        return self._call("DELETE", f"/admin/replicas/{replica_id}")

    def remove_route(self, replica_id: str) -> bool:
        """Deregister a replica whose engine is gone; False if the gateway did not know it."""
        try:
            self.deregister(replica_id)
        except GatewayError as exc:
            if exc.status != 404:
                raise
            return False
        return True

    def list(self) -> dict:
        """{"replicas": [{id, model, url, state, healthy, in_flight, labels}], "aliases": {...}}"""
        return self._call("GET", "/admin/replicas")

    def replicas_of(self, model: str) -> builtins.list[dict]:
        return [r for r in self.list()["replicas"] if r["model"] == model]

    # --- client API keys ----------------------------------------------------------------------

    def create_key(
        self,
        name: str = "",
        models: builtins.list[str] | None = None,
        expires_at: float | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        budget_tokens_per_day: int | None = None,
    ) -> dict:
        """A new client key; the returned "key" is the only time the secret is shown. Limits:
        requests and tokens per minute, tokens per UTC day (None: unlimited)."""
        body: dict[str, Any] = {"name": name, "models": models, "expires_at": expires_at}
        for field, value in (("rpm", rpm), ("tpm", tpm), ("budget_tokens_per_day", budget_tokens_per_day)):
            if value is not None:  # a gateway from before limits refuses the fields, even as null
                body[field] = value
        return self._call("POST", "/admin/keys", body)

    def update_key(self, key_id: str, **limits: int | None) -> dict:
        """Change a key's limits: rpm=, tpm=, budget_tokens_per_day= (None removes one; a limit
        not passed is kept)."""
        return self._call("PATCH", f"/admin/keys/{key_id}", limits)

    def usage(self, since: float | None = None) -> dict:
        """{"usage": [{key_id, name, model, requests, prompt_tokens, completion_tokens, errors,
        rate_limited}], "since", "flush_interval_s"}"""
        return self._call("GET", "/admin/usage" + ("" if since is None else f"?since={since}"))

    def list_keys(self) -> builtins.list[dict]:
        return self._call("GET", "/admin/keys")["keys"]

    def revoke_key(self, key_id: str) -> dict:
        return self._call("DELETE", f"/admin/keys/{key_id}")


@overload
def gateway_client(mode: Literal[True]) -> GatewayClient: ...
@overload
def gateway_client(mode: bool | None) -> GatewayClient | None: ...
def gateway_client(mode: bool | None) -> GatewayClient | None:
    """The admin client of the gateway a deploy registers with, or None where none is to be used.

    mode True: the gateway must answer (GatewayError otherwise); False: do not use it;
    None: use it if one answers at CORTEX_GATEWAY_URL."""
    if mode is False:
        return None
    try:
        client = GatewayClient()
    except SettingsError:  # no admin token: no gateway was ever started here
        if mode:
            raise
        return None
    try:
        client.list()
        return client
    except GatewayError:
        client.close()
        if mode:
            raise
        return None
