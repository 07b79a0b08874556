"""Gateway reliability: 1,000 streams held open at once, a schema fuzz that must find no 500,
and every admin route refusing callers without the admin token."""

from __future__ import annotations

import asyncio
import json
import resource
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from cortex.gateway import openapi
from cortex.gateway.admin import ADMIN_ROUTES
from cortex.testing.fake_engine import FakeEngine
from cortex.testing.gateway import Gateways, GatewayProcess


# 1,000 streams need about 2,000 descriptors here and in the gateway (which inherits this).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft != resource.RLIM_INFINITY and _soft < 8192:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, _hard) if _hard != resource.RLIM_INFINITY else 8192, _hard))


@pytest.fixture
def gateway(tmp_path):
    # A generous health timeout: a slow /health on a busy machine must not take the only replica out.
    gateways = Gateways(tmp_path, {"CORTEX_GATEWAY_HEALTH_TIMEOUT": "30"})
    yield gateways
    gateways.stop_all()


@pytest.fixture
def gw(gateway):
    return gateway()


# --- 1,000 concurrent streams --------------------------------------------------------------------

STREAMS = 1000
CHUNKS = 20
HOLD = "thousand"  # the engine holds every stream before its first event until the test releases them


async def _one_stream(port: int, key: str, results: list) -> None:
    body = json.dumps(
        {"model": "smol", "stream": True, "fake_chunks": CHUNKS, "fake_delay": 0.4, "fake_hold": HOLD}
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (key.encode(), len(body), body)
    )
    data = b""
    while b"data: [DONE]" not in data:
        chunk = await reader.read(65536)
        if not chunk:
            break
        data += chunk
    writer.close()
    results.append(data.startswith(b"HTTP/1.1 200") and data.count(b"data: ") == CHUNKS + 1)


async def _hold_streams(gw: GatewayProcess, engine: FakeEngine, key: str, token: str) -> dict:
    results: list[bool] = []
    peak = {"in_flight": 0, "rss": 0}
    tasks = [asyncio.create_task(_one_stream(gw.port, key, results)) for _ in range(STREAMS)]
    # Released once all are in flight at the gateway (or, if some never get there, after a
    # deadline, so the test fails on its assertions instead of hanging).
    release_by = time.monotonic() + 300
    released = False
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as admin:
        while not all(t.done() for t in tasks):
            listing = (await admin.get(gw.url + "/admin/replicas", timeout=60)).json()
            peak["in_flight"] = max(peak["in_flight"], listing["replicas"][0]["in_flight"])
            peak["rss"] = max(peak["rss"], gw.rss_bytes())
            if not released and (peak["in_flight"] >= STREAMS or time.monotonic() > release_by):
                engine.release(HOLD)
                released = True
            await asyncio.sleep(0.25)
    await asyncio.gather(*tasks)
    peak["ok"] = sum(results)
    return peak


def test_thousand_concurrent_streams_with_bounded_memory(gateway, engine):
    # No health check while the machine is busy with 1,000 streams: a slow /health must not take
    # the only replica out. The test is about streams, not health.
    # All 1,000 come from one address, above the default cap of connections per client.
    gw = gateway(CORTEX_GATEWAY_HEALTH_INTERVAL="3600", CORTEX_GATEWAY_MAX_CONNECTIONS_PER_CLIENT="2000")
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
        key = c.create_key()["key"]
    # Warm up: imports, first connections, metrics series.
    for _ in range(20):
        assert (
            httpx.post(
                gw.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "smol", "stream": True, "fake_chunks": 2},
            ).status_code
            == 200
        )
    baseline = gw.rss_bytes()
    t0 = time.monotonic()
    peak = asyncio.run(_hold_streams(gw, engine, key, gw.admin_token()))
    elapsed = time.monotonic() - t0
    growth = peak["rss"] - baseline
    print(
        f"\n{STREAMS} streams x {CHUNKS} events in {elapsed:.1f} s: {peak['ok']} complete, "
        f"peak in flight {peak['in_flight']}, gateway RSS {baseline / 2**20:.1f} MiB idle -> "
        f"{peak['rss'] / 2**20:.1f} MiB peak (+{growth / 2**20:.1f} MiB, "
        f"{growth / STREAMS / 1024:.1f} KiB per stream)"
    )
    assert peak["ok"] == STREAMS
    assert peak["in_flight"] == STREAMS, "the streams were not held open at the same time"
    assert growth < 150 * 2**20, f"gateway memory grew by {growth / 2**20:.0f} MiB for {STREAMS} streams"
    with gw.client() as c:
        assert c.list()["replicas"][0]["in_flight"] == 0
    assert 'kind="' not in "\n".join(
        line for line in httpx.get(gw.url + "/metrics").text.splitlines() if line.startswith("cortex_gateway_errors")
    )


# --- schema fuzz ---------------------------------------------------------------------------------


def test_fuzzed_requests_never_get_a_500(gw, engine):
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret", aliases=["tiny"])
        key = c.create_key()["key"]
    token = gw.admin_token()
    schema = schemathesis.openapi.from_url(gw.url + "/openapi.json")
    seen: dict[str, int] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        secret = token if operation.path.startswith("/admin") else key

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
        )
        def check(case) -> None:
            response = case.call(base_url=gw.url, headers={"Authorization": f"Bearer {secret}"}, timeout=15)
            seen[f"{case.method} {case.path} {response.status_code}"] = 1
            assert response.status_code != 500, (case.method, case.formatted_path, case.body, response.text)
            if response.status_code >= 400:
                assert "error" in response.json(), response.text

        check()
    assert operations == sum(len(ops) for ops in openapi.schema()["paths"].values())
    assert not any(k.endswith(" 500") for k in seen)
    # Malformed input the schema does not describe.
    for raw in (b"", b"[]", b"null", b'{"model": 5}', b'{"model": "smol", "stream": "yes"}', b"\xff\xfe", b"{" * 5000):
        r = httpx.post(gw.url + "/v1/chat/completions", content=raw, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code != 500 and r.status_code < 503, (raw[:20], r.status_code, r.text)
    assert "Exception in the gateway" not in gw.log()


# --- admin routes ----------------------------------------------------------------------------------


def _concrete(path: str) -> str:
    return path.replace("{id}", "some-id")


def test_every_admin_route_requires_the_admin_token(gw, engine):
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
        client_key = c.create_key()["key"]
    documented = {(m.upper(), p) for p, ops in openapi.schema()["paths"].items() if p.startswith("/admin") for m in ops}
    routed = {(r.method, r.path) for r in ADMIN_ROUTES}
    assert documented == routed, "an admin route is missing from ADMIN_ROUTES or from the OpenAPI schema"
    assert len(routed) >= 7
    wrong = [None, "Bearer wrong-token", f"Bearer {client_key}", "Basic YWRtaW46YWRtaW4=", "Bearer"]
    for method, path in sorted(routed) + [("GET", "/admin"), ("GET", "/admin/unknown"), ("PUT", "/admin/replicas")]:
        for auth in wrong:
            headers = {"Authorization": auth} if auth else {}
            r = httpx.request(
                method, gw.url + _concrete(path), headers=headers, json={"model": "x", "url": "http://h:1"}
            )
            assert r.status_code == 401, (method, path, auth, r.status_code)
            assert r.json()["error"]["code"] == "invalid_admin_token"
    # And with the token each route answers something other than 401.
    token = gw.admin_token()
    valid = {
        "/admin/replicas": {"model": "x", "url": "http://127.0.0.1:1"},
        "/admin/keys": {"name": "k"},
        "/admin/fallbacks": {"name": "x", "fallbacks": []},
    }
    for method, path in sorted(routed):
        r = httpx.request(
            method,
            gw.url + _concrete(path),
            headers={"Authorization": f"Bearer {token}"},
            json=valid.get(path) if method in ("POST", "PUT") else None,
        )
        assert r.status_code in (200, 201, 404), (method, path, r.status_code, r.text)
