"""`cortex gateway --workers N`: several processes on one port, balancing on the in-flight
count of all of them (cortex/gateway/inflight.py). A real gateway process with two workers in
front of two fake engines that hold streams open until the test releases them.

Which worker accepts a connection is the kernel's choice, so the test does not rely on it: it
opens connections until it has one on the worker it wants (each worker says which it is in
/health), then sends the request on that connection."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from collections import Counter

import pytest

from cortex.testing.fake_engine import FakeEngine
from cortex.testing.gateway import GatewayProcess
from test_gateway import FAST, wait_until

# A hang guard, not a bet: the kernel hands new connections to both idle workers.
MAX_CONNECTS = 2000


@pytest.fixture
def two_workers(tmp_path):
    # Affinity off: one prompt for all, so least in flight alone decides (its load bound reads
    # the same shared counts).
    gw = GatewayProcess(
        tmp_path / "home", env={**FAST, "CORTEX_GATEWAY_WORKERS": "2", "CORTEX_GATEWAY_AFFINITY": "false"}
    ).start()
    engines = [FakeEngine(api_key="engine-secret", models=("smol",)).start() for _ in range(2)]
    yield gw, engines
    gw.stop()
    for engine in engines:
        engine.stop()


def connection_on(gw: GatewayProcess, worker: int) -> http.client.HTTPConnection:
    """A keep-alive connection that the given worker accepted."""
    seen: Counter[int] = Counter()
    for _ in range(MAX_CONNECTS):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
        conn.request("GET", "/health")
        answer = json.loads(conn.getresponse().read())
        if answer["worker"] == worker:
            return conn
        seen[answer["worker"]] += 1
        conn.close()
    raise AssertionError(f"no connection reached worker {worker} in {MAX_CONNECTS} tries (reached: {dict(seen)})")


def replicas_seen_by(conn: http.client.HTTPConnection, token: str) -> dict[str, dict]:
    conn.request("GET", "/admin/replicas", headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 200, body
    return {r["id"]: r for r in body["replicas"]}


def held_stream(conn: http.client.HTTPConnection, key: str, results: dict, n: int) -> threading.Thread:
    def run() -> None:
        body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps({**body, "fake_chunks": 2, "fake_hold": "held"}),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        response.read()
        results[n] = (response.status, response.getheader("x-cortex-replica"))
        conn.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_two_workers_balance_on_the_in_flight_count_of_both(two_workers) -> None:
    gw, (a, b) = two_workers
    token = gw.admin_token()
    with gw.client() as client:
        client.register("smol", a.base_url, engine_api_key="engine-secret", replica_id="smol-a")
        client.register("smol", b.base_url, engine_api_key="engine-secret", replica_id="smol-b")
        key = client.create_key(name="workers")["key"]
    watch = [connection_on(gw, 0), connection_on(gw, 1)]  # each worker's own view, over its own connection
    for conn in watch:  # the registration reached one worker; the other picks it up and checks health
        wait_until(
            lambda conn=conn: (
                all(r["healthy"] for r in replicas_seen_by(conn, token).values())
                and len(replicas_seen_by(conn, token)) == 2
            ),
            what="both replicas healthy in both workers",
        )

    # Streams held open, sent in turn through worker 0 and worker 1, each only once the one before
    # counts as in flight. Least in flight over both workers' requests alternates a, b, a, b, ...
    # (a tie goes to the first registered). Counting only its own requests, each worker would
    # send its first two to smol-a: a, a, b, b, a, a.
    results: dict[int, tuple] = {}
    threads = []
    for n in range(6):
        threads.append(held_stream(connection_on(gw, n % 2), key, results, n))
        for conn in watch:
            wait_until(
                lambda conn=conn, n=n: sum(r["in_flight"] for r in replicas_seen_by(conn, token).values()) == n + 1,
                what=f"{n + 1} streams in flight, as each worker counts them",
            )
    loads = [{r: v["in_flight"] for r, v in replicas_seen_by(conn, token).items()} for conn in watch]
    assert loads == [{"smol-a": 3, "smol-b": 3}] * 2  # both workers see all six, three on each replica
    for engine in (a, b):
        engine.release("held")
    for thread in threads:
        thread.join(60)
    assert [results[n] for n in range(6)] == [(200, "smol-a"), (200, "smol-b")] * 3, results
    for conn in watch:
        wait_until(
            lambda conn=conn: all(r["in_flight"] == 0 for r in replicas_seen_by(conn, token).values()),
            what="nothing in flight once the streams ended",
        )
        conn.close()


def test_the_board_shares_counts_across_processes_and_forgets_a_dead_worker() -> None:
    """The shared counts themselves, across a real fork: a worker's cells are summed by the
    others, zeroed when it dies, and a slot nobody holds is reused."""
    import multiprocessing

    from cortex.gateway.inflight import FREED, BoardFull, InFlightBoard

    board = InFlightBoard(workers=2, slots=1)
    ready, done = multiprocessing.get_context("fork").Event(), multiprocessing.get_context("fork").Event()

    def worker_zero() -> None:
        board.attach(0)
        count = board.count("smol-a")
        count.add(2)
        ready.set()
        done.wait(60)  # dies holding the slot and two requests, as a crashed worker would

    child = multiprocessing.get_context("fork").Process(target=worker_zero)
    child.start()
    assert ready.wait(60)
    board.attach(1)
    mine = board.count("smol-a")
    mine.add(1)
    again = board.count("smol-a")  # a second hold in this worker (a replica object replaced in a reload)
    assert mine.total() == 3 and again.total() == 3 and again.slot == mine.slot
    with pytest.raises(BoardFull):  # the one slot is held
        board.count("smol-b")
    done.set()
    child.join(60)
    board.forget_worker(0)  # what the supervisor does before it replaces worker 0
    assert mine.total() == 1
    mine.add(-1)
    slot = mine.slot
    mine.release()
    assert board.cells[slot * board.stride] != FREED  # still held by `again`
    again.release()
    assert board.cells[slot * board.stride] == FREED
    reused = board.count("smol-b")
    assert reused.slot == slot and reused.total() == 0


# --- /metrics across workers ---------------------------------------------------------------------


def chat_on(conn: http.client.HTTPConnection, key: str) -> str:
    """One non-streamed request on a connection pinned to a worker; the replica that served it."""
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    return response.getheader("x-cortex-replica")


def scrape(conn: http.client.HTTPConnection) -> dict[str, float]:
    """/metrics on a pinned connection, as {series with labels: value}."""
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    assert response.status == 200
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def gateway_children(gw: GatewayProcess) -> set[int]:
    pid = gw.proc.pid
    return {int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()}


def test_metrics_sum_every_worker_and_keep_a_dead_workers_counts(tmp_path) -> None:
    """Requests pinned to each of two workers' connections; a scrape through either worker shows
    the sum, per-key series keep the gateway-wide bound (here 1 key + other), and when a worker
    is killed the counters it published stay in the sum, through its replacement."""
    gw = GatewayProcess(
        tmp_path / "home",
        env={**FAST, "CORTEX_GATEWAY_WORKERS": "2", "CORTEX_GATEWAY_METRICS_MAX_KEYS": "1"},
    ).start()
    engine = FakeEngine(api_key="engine-secret", models=("smol",)).start()
    try:
        token = gw.admin_token()
        with gw.client() as client:
            client.register("smol", engine.base_url, engine_api_key="engine-secret", replica_id="smol-a")
            first, second = (client.create_key(name=n) for n in ("first", "second"))
        pinned = [connection_on(gw, 0), connection_on(gw, 1)]
        for conn in pinned:
            wait_until(
                lambda conn=conn: [r["healthy"] for r in replicas_seen_by(conn, token).values()] == [True],
                what="the replica healthy in both workers",
            )
        # 3 requests on worker 0 with the first key, 5 on worker 1 with the second.
        for _ in range(3):
            chat_on(pinned[0], first["key"])
        for _ in range(5):
            chat_on(pinned[1], second["key"])
        requests = 'cortex_gateway_requests_total{model="smol",replica="smol-a",status="200"}'
        latency = 'cortex_gateway_request_duration_seconds_count{model="smol",replica="smol-a"}'
        for conn in pinned:  # the other worker's share arrives with its next publish (0.5 s)
            wait_until(lambda conn=conn: scrape(conn).get(requests) == 8, what="8 requests in one scrape")
        seen = scrape(pinned[0])
        assert seen[latency] == 8
        # One key has its own series, the same one in both workers; the other is counted under "other".
        per_key = {k: v for k, v in seen.items() if k.startswith("cortex_gateway_key_requests_total")}
        assert sorted(per_key.values()) == [3, 5] and len(per_key) == 2, per_key
        assert 'cortex_gateway_key_requests_total{key="other"}' in per_key
        own = {f'cortex_gateway_key_requests_total{{key="{k["id"]}"}}' for k in (first, second)} & set(per_key)
        assert len(own) == 1
        assert {
            k: v for k, v in scrape(pinned[1]).items() if k.startswith("cortex_gateway_key_requests_total")
        } == per_key  # the same key has its own series in both workers

        # Kill one worker outright (no goodbye); the supervisor starts another on its index.
        before = gateway_children(gw)
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        for conn in pinned:
            conn.close()
        wait_until(
            lambda: len(gateway_children(gw)) == 2 and victim not in gateway_children(gw),
            what="the supervisor to replace the killed worker",
        )
        pinned = [connection_on(gw, 0), connection_on(gw, 1)]
        for conn in pinned:  # the new worker routes once its own health check passed
            wait_until(
                lambda conn=conn: [r["healthy"] for r in replicas_seen_by(conn, token).values()] == [True],
                what="the replica healthy in both workers",
            )
        for conn in pinned:  # the sum, through the new worker and the old one alike
            after = scrape(conn)
            assert after[requests] == 8 and after[latency] == 8
            assert {k: v for k, v in after.items() if k.startswith("cortex_gateway_key_requests_total")} == per_key
        chat_on(pinned[0], first["key"])
        chat_on(pinned[1], first["key"])
        for conn in pinned:  # and it keeps counting on top
            wait_until(lambda conn=conn: scrape(conn).get(requests) == 10, what="10 requests in one scrape")
        for conn in pinned:
            conn.close()
    finally:
        gw.stop()
        engine.stop()


def test_a_worker_killed_while_it_holds_the_boards_lock_does_not_block_the_others() -> None:
    """The board's lock is a record lock the kernel drops with its holder (inflight.ProcessLock):
    a real forked worker takes it and is SIGKILLed; the next claim in another process goes on."""
    import multiprocessing

    from cortex.gateway.inflight import InFlightBoard

    board = InFlightBoard(workers=2, slots=4)
    context = multiprocessing.get_context("fork")
    holding = context.Event()

    def worker_zero() -> None:
        board.attach(0)
        with board._lock:
            holding.set()
            threading.Event().wait(120)  # killed here, the lock held

    child = context.Process(target=worker_zero)
    child.start()
    assert holding.wait(60)
    board.attach(1)
    claimed: list = []
    blocked = threading.Thread(target=lambda: claimed.append(board.count("smol-a")), daemon=True)
    blocked.start()
    blocked.join(0.5)
    assert not claimed  # the lock is really held while the worker lives
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    blocked.join(60)  # a hang guard: the kernel released the lock with the process
    assert claimed and claimed[0].total() == 0
    board.forget_worker(0)  # what the supervisor does next takes the lock too
    assert board.metrics.labels.claim("key-1", 10)  # and so does the shared key-label table
