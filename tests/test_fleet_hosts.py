"""A fleet of three hosts on one machine: Linux network namespaces (tests/netns.py), each host
running `cortex host join` (its own real Prefect worker) and the process runtime, with
llama-server bound to the host's own address. A real Prefect server and the gateway run in the
root namespace. The hosts have no GPUs: serving runs on CPU (SmolLM2 Q4_1), and the spec that
fits no host asks for a GPU.

What this proves: hosts join through Prefect (queue, deployments, inventory, worker liveness);
`cortex deploy --fleet` places a `replicas: 2` spec on two different hosts, each deploy runs on
its host's worker, each replica registers at its host's address and the gateway reaches both; a
label selector keeps a spec to matching hosts; a spec that fits no host fails with the trace;
`cortex host leave` drains and removes a host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cortex.net import free_port
from cortex.testing.gateway import GatewayProcess
from netns import ROOT_ADDRESS, SimHost, simulated_hosts

pytestmark = pytest.mark.parts

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "cortex-admin-fleet-test"
LABELS = {"h1": "zone=a", "h2": "zone=b", "h3": "zone=a"}


@dataclass
class Fleet:
    hosts: list[SimHost]
    env: dict[str, str]  # the root namespace's: the control plane's CLI
    gateway: GatewayProcess
    home: Path

    def cortex(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,  # a hang guard
            cwd=REPO,
        )

    def hosts_json(self) -> list[dict]:
        done = self.cortex("hosts", "--json", timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def _base_env(home: Path) -> dict[str, str]:
    (home / "prefect").mkdir(parents=True, exist_ok=True)  # the server's SQLite file goes there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORTEX_", "PREFECT_"))}
    if "CORTEX_CACHE" in os.environ:  # the engines and the test model: one cache per machine
        env["CORTEX_CACHE"] = os.environ["CORTEX_CACHE"]
    return env | {
        "PYTHONPATH": str(REPO),
        "CORTEX_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "CORTEX_ADMIN_TOKEN": ADMIN_TOKEN,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def _wait(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout  # a hang guard, not a measurement
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    pytest.fail(f"{what} within {timeout:.0f} s" + (f":\n{log.read_text()[-3000:]}" if log else ""))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, toolchain, test_model) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    with simulated_hosts(3) as hosts:
        port = free_port()
        server_log = root / "prefect-server.log"
        server_env = _base_env(root / "server") | {"PREFECT_UI_ENABLED": "false"}
        with open(server_log, "ab") as log:
            server = subprocess.Popen(  # on 0.0.0.0: the workers in the namespaces reach it at 10.77.0.1
                [sys.executable, "-m", "prefect", "server", "start", "--host", "0.0.0.0", "--port", str(port)],
                env=server_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        gateway = None
        try:
            api = f"http://127.0.0.1:{port}/api"

            def answers() -> bool:
                try:
                    return httpx.get(f"{api}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            _wait("the Prefect server answered", answers, 180, server_log)
            gateway = GatewayProcess(
                root / "gateway",
                no_auth=True,
                env={
                    "CORTEX_GATEWAY_HOST": "0.0.0.0",
                    "CORTEX_ADMIN_TOKEN": ADMIN_TOKEN,
                    "CORTEX_GATEWAY_HEALTH_INTERVAL": "0.5",
                },
            ).start()
            for host in hosts:
                home = root / host.name
                env = _base_env(home) | {
                    "PREFECT_API_URL": f"http://{ROOT_ADDRESS}:{port}/api",
                    "CORTEX_GATEWAY_URL": f"http://{ROOT_ADDRESS}:{gateway.port}",
                }
                host.popen(
                    [sys.executable, "-m", "cli.main", "host", "join", host.name, "--address", host.address]
                    + ["--label", LABELS[host.name], "--refresh", "2"],
                    env=env,
                    cwd=REPO,
                    stdout=open(home / "join.log", "ab"),
                    stderr=subprocess.STDOUT,
                )
            control = _base_env(root / "control") | {"PREFECT_API_URL": api, "CORTEX_GATEWAY_URL": gateway.url}
            fleet = Fleet(hosts, control, gateway, root)

            def all_online() -> bool:
                rows = fleet.hosts_json()
                return sorted(r["host"] for r in rows if r["status"] == "online") == ["h1", "h2", "h3"]

            _wait("three hosts online", all_online, 240, root / "h1" / "join.log")
            yield fleet
        finally:
            for host in hosts:
                host.stop()  # `cortex host join` stops its worker
            for home in root.glob("h*/runtime/process/replicas/*.json"):  # engines the hosts' runs started
                pid = json.loads(home.read_text())["pid"]
                try:
                    os.killpg(pid, 15)
                except ProcessLookupError:
                    pass
            if gateway is not None:
                gateway.stop()
            os.killpg(server.pid, 15)
            server.wait(timeout=60)


def _spec(fleet: Fleet, name: str, gguf: Path, extra: str) -> Path:
    path = fleet.home / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nsource:\n  gguf: {gguf}\nruntime: process\n"
        f"resources:\n  concurrency: 1\n  context_length: 1024\n{extra}"
    )
    return path


def _routes(fleet: Fleet, model: str) -> dict[str, str]:
    """replica id -> endpoint, from the gateway's registry."""
    from cortex.gateway.client import GatewayClient

    with GatewayClient(url=fleet.gateway.url, admin_token=ADMIN_TOKEN) as client:
        return {r["id"]: r["url"] for r in client.replicas_of(model)}


def test_two_replicas_land_on_two_hosts_and_the_gateway_reaches_both(fleet: Fleet, test_model) -> None:
    spec = _spec(fleet, "smollm2", test_model.gguf, "replicas: 2\n")
    done = fleet.cortex("deploy", str(spec), "--fleet", "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    placed = {r["host"] for r in json.loads(done.stdout)["placement"]["placed"]}
    assert len(placed) == 2

    routes = _routes(fleet, "smollm2")
    # each replica registered at its own host's address (not 127.0.0.1), named after its host
    by_host = {h.name: h for h in fleet.hosts}
    assert sorted(rid.rsplit("-", 1)[1] for rid in routes) == sorted(placed)
    for rid, url in routes.items():
        assert url.startswith(f"http://{by_host[rid.rsplit('-', 1)[1]].address}:"), (rid, url)

    # Hold one streaming request open: the gateway sends the next to the replica with fewer in
    # flight, the other one. x-cortex-replica says which answered each.
    _wait("both replicas healthy in the gateway", lambda: _healthy(fleet, "smollm2") == set(routes), 60)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count to a thousand."}]}
    with httpx.Client(base_url=fleet.gateway.url, timeout=120) as client:
        long = {**body, "stream": True, "max_tokens": 1000, "ignore_eos": True}
        with client.stream("POST", "/v1/chat/completions", json=long) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped generator would close the stream
            next(lines)  # it is being answered: in flight
            second = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
            assert second.status_code == 200, second.text
            answered = {first.headers["x-cortex-replica"], second.headers["x-cortex-replica"]}
    assert answered == set(routes)

    # the hosts' inventories list what they run (refreshed every 2 s)
    def listed() -> bool:
        rows = {r["host"]: r for r in fleet.hosts_json()}
        return all(any(n in routes for n in rows[h]["replicas"]) for h in placed)

    _wait("cortex hosts lists the replicas", listed, 60)


def _healthy(fleet: Fleet, model: str) -> set[str]:
    from cortex.gateway.client import GatewayClient

    with GatewayClient(url=fleet.gateway.url, admin_token=ADMIN_TOKEN) as client:
        return {r["id"] for r in client.replicas_of(model) if r["healthy"] and r["state"] == "active"}


def test_a_label_selector_keeps_a_spec_to_matching_hosts_and_a_spec_that_fits_none_fails(
    fleet: Fleet, test_model
) -> None:
    spec = _spec(fleet, "smollm2-b", test_model.gguf, "placement:\n  labels: {zone: b}\n")
    done = fleet.cortex("deploy", str(spec), "--fleet", "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    placed = json.loads(done.stdout)["placement"]["placed"]
    assert [(r["host"], r["address"]) for r in placed] == [("h2", "10.77.0.12")]
    assert [rid.rsplit("-", 1)[1] for rid in _routes(fleet, "smollm2-b")] == ["h2"]

    # no host has a GPU: the planner refuses every host, and the error carries each host's reason
    spec = _spec(fleet, "needs-gpu", test_model.gguf, "replicas: 1\n")
    spec.write_text(spec.read_text().replace("resources:\n", "resources:\n  gpus: 1\n"))
    done = fleet.cortex("deploy", str(spec), "--fleet")
    assert done.returncode == 1
    assert "no host can be planned for" in done.stderr, done.stderr[-3000:]
    for host in ("h1", "h2", "h3"):
        assert f"{host}: cannot plan: has 0 GPUs" in done.stderr, done.stderr[-3000:]
    assert _routes(fleet, "needs-gpu") == {}


def test_a_host_that_leaves_drains_its_replicas_and_is_gone(fleet: Fleet) -> None:
    routes = _routes(fleet, "smollm2")
    leaving = min(rid.rsplit("-", 1)[1] for rid in routes)  # a host with a replica of smollm2
    host = next(h for h in fleet.hosts if h.name == leaving)
    done = host.run(
        [sys.executable, "-m", "cli.main", "host", "leave"],
        env=_host_env(fleet, host),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard
    )
    assert done.returncode == 0, done.stderr[-3000:]
    left = _routes(fleet, "smollm2")
    assert sorted(left) == sorted(rid for rid in routes if not rid.endswith(f"-{leaving}"))
    _wait(f"{leaving} gone from cortex hosts", lambda: leaving not in {r["host"] for r in fleet.hosts_json()}, 60)
    with httpx.Client(base_url=fleet.gateway.url, timeout=120) as client:  # the other replica still serves
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
    assert answer.status_code == 200 and answer.headers["x-cortex-replica"] in left


def _host_env(fleet: Fleet, host: SimHost) -> dict[str, str]:
    api = fleet.env["PREFECT_API_URL"].replace("127.0.0.1", ROOT_ADDRESS)
    return _base_env(fleet.home / host.name) | {
        "PREFECT_API_URL": api,
        "CORTEX_GATEWAY_URL": f"http://{ROOT_ADDRESS}:{fleet.gateway.port}",
    }
