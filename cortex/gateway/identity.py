"""Is the process answering at a replica's URL the engine that was registered there?

A registration names a URL, and an engine can die while its route stays: any process that
later listens on that port would answer `/health` with 200. So a health pass is three steps,
and the engine's key is sent only in the last, to a process that has shown it checks keys:

    1. GET /health, without the key             200, or the replica is down
    2. GET /v1/models with a fresh random key   401: it checks keys (llama-server and vLLM started
                                                with a key both do); anything else is not the
                                                engine, and it never sees the real key
    3. GET /v1/models with the replica's key    200 and the registered model among the served
                                                ids; 401/403 is another engine (its own key), a
                                                different model is another engine too

A replica registered without a key gets step 1 and step 3 without a key. The key travels
otherwise only with the requests routed to a replica that passed, as before.

What this does not prove: a process written to imitate an engine (401 to every key but the
one it hopes for) still sees the key in step 3. The route of a dead engine is removed when its
replica is cleaned up (flows/deploy.py), so such a process has only the window between the
death and the cleanup; the key it could see belongs to a dead engine (each replica gets its own
unless CORTEX_ENGINE_API_KEY sets one for all).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import httpx
import orjson


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str  # "" when healthy
    impostor: bool = False  # something answers, but not the registered engine
    timed_out: bool = False  # no answer in time (the gateway may have been too busy to read it)


def served_ids(body: bytes) -> set[str]:
    """Model ids an OpenAI-style `/v1/models` answer lists (llama-server adds `aliases`)."""
    data = orjson.loads(body).get("data")
    if not isinstance(data, list):
        raise ValueError("no 'data' list")
    ids: set[str] = set()
    for entry in data:
        if isinstance(entry, dict):
            if isinstance(entry.get("id"), str):
                ids.add(entry["id"])
            aliases = entry.get("aliases")
            if isinstance(aliases, list):
                ids.update(a for a in aliases if isinstance(a, str))
    return ids


async def verify_replica(client: httpx.AsyncClient, url: str, model: str, engine_key: str | None) -> Verdict:
    """Check the replica at `url` (see the module docstring). Network failures mean down."""
    try:
        health = await client.get(url + "/health")
        if health.status_code != 200:
            return Verdict(False, f"/health answered {health.status_code}")
        if engine_key:
            decoy = await client.get(
                url + "/v1/models", headers={"Authorization": f"Bearer {secrets.token_urlsafe(24)}"}
            )
            if decoy.status_code != 401:
                return Verdict(
                    False,
                    f"not the registered engine: /v1/models answered {decoy.status_code} to a wrong "
                    "key (an engine started with a key answers 401); its key was not sent",
                    impostor=True,
                )
        headers = {"Authorization": f"Bearer {engine_key}"} if engine_key else {}
        listing = await client.get(url + "/v1/models", headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        return Verdict(
            False, f"unreachable: {type(exc).__name__}: {exc}", timed_out=isinstance(exc, httpx.TimeoutException)
        )
    if listing.status_code in (401, 403):
        return Verdict(
            False, f"not the registered engine: it refuses this replica's key ({listing.status_code})", impostor=True
        )
    if listing.status_code != 200:
        return Verdict(False, f"/v1/models answered {listing.status_code}")
    try:
        ids = served_ids(listing.content)
    except (ValueError, AttributeError):
        return Verdict(False, "not the registered engine: /v1/models is not an OpenAI model list", impostor=True)
    if model not in ids:
        shown = ", ".join(sorted(ids)[:5]) or "nothing"
        return Verdict(False, f"not the registered engine: it serves {shown[:200]}, not {model}", impostor=True)
    return Verdict(True, "")
