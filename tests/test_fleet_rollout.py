"""Rolling updates across the fleet, and losing a host, on three hosts in network namespaces
(tests/fleet_helpers.py: a real Prefect server, the gateway, `cortex host join` with a real
Prefect worker on each host, llama-server on CPU serving SmolLM2) with `cortex serve` running
the control plane's deployments (fleet-reconcile with its queue-status trigger).

What this proves:
  - editing a `replicas: 2` spec and applying it again swaps the replicas one host at a time,
    each make-before-break, while 10 clients send requests through the gateway the whole time:
    no request fails, the gateway always routes to at least two replicas, the result says
    which version each replica runs;
  - a host killed under load (every process in its namespace, then its link down): the gateway
    stops routing there; its queue goes not-ready, Prefect's event starts fleet-reconcile, and
    the replica is placed again on the spare host; the only failed requests are those in flight
    at the kill; when the host comes back its stale replica is retired.
The figures (the rollout's overhead over its deploys, the failed requests, the time until two
replicas serve again) are printed: they are measurements, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import httpx
import pytest

from cortex.applied import spec_sha256
from fleet_helpers import REPO, Fleet, RouteWatch, healthy, routes, running_fleet, wait_for, write_spec

pytestmark = pytest.mark.parts

MODEL = "smollm2"
CLIENTS = 10
# Prefect marks a worker offline after 3 missed heartbeats, and a work queue not-ready when no
# worker polled it for the timeout: shorter than the defaults (30 s heartbeats, 60 s), so the
# test does not wait minutes, and long enough that a busy CPU does not make healthy hosts flap.
SERVER_ENV = {
    "PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_FOREMAN_WORK_QUEUE_LAST_POLLED_TIMEOUT_SECONDS": "20",
    "PREFECT_SERVER_SERVICES_FOREMAN_DEPLOYMENT_LAST_POLLED_TIMEOUT_SECONDS": "20",
}
HOST_ENV = {"PREFECT_WORKER_HEARTBEAT_SECONDS": "5", "PREFECT_WORKER_QUERY_SECONDS": "2"}


@dataclass
class Sent:
    start: float
    end: float
    status: int | None  # None: no answer (the connection failed)
    replica: str | None  # x-cortex-replica
    error: str | None


class Load:
    """CLIENTS threads sending short chat requests through the gateway until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    r = client.post("/v1/chat/completions", json=body)
                    sent = Sent(
                        start,
                        time.monotonic(),
                        r.status_code,
                        r.headers.get("x-cortex-replica"),
                        None if r.status_code == 200 else r.text[:300],
                    )
                except httpx.HTTPError as e:
                    sent = Sent(start, time.monotonic(), None, None, repr(e))
                with self._lock:
                    self.sent.append(sent)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)

    def answered_by(self, replicas: set[str]) -> bool:
        with self._lock:
            return any(s.status == 200 and s.replica in replicas for s in self.sent)

    @property
    def failed(self) -> list[Sent]:
        return [s for s in self.sent if s.status != 200]


@dataclass
class ControlPlane:
    fleet: Fleet
    serve: subprocess.Popen


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory, toolchain, test_model) -> Iterator[ControlPlane]:
    root = tmp_path_factory.mktemp("rollfleet")
    with running_fleet(root, server_env=SERVER_ENV, host_env=HOST_ENV) as fleet:
        specs = root / "served-specs"  # cortex serve's own folder: empty, the fleet specs are applied by hand
        specs.mkdir()
        log = root / "serve.log"
        serve = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--specs", str(specs)],
            env=fleet.env | {"CORTEX_FLEET_RECONCILE_S": "3600"},  # the schedule: not in this test's time
            cwd=REPO,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for("cortex serve registered fleet-reconcile", lambda: _deployment_exists(fleet), 180, log)
            yield ControlPlane(fleet, serve)
        finally:
            os.killpg(serve.pid, 15)
            serve.wait(timeout=60)


def _deployment_exists(fleet: Fleet) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: fleet.env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name("fleet-reconcile/fleet-reconcile")
            except ObjectNotFound:
                return False
    return True


def _flow_runs(fleet: Fleet, flow_name: str, since: datetime) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStartTime
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: fleet.env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
            )


def _host_of(replica: str) -> str:
    return replica.rsplit("-", 1)[1]


def test_editing_a_spec_rolls_both_replicas_under_load_with_no_failed_request(
    control: ControlPlane, test_model
) -> None:
    fleet = control.fleet
    spec = write_spec(fleet, MODEL, test_model.gguf, "replicas: 2\n")
    done = fleet.cortex("deploy", str(spec), "--fleet", "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    first = json.loads(done.stdout)
    assert [s["action"] for s in first["steps"]] == ["add", "add"]
    old = routes(fleet, MODEL)
    hosts = sorted(_host_of(r) for r in old)
    assert len(hosts) == 2

    def listed() -> bool:  # the hosts' records list their replicas (refreshed every 2 s)
        rows = {r["host"]: r for r in fleet.hosts_json()}
        return all(any(n in old for n in rows[h]["replicas"]) for h in hosts)

    wait_for("cortex hosts lists the replicas", listed, 120)
    wait_for("both replicas healthy", lambda: healthy(fleet, MODEL) == set(old), 120)

    # the edit: a longer context changes the engine's command, so each host starts a new replica
    spec = write_spec(fleet, MODEL, test_model.gguf, "replicas: 2\n", context_length=2048)
    version = f"spec {spec_sha256(spec)[:12]}"
    started = datetime.now().astimezone()
    with Load(fleet.gateway.url) as load, RouteWatch(fleet, MODEL) as watch:
        wait_for("the load is answered", lambda: load.answered_by(set(old)), 120)
        t0 = time.monotonic()
        done = fleet.cortex("deploy", str(spec), "--fleet", "--json")
        rollout_s = time.monotonic() - t0
        assert done.returncode == 0, done.stderr[-4000:]
        new = routes(fleet, MODEL)
        wait_for("a new replica answers the load", lambda: load.answered_by(set(new)), 120)
    result = json.loads(done.stdout)

    # one host after the other, each swapped in place; every replica runs the new version
    assert [(s["host"], s["action"]) for s in result["steps"]] == [(h, "swap") for h in hosts]
    assert result["versions"] == {h: version for h in hosts}
    assert sorted(_host_of(r) for r in new) == hosts and not set(new) & set(old)
    assert load.failed == [], load.failed[:5]
    assert load.answered_by(set(old)) and load.answered_by(set(new))
    assert watch.fewest is not None and watch.fewest >= 2  # N routed during each swap: the hosts have room

    deploys = [r for r in _flow_runs(fleet, "deploy-model", started) if r.total_run_time]
    assert len(deploys) == 2
    per_replica = sum(r.total_run_time.total_seconds() for r in deploys)
    print(
        f"\nrolling update of 2 replicas under {CLIENTS} clients: {len(load.sent)} requests, "
        f"{len(load.failed)} failed; fewest routed replicas {watch.fewest}; rollout {rollout_s:.1f} s "
        f"(CLI included), the two host deploys {per_replica:.1f} s, overhead {rollout_s - per_replica:.1f} s"
    )


def test_a_failed_gate_stops_the_rollout_and_the_hosts_keep_the_old_version(control: ControlPlane, test_model) -> None:
    fleet = control.fleet
    spec = fleet.home / f"{MODEL}.yaml"
    old_version = f"spec {spec_sha256(spec)[:12]}"
    before = routes(fleet, MODEL)
    hosts = sorted(_host_of(r) for r in before)

    def versions_listed() -> bool:  # the hosts' records carry the version each replica runs
        rows = {r["host"]: r for r in fleet.hosts_json()}
        return all(
            rows[h]["replica_versions"].get(r, "").startswith(old_version) for r in before for h in [_host_of(r)]
        )

    wait_for("cortex hosts lists each replica's version", versions_listed, 120)
    # a benchmark gate no engine meets (a billion tokens a second): the first host's new replica
    # fails it and is removed; the rollout stops there
    gate = (
        "benchmark:\n  concurrency: [1]\n  requests: 2\n  input_len: 16\n  output_len: 4\n"
        "  gates:\n    - {metric: output_tokens_per_s, min: 1000000000}\n"
    )
    write_spec(fleet, MODEL, test_model.gguf, "replicas: 2\n" + gate, context_length=1536)
    done = fleet.cortex("deploy", str(spec), "--fleet")
    assert done.returncode == 1, done.stdout[-2000:]
    assert f"deploy failed on {hosts[0]}" in done.stderr and "the rollout stopped there" in done.stderr, done.stderr[
        -3000:
    ]
    assert all(f"{h}: {old_version}" in done.stderr for h in hosts), done.stderr[-3000:]
    assert routes(fleet, MODEL) == before  # the same two replicas serve: nothing was replaced
    wait_for("both old replicas healthy", lambda: healthy(fleet, MODEL) == set(before), 120)
    write_spec(fleet, MODEL, test_model.gguf, "replicas: 2\n", context_length=2048)  # back to what runs


def test_a_killed_host_is_replaced_by_reconcile_and_its_stale_replica_removed_when_it_returns(
    control: ControlPlane,
) -> None:
    fleet = control.fleet
    before = routes(fleet, MODEL)
    assert len(before) == 2, "needs the two replicas of the rolling-update test"
    wait_for("both replicas healthy", lambda: healthy(fleet, MODEL) == set(before), 120)
    victim_name = min(_host_of(r) for r in before)
    victim = next(h for h in fleet.hosts if h.name == victim_name)
    spare = next(h.name for h in fleet.hosts if h.name not in {_host_of(r) for r in before})
    killed_route = next(r for r in before if _host_of(r) == victim_name)
    started = datetime.now().astimezone()

    with Load(fleet.gateway.url) as load:
        wait_for("the load is answered", lambda: load.answered_by(set(before)), 120)
        t_kill = time.monotonic()
        killed = victim.kill_all()  # every process of the host: its join, its worker, its engine
        victim.set_link(False)
        assert killed
        wait_for("the gateway stops routing to the killed host", lambda: killed_route not in healthy(fleet, MODEL), 60)
        unrouted_s = time.monotonic() - t_kill

        def two_again() -> set[str] | None:
            live = healthy(fleet, MODEL)
            on = {_host_of(r) for r in live}
            return live if len(live) == 2 and victim_name not in on else None

        after = wait_for("reconcile has two healthy replicas again", two_again, 900)
        recovered_s = time.monotonic() - t_kill
        wait_for("the new replica answers the load", lambda: load.answered_by(after - set(before)), 120)

    assert {_host_of(r) for r in after} == {_host_of(r) for r in before} - {victim_name} | {spare}
    # Only requests in flight at the kill may fail: every one started before it
    failed = load.failed
    assert all(s.start < t_kill < s.end for s in failed), [s for s in failed if s.start >= t_kill][:5]
    assert len(failed) <= CLIENTS
    # the reconcile that placed it was started by the queue's not-ready event, not the schedule
    runs = _flow_runs(fleet, "fleet-reconcile", started)
    assert any(not (r.idempotency_key or "").startswith("scheduled") for r in runs), runs
    print(
        f"\nhost {victim_name} killed under {CLIENTS} clients: {len(load.sent)} requests, {len(failed)} failed "
        f"(in flight at the kill); gateway stopped routing there after {unrouted_s:.1f} s; two healthy "
        f"replicas again (on {', '.join(sorted(_host_of(r) for r in after))}) after {recovered_s:.1f} s"
    )

    # The host comes back: the reconcile its queue's ready event starts retires its stale replica
    victim.set_link(True)
    fleet.join(victim)

    def cleaned() -> bool:
        rows = {r["host"]: r for r in fleet.hosts_json()}
        host = rows.get(victim_name)
        return (
            host is not None
            and host["status"] == "online"
            and MODEL not in host["models"]
            and not any(_host_of(r) == victim_name for r in routes(fleet, MODEL))
        )

    wait_for(f"{victim_name}'s stale replica retired", cleaned, 900)
    assert healthy(fleet, MODEL) == after
