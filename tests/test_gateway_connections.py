"""Client-connection limits of the gateway (issue 15): request heads bounded in size and time,
stalled bodies, connections per client address, and an endless header that must not stall
keyed traffic or take a replica out. A real gateway process and real sockets each time.

Deadlines in these tests are short settings of the gateway; the waits around them are generous
hang guards, never assertions on speed."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from cortex.gateway.app import Gateway
from cortex.gateway.looplag import LoopLag
from cortex.gateway.routing import Replica
from cortex.settings import Settings
from cortex.testing.gateway import Gateways, GatewayProcess

GUARD = 60.0  # seconds: a hang guard, not an expectation


@pytest.fixture
def gateway(tmp_path):
    gateways = Gateways(tmp_path, {"CORTEX_GATEWAY_HEALTH_TIMEOUT": "30"}, own_homes=True)
    yield gateways
    gateways.stop_all()


def connect(gw: GatewayProcess, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=GUARD, source_address=(source, 0))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (a reset counts as closed)."""
    data = b""
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the gateway kept the connection open for {GUARD} s; got {data[:200]!r}")


def status_and_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def health_over(sock: socket.socket) -> int:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the gateway closed a connection it should serve"
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_a_head_over_the_limit_gets_431_and_the_connection_is_closed(gateway, engine):
    gw = gateway(CORTEX_GATEWAY_MAX_HEADER_BYTES="8192")
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
        key = c.create_key()["key"]
    # Just under the limit: served.
    with connect(gw) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"a" * 7000 + b"\r\n\r\n")
        assert int(sock.recv(65536).split(b" ", 2)[1]) == 200
    # Over it, in one header or in many: 431 in OpenAI's shape, then the gateway closes.
    for head in (b"X-Pad: " + b"a" * 40_000 + b"\r\n", b"".join(b"X-H%d: v\r\n" % i for i in range(3000))):
        with connect(gw) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + head + b"\r\n")
            status, error = status_and_error(read_until_closed(sock))
        assert status == 431 and error["code"] == "request_header_too_large", error
    # A small head whose body arrives in the same packet as the head is not mistaken for a big head.
    body = json.dumps({"model": "smol", "messages": [], "pad": "x" * 60_000}).encode()
    with connect(gw) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (key.encode(), len(body), body)
        )
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    # The limit holds for the next head on a kept-alive connection too, also after a request
    # the gateway answered (401) before its body was in.
    with connect(gw) as sock:
        sock.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 20\r\n\r\n{"mod')
        first = b""
        while b"invalid_api_key" not in first:
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        sock.sendall(b'el": "smol"}   ' + b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n")
        status, error = status_and_error(read_until_closed(sock))
    assert first.startswith(b"HTTP/1.1 401") and status == 431, (first[:100], error)
    assert b"request_header_too_large" in httpx.get(gw.url + "/metrics").content


def test_slow_and_silent_heads_are_closed_after_the_header_timeout(gateway):
    gw = gateway(CORTEX_GATEWAY_HEADER_TIMEOUT="1")
    silent = connect(gw)
    slow = connect(gw)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n")
    stop = threading.Event()

    def trickle() -> None:  # a byte every 0.2 s: always sending, never finishing
        while not stop.wait(0.2):
            try:
                slow.sendall(b"X")
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        for sock in (slow, silent):
            status, error = status_and_error(read_until_closed(sock))
            assert status == 408 and error["code"] == "header_timeout", error
    finally:
        stop.set()
        slow.close()
        silent.close()
    # A prompt client on a kept-alive connection is not affected by the deadline of its first head.
    with connect(gw) as sock:
        for _ in range(3):
            assert health_over(sock) == 200


def test_a_stalled_body_is_closed_after_the_body_timeout(gateway, engine):
    gw = gateway(CORTEX_GATEWAY_BODY_TIMEOUT="1")
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
        key = c.create_key()["key"]
    with connect(gw) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
            b'Content-Length: 100\r\n\r\n{"model": ' % key.encode()
        )
        status, error = status_and_error(read_until_closed(sock))
    assert status == 408 and error["code"] == "body_timeout", error
    assert 'reason="body_timeout"' in httpx.get(gw.url + "/metrics").text


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {GUARD} s waiting for {what}"
        time.sleep(0.1)


def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(gateway, engine):
    gw = gateway(CORTEX_GATEWAY_SEND_TIMEOUT="1")
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
        key = c.create_key()["key"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    try:
        # About 30 MB of events, far more than the socket buffers between the two hold.
        body = json.dumps({"model": "smol", "stream": True, "fake_chunks": 200_000}).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (key.encode(), len(body), body)
        )
        wait_for(lambda: 'reason="send_timeout"' in httpx.get(gw.url + "/metrics").text, "the send timeout")
        # The engine's stream is cancelled with the connection: the replica has nothing in flight.
        with gw.client() as c:
            wait_for(lambda: c.list()["replicas"][0]["in_flight"] == 0, "the request to end")
    finally:
        sock.close()


def test_connections_per_client_address_are_capped(gateway):
    gw = gateway(CORTEX_GATEWAY_MAX_CONNECTIONS_PER_CLIENT="3", CORTEX_GATEWAY_HEADER_TIMEOUT="600")
    held = [connect(gw) for _ in range(3)]
    try:
        for sock in held:
            assert health_over(sock) == 200
        extra = connect(gw)
        status, error = status_and_error(read_until_closed(extra))
        extra.close()
        assert status == 429 and error["code"] == "too_many_connections", error
        # Another address is not affected (127.0.0.2 is loopback too).
        with connect(gw, source="127.0.0.2") as other:
            assert health_over(other) == 200
        # The held connections still work, and closing one makes room for a new one.
        assert health_over(held[0]) == 200
        held.pop().close()
        deadline = time.monotonic() + GUARD
        while True:
            sock = connect(gw)
            try:
                if health_over(sock) == 200:
                    held.append(sock)
                    break
            except (AssertionError, ConnectionResetError):
                sock.close()  # the gateway had not yet seen the close; try again
            assert time.monotonic() < deadline, "no room was made after a connection closed"
            time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()


def test_an_endless_header_neither_stalls_keyed_requests_nor_takes_a_replica_out(gateway, engine):
    """The finding of issue 15: one client streaming an endless header in 1 MiB chunks starved
    the event loop (seconds per keyed request, then a replica taken out) and was never closed."""
    gw = gateway(CORTEX_GATEWAY_HEALTH_INTERVAL="0.3")
    with gw.client() as c:
        c.register("smol", engine.base_url, engine_api_key="engine-secret")
        key = c.create_key()["key"]
    stop = threading.Event()
    seen = {"connections": 0, "closed": 0, "sent": 0}

    def attack() -> None:
        chunk = b"a" * (1024 * 1024)
        while not stop.is_set():
            sock = socket.create_connection(("127.0.0.1", gw.port))
            sock.settimeout(1.0)
            seen["connections"] += 1
            try:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Pad: ")
                while not stop.is_set():
                    try:
                        sock.sendall(chunk)
                        seen["sent"] += len(chunk)
                    except socket.timeout:
                        continue
                else:
                    sock.close()
                    return
            except OSError:  # the gateway closed it
                seen["closed"] += 1
            sock.close()

    attacker = threading.Thread(target=attack, daemon=True)
    rss_before = gw.rss_bytes()
    attacker.start()
    statuses = []
    healthy_throughout = True
    try:
        with httpx.Client(timeout=GUARD) as client, gw.client() as admin:
            deadline = time.monotonic() + 4 * GUARD
            # Enough requests to overlap many attacking connections, each one checked.
            while len(statuses) < 30 or seen["closed"] < 5:
                assert time.monotonic() < deadline, f"attack never got going: {seen}"
                r = client.post(
                    gw.url + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"model": "smol", "messages": [{"role": "user", "content": "hi"}]},
                )
                statuses.append(r.status_code)
                healthy_throughout &= all(rep["healthy"] for rep in admin.list()["replicas"])
            rss_during = gw.rss_bytes()
    finally:
        stop.set()
        attacker.join(GUARD)
    assert set(statuses) == {200}, statuses
    assert healthy_throughout, "a replica was marked unhealthy while the attack ran"
    assert seen["closed"] >= 5 and seen["sent"] >= 5 * 2**20, seen
    # The attacker sent far more than any head may hold; the gateway held on to none of it.
    assert rss_during - rss_before < 64 * 2**20, (rss_before, rss_during, seen)
    assert "taken out" not in gw.log()


# --- health checks and the gateway's own event loop ------------------------------------------------


def test_loop_lag_sees_a_blocked_loop() -> None:
    async def run() -> tuple[float, float]:
        lag = LoopLag()
        lag.start()
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.3)
        quiet = lag.worst_since(loop.time() - 0.25)
        since = loop.time()
        time.sleep(0.6)  # holds the loop, as a callback that copies a huge buffer would
        await asyncio.sleep(0.25)
        blocked = lag.worst_since(since)
        lag.stop()
        return quiet, blocked

    quiet, blocked = asyncio.run(run())
    assert blocked >= 0.4  # the 0.6 s block less at most one tick interval
    assert quiet < blocked


def test_a_health_timeout_counts_only_when_the_gateway_itself_was_not_held_up(tmp_path) -> None:
    """A replica that accepts and never answers times out. That takes it out when the gateway's
    loop ran freely, and does not when the loop was blocked past the timeout (the answer could
    have been sitting unread). The blocked half is a real 4 s block; the free half declares no lag."""
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    settings = Settings.load(env={}, home=str(tmp_path), gateway_health_timeout=2.0, gateway_access_log=False)
    gw = Gateway(settings)
    gw.registry.register("smol", f"http://127.0.0.1:{port}")
    gw.reload()
    replica: Replica = next(iter(gw.table.replicas.values()))

    async def run() -> tuple[bool, bool]:
        await gw.startup()
        try:
            await asyncio.sleep(0.3)  # the loop-lag ticker has ticked
            replica.healthy = True
            blocked_check = asyncio.create_task(gw.check_health(replica))
            await asyncio.sleep(0.05)
            time.sleep(4.0)  # the loop is held past the 2 s timeout
            await blocked_check
            after_block = replica.healthy
            await asyncio.sleep(0.3)
            # The loop runs freely: the timeout counts. This half declares no lag rather than
            # measuring it, so a busy test machine's own scheduling delays cannot excuse the timeout.
            gw.lag.worst_since = lambda since: 0.0  # type: ignore[method-assign]
            await gw.check_health(replica)
            return after_block, replica.healthy
        finally:
            await gw.shutdown()

    try:
        after_block, after_free = asyncio.run(run())
    finally:
        silent.close()
    assert after_block is True
    assert after_free is False
    assert any(kind == "timeout_while_busy" for (_, _, kind) in gw.metrics.errors)
