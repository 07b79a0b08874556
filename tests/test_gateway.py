"""The gateway against instant fake engines: routing, pass-through, errors, auth, replicas,
health, retries, drain, persistence, metrics and logs. A real gateway process each time
(`python -m cortex.gateway`, the code behind `cortex gateway`)."""

from __future__ import annotations

import json
import multiprocessing
import re
import socket
import subprocess
import sys
import sqlite3
import threading
import time

import httpx
import pytest

from cortex.gateway.client import GatewayError
from cortex.testing.fake_engine import FakeEngine
from cortex.gateway.registry import hash_key, open_registry
from cortex.testing.gateway import Gateways, GatewayProcess
from cortex.settings import Settings, SettingsError

# Frequent health checks, but generous timeouts: a dead fake engine refuses at once or answers
# 503, so only a busy machine would ever run into them, and that must not take a replica out.
FAST = {
    "CORTEX_GATEWAY_HEALTH_INTERVAL": "0.3",
    "CORTEX_GATEWAY_HEALTH_TIMEOUT": "30",
    "CORTEX_GATEWAY_CONNECT_TIMEOUT": "30",
    "CORTEX_GATEWAY_MAX_BODY_BYTES": "100000",
}


@pytest.fixture
def engines():
    started: list[FakeEngine] = []

    def start(**kwargs) -> FakeEngine:
        kwargs.setdefault("models", ("smol", "alpha", "beta"))
        engine = FakeEngine(api_key=kwargs.pop("api_key", "engine-secret"), **kwargs).start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop()


@pytest.fixture
def gateway(tmp_path):
    gateways = Gateways(tmp_path, FAST)
    yield gateways
    gateways.stop_all()


def new_key(gw: GatewayProcess, **kwargs) -> str:
    with gw.client() as c:
        return c.create_key(**kwargs)["key"]


def chat(gw: GatewayProcess, key: str | None, model: str, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        gw.url + "/v1/chat/completions",
        headers=headers,
        timeout=60,
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
    )


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    # Generous: it polls, so a passing run takes no longer; only a loaded machine needs the room.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- routing and pass-through ----------------------------------------------------------------


def test_routes_by_name_and_alias_and_passes_body_through_unchanged(gateway, engines):
    gw, engine = gateway(), engines()
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret", aliases=["tiny"])
    key = new_key(gw)
    raw = (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
        b'"top_k": 7, "repeat_penalty": 1.3, "mirostat": 2, "logit_bias": {"15": -100}}'
    )
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        content=raw,
        timeout=10,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello from the fake engine."
    last = httpx.get(engine.base_url + "/_last").json()
    assert last["body"].encode() == raw  # byte for byte, including the alias the client used
    assert last["headers"]["authorization"] == "Bearer engine-secret"  # the engine's key, not the client's
    assert key not in json.dumps(last["headers"])
    assert r.headers["x-cortex-replica"].startswith("smol-")
    assert float(r.headers["x-cortex-overhead-ms"]) >= 0

    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/embeddings", {"input": "x"})):
        r = httpx.post(gw.url + path, json={"model": "smol", **body}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        assert httpx.get(engine.base_url + "/_last").json()["path"] == path


def test_the_engines_hop_by_hop_headers_stay_between_gateway_and_engine(gateway, engines):
    """Headers about the engine's own connection (RFC 9110 7.6.1) must not reach the client:
    `connection: close` or `upgrade` from the engine would tear down or hijack the client's
    connection. End-to-end headers pass through."""
    gw, engine = gateway(), engines()
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
    hop = {
        "connection": "close",
        "keep-alive": "timeout=1",
        "proxy-connection": "close",
        "upgrade": "h2c",
        "te": "trailers",
        "trailer": "x-sum",
        "server": "fake-engine/1",
    }
    r = chat(gw, new_key(gw), "smol", fake_headers={**hop, "x-engine-note": "kept"})
    assert r.status_code == 200, r.text
    assert r.headers["x-engine-note"] == "kept"
    leaked = {name: value for name, value in hop.items() if value in r.headers.get_list(name)}
    assert leaked == {}, f"the engine's hop-by-hop headers reached the client: {leaked}"


def test_models_lists_registered_healthy_models_without_urls(gateway, engines):
    gw, a, b = gateway(), engines(), engines()
    with gw.client() as c:
        c.register("alpha", a.base_url, engine_api_key="engine-secret", aliases=["a1"])
        c.register("beta", b.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    r = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    assert sorted(m["id"] for m in r.json()["data"]) == ["a1", "alpha", "beta"]
    assert "127.0.0.1" not in r.text
    b.healthy = False
    wait_until(
        lambda: (
            [
                m["id"]
                for m in httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
            ]
            == ["alpha", "a1"]
        ),
        what="beta to leave /v1/models",
    )
    assert httpx.get(gw.url + "/health").json()["status"] == "ok"


def test_error_bodies_are_openai_style(gateway, engines):
    gw, engine = gateway(), engines()
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    auth = {"Authorization": f"Bearer {key}"}

    r = chat(gw, key, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(gw.url + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(gw.url + "/v1/chat/completions", json={"messages": []}, headers=auth)
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "smol", "pad": "x" * 200_000}, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(gw.url + "/v1/chat/completions", headers=auth)
    assert r.status_code == 405
    # The engine's own errors pass through with their status and body.
    r = chat(gw, key, "smol", fake_status=422)
    assert r.status_code == 422 and r.json()["error"]["message"] == "fake failure"


# --- client auth -----------------------------------------------------------------------------


def test_client_keys_hashed_limited_expiring_revocable(gateway, engines):
    gw, engine = gateway(), engines()
    with gw.client() as c:
        c.register("alpha", engine.base_url, engine_api_key="engine-secret")
        c.register("beta", f"http://localhost:{engine.port}", engine_api_key="engine-secret")
        everything = c.create_key(name="all")
        only_alpha = c.create_key(name="alpha-only", models=["alpha"])
        short = c.create_key(name="short", expires_at=time.time() + 3600)

    assert chat(gw, None, "alpha").status_code == 401
    assert chat(gw, "sk-cortex-wrong", "alpha").status_code == 401
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "alpha"}, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert chat(gw, everything["key"], "beta").status_code == 200
    assert chat(gw, only_alpha["key"], "alpha").status_code == 200
    r = chat(gw, only_alpha["key"], "beta")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    models = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {only_alpha['key']}"}).json()
    assert [m["id"] for m in models["data"]] == ["alpha"]

    assert chat(gw, short["key"], "alpha").status_code == 200
    # Its time runs out (set in the registry, where the gateway reads it, rather than racing a
    # short expiry against the first use); the gateway picks up the write within its poll.
    db = sqlite3.connect(gw.home / "gateway" / "registry.db")
    with db:
        db.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?", (time.time() - 1, short["id"]))
    db.close()
    wait_until(lambda: chat(gw, short["key"], "alpha").status_code == 401, what="the expired key to be refused")
    r = chat(gw, short["key"], "alpha")
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]

    with gw.client() as c:
        c.revoke_key(everything["id"])
        listed = {k["id"]: k for k in c.list_keys()}
    assert listed[everything["id"]]["disabled"] is True
    assert "key" not in listed[everything["id"]]
    r = chat(gw, everything["key"], "alpha")
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]

    # Only hashes are stored.
    db = (gw.home / "gateway" / "registry.db").read_bytes() + b"".join(
        p.read_bytes() for p in (gw.home / "gateway").glob("registry.db-*")
    )
    for k in (everything, only_alpha, short):
        assert k["key"].encode() not in db
    rows = sqlite3.connect(gw.home / "gateway" / "registry.db").execute("SELECT key_hash FROM api_keys").fetchall()
    assert {r[0] for r in rows} == {hash_key(k["key"]) for k in (everything, only_alpha, short)}


def test_no_auth_mode_only_when_configured(gateway, engines, tmp_path):
    engine = engines()
    open_gw = gateway(no_auth=True, home=tmp_path / "open")
    with open_gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
    assert chat(open_gw, None, "smol").status_code == 200
    # Admin routes still need the token in no-auth mode.
    assert httpx.get(open_gw.url + "/admin/replicas").status_code == 401
    closed = gateway(home=tmp_path / "closed")
    with closed.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
    assert chat(closed, None, "smol").status_code == 401


# --- streaming ---------------------------------------------------------------------------------


def test_streaming_passes_events_through_as_they_arrive(gateway, engines):
    gw, engine = gateway(), engines()
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    events: list[str] = []
    # The engine sends each token event only once the client has the one before: a gateway that
    # held events back (until more came, or the end) would leave the client waiting forever.
    engine.release("step", 1)
    try:
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
            json={
                "model": "smol",
                "stream": True,
                "fake_chunks": 5,
                "fake_hold": "step",
                "stream_options": {"include_usage": True},
            },
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    engine.release("step", 1)
    except httpx.ReadTimeout:
        pytest.fail(f"the gateway held back an event; the client had only {len(events)}: {events}")
    assert events[-1] == "[DONE]"
    assert len(events) == 7  # 5 tokens, the usage chunk, [DONE]
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'cortex_gateway_tokens_total{model="smol"' in metrics and 'type="completion"} 5' in metrics


def test_client_disconnect_cancels_upstream_request(gateway, engines):
    gw, engine = gateway(), engines()
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "smol", "stream": True, "fake_chunks": 100, "fake_delay": 0.1},
    ) as r:
        next(r.iter_lines())
    # The client closed its connection after one event; the engine must see its request end.
    wait_until(lambda: engine.cancelled == 1, what="the engine's stream to be cancelled")
    wait_until(lambda: gw.client().list()["replicas"][0]["in_flight"] == 0, what="in-flight to drop")


def test_client_disconnect_cancels_a_slow_non_streaming_request(gateway, engines):
    gw, engine = gateway(), engines()
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    body = json.dumps({"model": "smol", "messages": [], "fake_delay": 600}).encode()  # a long generation
    with socket.create_connection(("127.0.0.1", gw.port)) as client:
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (key.encode(), len(body), body)
        )
        # The client gives up and closes once the engine is working on its request.
        wait_until(lambda: "fake_delay" in engine.last.get("body", ""), what="the request to reach the engine")
    wait_until(lambda: engine.cancelled == 1, what="the engine's request to be cancelled")
    assert chat(gw, key, "smol").status_code == 200  # and the replica is not blamed for it
    assert 'kind="client_disconnect"' in httpx.get(gw.url + "/metrics").text


# --- replicas, health, retries, drain ------------------------------------------------------------


def _stream_in_background(gw, key, model, results, hold: str, chunks=10):
    """A stream the engine holds open until the test calls `engine.release(hold)`."""

    def run():
        try:
            with httpx.stream(
                "POST",
                gw.url + "/v1/chat/completions",
                timeout=60,
                headers={"Authorization": f"Bearer {key}"},
                json={"model": model, "stream": True, "fake_chunks": chunks, "fake_hold": hold},
            ) as r:
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
                results.append((r.status_code, events, r.headers.get("x-cortex-replica")))
        except httpx.HTTPError as exc:
            results.append(("error", repr(exc), None))

    t = threading.Thread(target=run)
    t.start()
    return t


def test_least_in_flight_spreads_concurrent_requests(gateway, engines):
    gw, a, b = gateway(), engines(), engines()
    with gw.client() as c:
        ra = c.register("smol", a.base_url, engine_api_key="engine-secret")
        rb = c.register("smol", b.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    results: list = []
    threads = []
    for k in range(1, 7):
        threads.append(_stream_in_background(gw, key, "smol", results, hold="spread"))
        # Held open, and the next one sent only once this one counts: each request sees the loads
        # the ones before it left, however slow the machine.
        wait_until(
            lambda k=k: sum(r["in_flight"] for r in gw.client().list()["replicas"]) == k, what=f"{k} streams in flight"
        )
    for engine in (a, b):
        engine.release("spread")
    for t in threads:
        t.join()
    used = [r[2] for r in results]
    assert all(r[0] == 200 for r in results), results
    assert used.count(ra["id"]) == 3 and used.count(rb["id"]) == 3, used


def test_health_check_takes_replica_out_and_back(gateway, engines):
    gw, engine = gateway(), engines()
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    engine.healthy = False
    wait_until(lambda: gw.client().list()["replicas"][0]["healthy"] is False, what="replica to be marked down")
    r = chat(gw, key, "smol")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "no_healthy_replica"
    engine.healthy = True
    wait_until(lambda: gw.client().list()["replicas"][0]["healthy"] is True, what="replica to come back")
    assert chat(gw, key, "smol").status_code == 200


def test_a_replica_answering_requests_is_not_taken_out_for_a_health_timeout(gateway, engines):
    """Its /health stops answering (an engine whose HTTP threads its own load starves) while
    requests through the gateway keep being answered: it stays routed, and the timeouts are
    counted as timeout_while_answering. Once nothing is answered either, the next timeout takes
    it out. The health timeout (2 s) is long against a request to an instant engine."""
    gw = gateway(CORTEX_GATEWAY_HEALTH_TIMEOUT="2", CORTEX_GATEWAY_HEALTH_INTERVAL="0.2")
    engine = engines()
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    wait_until(lambda: gw.client().list()["replicas"][0]["healthy"] is True, what="replica to be healthy")
    engine.health_silent = True

    def excused() -> bool:
        return 'kind="timeout_while_answering"' in httpx.get(gw.url + "/metrics", timeout=10).text

    deadline = time.monotonic() + 60  # a hang guard
    while not excused():
        assert time.monotonic() < deadline, "no health timeout was excused within 60 s"
        assert chat(gw, key, "smol").status_code == 200
    assert gw.client().list()["replicas"][0]["healthy"] is True
    # no more requests: the replica answers nothing, and the next health timeout counts
    wait_until(lambda: gw.client().list()["replicas"][0]["healthy"] is False, what="replica to be taken out")
    engine.health_silent = False
    wait_until(lambda: gw.client().list()["replicas"][0]["healthy"] is True, what="replica to come back")


def test_connect_error_retries_on_another_replica(gateway, engines):
    # Health checks far apart, so the failed request is what takes the dead replica out.
    gw, live = gateway(CORTEX_GATEWAY_HEALTH_INTERVAL="60"), engines()
    dead = engines()
    dead.kill()  # nothing listens on its port any more
    with gw.client() as c:
        # fixed ids: which of the prompts below hash to the dead replica is the same every run
        rd = c.register("smol", dead.base_url, engine_api_key="engine-secret", replica_id="smol-dead")
        rl = c.register("smol", live.base_url, engine_api_key="engine-secret", replica_id="smol-live")
    key = new_key(gw)
    for i in range(5):
        r = chat(gw, key, "smol", messages=[{"role": "user", "content": f"question {i}"}])
        assert r.status_code == 200 and r.headers["x-cortex-replica"] == rl["id"]
    replicas = {r["id"]: r for r in gw.client().list()["replicas"]}
    assert replicas[rd["id"]]["healthy"] is False
    assert 'kind="connect"' in httpx.get(gw.url + "/metrics").text


def test_engine_killed_mid_stream_gives_error_event_then_failover_then_503(gateway, engines):
    gw, a, b = gateway(), engines(), engines()
    with gw.client() as c:
        ra = c.register("smol", a.base_url, engine_api_key="engine-secret")
        c.register("smol", b.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    events = []
    for engine in (a, b):
        engine.release("victim", 3)  # three events, then the stream waits: it dies mid-response, not after it
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
        json={"model": "smol", "stream": True, "fake_chunks": 50, "fake_hold": "victim"},
    ) as r:
        victim = a if r.headers["x-cortex-replica"] == ra["id"] else b
        survivor = b if victim is a else a
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    victim.kill()
    # The three events sent before the engine died arrive; then the error event ends the stream.
    assert len(events) == 4 and "[DONE]" not in events, events
    assert all("choices" in json.loads(e) for e in events[:-1])
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and "failed mid-response" in error["message"]
    for _ in range(3):
        r = chat(gw, key, "smol")
        assert r.status_code == 200
    survivor.kill()
    r = chat(gw, key, "smol")
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1


def test_drain_finishes_in_flight_requests_then_removes_replica(gateway, engines):
    gw, old, new = gateway(), engines(), engines()
    with gw.client() as c:
        r_old = c.register("smol", old.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    results: list = []
    t = _stream_in_background(gw, key, "smol", results, hold="drain")
    wait_until(lambda: gw.client().list()["replicas"][0]["in_flight"] == 1, what="the stream to start")
    with gw.client() as c:
        r_new = c.register("smol", new.base_url, engine_api_key="engine-secret")
        drained = c.drain(r_old["id"], wait=False)
        assert drained["state"] == "draining"
        for _ in range(3):
            r = chat(gw, key, "smol")
            assert r.status_code == 200 and r.headers["x-cortex-replica"] == r_new["id"]
        assert r_old["id"] in [x["id"] for x in c.list()["replicas"]]  # still finishing its stream (held open)
        old.release("drain")
        # a draining replica leaves by itself once its last request ends
        wait_until(
            lambda: [x["id"] for x in c.list()["replicas"]] == [r_new["id"]],
            what="the drained replica to leave after its stream ended",
        )
    t.join()
    status, events, replica = results[0]
    assert status == 200 and replica == r_old["id"] and events[-1] == "data: [DONE]" and len(events) == 11


def test_deregister_and_unknown_replica(gateway, engines):
    gw, engine = gateway(), engines()
    with gw.client() as c:
        rep = c.register("smol", engine.base_url, engine_api_key="engine-secret", aliases=["tiny"])
        c.deregister(rep["id"])
        assert c.list() == {"replicas": [], "aliases": {}, "fallbacks": {}}
        with pytest.raises(GatewayError) as err:
            c.deregister(rep["id"])
        assert err.value.status == 404
        for bad in ("ftp://x", "http://127.0.0.1:8000/v1", "http://:80", "http://h:99999", "http://h:port"):
            with pytest.raises(GatewayError) as err:
                c.register("smol", bad)
            assert err.value.status == 400
    assert chat(gw, new_key(gw), "tiny").status_code == 404


def test_admin_bodies_are_checked_and_errors_name_the_field(gateway):
    """Admin bodies are typed models: a wrong type, a bad value or a misspelt field is a 400 in
    OpenAI's error shape whose `param` names the field, and nothing is written."""
    gw = gateway()
    auth = {"Authorization": f"Bearer {gw.admin_token()}"}
    ok = {"model": "smol", "url": "http://127.0.0.1:1"}
    cases = [
        ("/admin/replicas", {**ok, "engine_apikey": "k"}, "engine_apikey", "Extra inputs"),
        ("/admin/replicas", {**ok, "model": 5}, "model", "valid string"),
        ("/admin/replicas", {"url": ok["url"]}, "model", "Field required"),
        ("/admin/replicas", {**ok, "aliases": ["tiny", ""]}, "aliases.1", "at least 1 character"),
        ("/admin/replicas", {**ok, "id": "has space"}, "id", "pattern"),
        ("/admin/replicas", {**ok, "engine_api_key": "a\r\nX-Evil: 1"}, "engine_api_key", "pattern"),
        ("/admin/replicas", {**ok, "labels": []}, "labels", "object"),
        ("/admin/replicas", {**ok, "fallbacks": ["big", ""]}, "fallbacks.1", "at least 1 character"),
        ("/admin/keys", {"expires_at": True}, "expires_at", "number"),
        ("/admin/keys", {"expires_at": "1700000000"}, "expires_at", "number"),
        ("/admin/keys", {"models": "smol"}, "models", "array"),
    ]
    for path, body, param, words in cases:
        r = httpx.post(gw.url + path, json=body, headers=auth)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request", error
        assert error["param"] == param and words in error["message"] and param in error["message"], error
    for raw, code in ((b"{not json", "invalid_json"), (b"[]", "invalid_request"), (b"null", "invalid_request")):
        r = httpx.post(gw.url + "/admin/replicas", content=raw, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    with gw.client() as c:
        assert c.list()["replicas"] == [] and c.list_keys() == []
        assert c.register("smol", ok["url"], aliases=["tiny"])["model"] == "smol"
    # The document clients and the fuzz test read comes from the same models.
    schemas = httpx.get(gw.url + "/openapi.json").json()["components"]["schemas"]
    assert schemas["Registration"]["additionalProperties"] is False
    assert set(schemas["Registration"]["properties"]) == {
        "model",
        "url",
        "engine_api_key",
        "aliases",
        "id",
        "labels",
        "fallbacks",
    }


# --- registry durability -------------------------------------------------------------------------


def test_registry_survives_restart(gateway, engines, tmp_path):
    engine = engines()
    first = gateway(home=tmp_path / "home")
    with first.client() as c:
        rep = c.register("smol", engine.base_url, engine_api_key="engine-secret", aliases=["tiny"])
    key = new_key(first)
    first.stop()
    second = gateway(home=tmp_path / "home")
    r = chat(second, key, "tiny")
    assert r.status_code == 200 and r.headers["x-cortex-replica"] == rep["id"]
    assert httpx.get(engine.base_url + "/_last").json()["headers"]["authorization"] == "Bearer engine-secret"


def _register_many(location: str, worker: int, n: int) -> None:
    registry = open_registry(location)
    for i in range(n):
        registry.register(f"m{i % 5}", f"http://10.0.{worker}.{i}:8000", f"key-{worker}-{i}", [f"alias{i % 5}"])
        registry.create_key(name=f"w{worker}-{i}")
    registry.close()


def test_concurrent_registrations_do_not_corrupt_the_registry(registry_location):
    open_registry(registry_location).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_register_many, args=(registry_location, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    registry = open_registry(registry_location)
    assert len(registry.replicas()) == 160
    assert len({r.url for r in registry.replicas()}) == 160
    assert len(registry.keys()) == 160
    assert registry.aliases() == {f"alias{i}": f"m{i}" for i in range(5)}
    if registry_location.startswith("postgresql://"):
        return
    conn = sqlite3.connect(registry_location)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_registrations_through_the_api(gateway, engines):
    gw = gateway()
    errors: list = []

    def register(i: int) -> None:
        try:
            with gw.client() as c:
                c.register(f"model{i % 3}", f"http://127.0.0.1:{20000 + i}", engine_api_key=f"k{i}")
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(gw.client().list()["replicas"]) == 30


def test_alias_conflicts_are_refused(gateway):
    gw = gateway()
    with gw.client() as c:
        c.register("alpha", "http://127.0.0.1:1", aliases=["shared"])
        with pytest.raises(GatewayError) as err:
            c.register("beta", "http://127.0.0.1:2", aliases=["shared"])
        assert err.value.status == 409
        with pytest.raises(GatewayError) as err:
            c.register("beta", "http://127.0.0.1:2", aliases=["alpha"])
        assert err.value.status == 409


# --- observability ---------------------------------------------------------------------------------


def test_metrics_and_access_log_without_prompts(gateway, engines):
    gw, engine = gateway(), engines()
    with gw.client() as c:
        rep = c.register("smol", engine.base_url, engine_api_key="engine-secret")
    key = new_key(gw)
    secret_prompt = "the-password-is-swordfish-4711"
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "smol", "messages": [{"role": "user", "content": secret_prompt}]},
    )
    assert r.status_code == 200
    chat(gw, key, "nope")
    chat(gw, key, "smol", fake_status=500)
    text = httpx.get(gw.url + "/metrics").text
    labels = f'model="smol",replica="{rep["id"]}"'
    assert f'cortex_gateway_requests_total{{{labels},status="200"}} 1' in text
    assert f'cortex_gateway_requests_total{{{labels},status="500"}} 1' in text
    assert 'cortex_gateway_errors_total{model="",replica="",kind="unknown_model"} 1' in text
    assert "nope" not in text  # an unknown name a client sent never becomes a series
    assert f'cortex_gateway_tokens_total{{{labels},type="prompt"}} 7' in text
    assert f'cortex_gateway_errors_total{{{labels},kind="upstream_status_5xx"}} 1' in text
    assert f"cortex_gateway_in_flight{{{labels}}} 0" in text
    assert f"cortex_gateway_request_duration_seconds_count{{{labels}}} 2" in text
    assert f'cortex_gateway_time_to_first_byte_seconds_bucket{{{labels},le="+Inf"}} 2' in text
    assert f"cortex_gateway_overhead_seconds_count{{{labels}}} 2" in text
    wait_until(lambda: gw.log().count('"path":"/v1/chat/completions"') >= 2, what="access log lines")
    log = gw.log()
    assert secret_prompt not in log
    assert key not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"ts"')]
    assert lines[0]["model"] == "smol" and lines[0]["status"] == 200 and lines[0]["prompt_tokens"] == 7


# --- settings ----------------------------------------------------------------------------------------


def test_settings_precedence_env_then_file_then_default(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    (home / "config.yaml").write_text(
        "gateway_url: http://gw.internal:9000\ngateway_port: 9000\nadmin_token: from-file\n"
    )
    s = Settings.load(env={"CORTEX_HOME": str(home), "CORTEX_GATEWAY_PORT": "7000"})
    assert s.gateway_url == "http://gw.internal:9000"
    assert s.gateway_port == 7000
    assert s.resolve_admin_token() == "from-file"
    assert s.gateway_db == str(home / "gateway" / "registry.db")
    assert s.gateway_no_auth is False and s.gateway_host == "127.0.0.1"
    (home / "config.yaml").write_text("gatway_url: typo\n")
    with pytest.raises(SettingsError, match="gatway_url"):
        Settings.load(env={"CORTEX_HOME": str(home)})
    with pytest.raises(SettingsError, match="CORTEX_GATEWAY_PORT"):
        Settings.load(env={"CORTEX_HOME": str(tmp_path / "x"), "CORTEX_GATEWAY_PORT": "eighty"})
    empty = Settings.load(env={"CORTEX_HOME": str(tmp_path / "fresh")})
    with pytest.raises(SettingsError, match="CORTEX_ADMIN_TOKEN"):
        empty.resolve_admin_token()
    token = empty.resolve_admin_token(create=True)
    assert empty.resolve_admin_token() == token
    assert (empty.admin_token_path.stat().st_mode & 0o777) == 0o600


def test_keys_command_line(gateway, engines, capsys, monkeypatch):
    from cli.commands.keys import parse_expiry
    from cli.main import main as cortex

    gw, engine = gateway(), engines()
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
    for name, value in gw.env.items():
        if name.startswith("CORTEX_"):
            monkeypatch.setenv(name, value)
    assert cortex(["keys", "create", "--name", "ci", "--models", "smol", "--expires", "30d"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-cortex-") and chat(gw, key, "smol").status_code == 200
    assert cortex(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["name"] == "ci" and listed[0]["models"] == ["smol"]
    assert 29 * 86400 < listed[0]["expires_at"] - time.time() <= 30 * 86400
    assert cortex(["keys", "list"]) == 0
    table = capsys.readouterr().out
    assert listed[0]["id"] in table and "active" in table and "smol" in table
    assert cortex(["keys", "revoke", listed[0]["id"]]) == 0
    assert chat(gw, key, "smol").status_code == 401
    assert cortex(["keys", "create", "--expires", "soon"]) == 2
    assert "use a duration" in capsys.readouterr().err
    assert parse_expiry("2030-01-01") == 1893456000.0


def test_cortex_gateway_command(tmp_path, engines):
    cli = [sys.executable, "-m", "cli"]
    gw = GatewayProcess(tmp_path / "home", env=FAST, command=[*cli, "gateway"]).start()
    try:
        engine = engines()
        with gw.client() as c:
            c.register("smol", engine.base_url, engine_api_key="engine-secret", aliases=["tiny"])
        out = subprocess.run([*cli, "gateway", "replicas"], env=gw.env, capture_output=True, text=True, check=True)
        assert "smol (tiny)" in out.stdout and "active" in out.stdout
        secrets = {"CORTEX_API_KEY": "client-key-s3cret", "CORTEX_ENGINE_API_KEY": "engine-key-s3cret"}
        out = subprocess.run(
            [*cli, "gateway", "settings"], env={**gw.env, **secrets}, capture_output=True, text=True, check=True
        )
        assert "CORTEX_GATEWAY_NO_AUTH" in out.stdout and f"gateway_port = {gw.port}" in out.stdout
        assert "cortex-admin-" not in out.stdout  # the token is never printed
        assert "s3cret" not in out.stdout  # nor the client's or the engines' key
        assert "api_key = (set)" in out.stdout and "engine_api_key = (set)" in out.stdout
        assert "client authentication is OFF" not in gw.log()
    finally:
        gw.stop()


# --- prefix-cache affinity and fallbacks ---------------------------------------------------------


def _conversation(system: str, question: str = "hi", earlier: tuple[str, ...] = ()) -> list[dict]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": earlier[0] if earlier else question}]
    for i, turn in enumerate(earlier[1:]):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": turn})
    if earlier:
        messages.append({"role": "user", "content": question})
    return messages


def _served_by(gw, key, messages, **body) -> str:
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        json={"model": "smol", "messages": messages, **body},
    )
    assert r.status_code == 200, r.text
    return r.headers["x-cortex-replica"]


def test_affinity_keeps_a_prefix_on_one_replica_and_moves_only_a_new_replicas_share(gateway, engines):
    # Fixed replica ids: the rendezvous weights, and so every assertion here, are the same each run.
    gw, a, b, c = gateway(), engines(), engines(), engines()
    with gw.client() as client:
        for engine, rid in ((a, "smol-a"), (b, "smol-b")):
            client.register("smol", engine.base_url, engine_api_key="engine-secret", replica_id=rid)
    key = new_key(gw)
    system = "You are a support agent for a bicycle shop. " * 40
    # Every turn of every conversation that opens the same way goes to one replica.
    first = _served_by(gw, key, _conversation(system, "my chain skips"))
    for turn in range(3):
        earlier = ("my chain skips", "Check the derailleur.", *[f"turn {i}" for i in range(2 * turn)])
        assert _served_by(gw, key, _conversation(system, f"follow-up {turn}", earlier)) == first
    # Different openings spread over both replicas.
    prompts = [f"Conversation {i}: you are assistant number {i}." for i in range(30)]
    before = {p: _served_by(gw, key, _conversation(p)) for p in prompts}
    assert set(before.values()) == {"smol-a", "smol-b"}, before
    # A third replica takes over some prefixes; none moves between the first two.
    with gw.client() as client:
        client.register("smol", c.base_url, engine_api_key="engine-secret", replica_id="smol-c")
    after = {p: _served_by(gw, key, _conversation(p)) for p in prompts}
    assert "smol-c" in after.values(), after
    moved = {p: (before[p], after[p]) for p in prompts if after[p] not in (before[p], "smol-c")}
    assert moved == {}, moved
    # /v1/completions keys on the prompt.
    text = "Once upon a time, " * 300  # longer than AFFINITY_CHARS: the endings do not count
    r = [
        httpx.post(
            gw.url + "/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "smol", "prompt": text + str(i)},
        ).headers["x-cortex-replica"]
        for i in range(5)
    ]
    assert len(set(r)) == 1, r


def _held_chat(gw, key, messages, results, hold):
    def run():
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            timeout=60,
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "smol", "messages": messages, "stream": True, "fake_chunks": 2, "fake_hold": hold},
        ) as r:
            list(r.iter_lines())
            results.append((r.status_code, r.headers.get("x-cortex-replica")))

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("affinity", [True, False])
def test_affinity_load_stays_bounded(gateway, engines, affinity):
    """Requests sharing one prefix are held open one after another; each is sent only once the
    one before counts as in flight, so every pick sees exactly the loads the test expects."""
    ratio = 1.25
    gw = gateway(CORTEX_GATEWAY_AFFINITY=str(affinity).lower(), CORTEX_GATEWAY_AFFINITY_LOAD_RATIO=str(ratio))
    a, b = engines(), engines()
    with gw.client() as client:
        client.register("smol", a.base_url, engine_api_key="engine-secret", replica_id="smol-a")
        client.register("smol", b.base_url, engine_api_key="engine-secret", replica_id="smol-b")
    key = new_key(gw)
    messages = _conversation("A long shared system prompt. " * 100)
    home = _served_by(gw, key, messages)  # the replica the prefix hashes to (least-in-flight: the first)
    other = "smol-b" if home == "smol-a" else "smol-a"
    results: list = []
    threads, expected = [], []
    load = {home: 0, other: 0}
    for k in range(1, 10):
        if affinity:  # the rule: the prefix's replica unless it is past ratio x (mean + 1)
            mean = (load[home] + load[other]) / 2
            goes = home if load[home] <= ratio * (mean + 1) else other
        else:  # least in flight; a tie goes to the first registered
            goes = min(("smol-a", "smol-b"), key=lambda r: load[r])
        load[goes] += 1
        expected.append(goes)
        threads.append(_held_chat(gw, key, messages, results, hold="bound"))
        wait_until(
            lambda: {r["id"]: r["in_flight"] for r in gw.client().list()["replicas"]} == load,
            what=f"request {k} in flight on {goes} (loads {load})",
        )
    for engine in (a, b):
        engine.release("bound")
    for t in threads:
        t.join()
    assert all(status == 200 for status, _ in results), results
    if affinity:
        assert expected[:4] == [home] * 4 and other in expected  # sticky, then spilled
        assert load[home] <= ratio * (sum(load.values()) / 2 + 1) + 1
    else:
        assert load == {"smol-a": 5, "smol-b": 4} or load == {"smol-a": 4, "smol-b": 5}


def fallback_counts(gw) -> dict[tuple[str, str, str], float]:
    """cortex_gateway_fallbacks_total by (model, fallback, reason), from a real scrape."""
    found = re.findall(
        r'^cortex_gateway_fallbacks_total\{model="([^"]*)",fallback="([^"]*)",reason="([^"]*)"\} (\S+)$',
        httpx.get(gw.url + "/metrics").text,
        re.M,
    )
    return {(m, f, r): float(v) for m, f, r, v in found}


def test_fallbacks_serve_while_the_primary_is_down_or_retired(gateway, engines):
    gw, a, b = gateway(), engines(), engines()
    with gw.client() as client:
        ra = client.register("alpha", a.base_url, engine_api_key="engine-secret", fallbacks=["beta"])
        client.register("beta", b.base_url, engine_api_key="engine-secret")
        assert client.list()["fallbacks"] == {"alpha": ["beta"]}
    key = new_key(gw)

    def ask(model="alpha", k=key):
        return chat(gw, k, model)

    def models():
        return sorted(
            m["id"] for m in httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        )

    r = ask()
    assert r.status_code == 200 and r.headers["x-cortex-model"] == "alpha" and r.json()["model"] == "alpha"
    # The primary's replica is down: the fallback serves, asked for by its own name.
    a.healthy = False
    wait_until(lambda: models() == ["beta"], what="alpha to leave /v1/models")
    r = ask()
    assert r.status_code == 200, r.text
    assert r.headers["x-cortex-model"] == "beta" and r.json()["model"] == "beta"
    assert r.headers["x-cortex-replica"].startswith("beta-")
    assert json.loads(httpx.get(b.base_url + "/_last").json()["body"])["model"] == "beta"
    assert fallback_counts(gw) == {("alpha", "beta", "no_healthy_replica"): 1}
    a.healthy = True
    wait_until(lambda: ask().headers.get("x-cortex-model") == "alpha", what="alpha to serve again")
    assert models() == ["alpha", "beta"]
    # Retired (its last replica removed): the name still answers, through its fallback, and is not listed.
    with gw.client() as client:
        client.deregister(ra["id"])
    before = fallback_counts(gw)[("alpha", "beta", "no_healthy_replica")]  # the wait above asked too
    r = ask()
    assert r.status_code == 200 and r.headers["x-cortex-model"] == "beta"
    assert models() == ["beta"]
    assert fallback_counts(gw) == {("alpha", "beta", "no_healthy_replica"): before + 1}
    # Back: it serves again.
    with gw.client() as client:
        client.register("alpha", a.base_url, engine_api_key="engine-secret")
    r = ask()
    assert r.status_code == 200 and r.headers["x-cortex-model"] == "alpha"
    # A key that may not use the fallback is not widened by it.
    only_alpha = new_key(gw, models=["alpha"])
    a.healthy = False
    wait_until(lambda: models() == ["beta"], what="alpha to leave /v1/models again")
    r = ask(k=only_alpha)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"
    assert "fallbacks beta" in r.json()["error"]["message"]
    # Every fallback down too: 503 naming them.
    b.healthy = False
    wait_until(lambda: models() == [], what="beta to leave /v1/models")
    r = ask()
    assert r.status_code == 503 and "nor on its fallbacks beta" in r.json()["error"]["message"]


def test_fallback_when_the_primary_fails_before_answering_and_per_alias_lists(gateway, engines):
    # Health checks far apart, so it is the failed request that finds the primary dead.
    gw, live, dead = gateway(CORTEX_GATEWAY_HEALTH_INTERVAL="60"), engines(), engines()
    dead.kill()
    with gw.client() as client:
        client.register("alpha", dead.base_url, engine_api_key="engine-secret", aliases=["a1"])
        client.register("beta", live.base_url, engine_api_key="engine-secret")
        client.register("smol", live.base_url, engine_api_key="engine-secret")
        client.set_fallbacks("alpha", ["nonexistent", "beta"])
        client.set_fallbacks("a1", ["smol"])
        with pytest.raises(GatewayError, match="itself"):
            client.set_fallbacks("beta", ["beta"])
    key = new_key(gw)
    r = chat(gw, key, "alpha")
    assert r.status_code == 200, r.text
    assert r.headers["x-cortex-model"] == "beta" and r.json()["model"] == "beta"
    r = chat(gw, key, "a1")  # an alias's own list comes before its model's
    assert r.status_code == 200 and r.headers["x-cortex-model"] == "smol"
    # Counted under the model's served name (an alias is no label of its own: series stay few).
    # The first request found the primary dead; by the second it was out of the routing.
    assert fallback_counts(gw) == {
        ("alpha", "beta", "failed_before_first_byte"): 1,
        ("alpha", "smol", "no_healthy_replica"): 1,
    }
    with gw.client() as client:
        client.set_fallbacks("alpha", [])
        assert client.list()["fallbacks"] == {"a1": ["smol"]}
    assert chat(gw, key, "alpha").status_code == 503
