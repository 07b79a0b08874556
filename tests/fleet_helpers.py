"""A running fleet for the netns tests: a real Prefect server and the gateway in the root
namespace, three hosts (tests/netns.py) each running `cortex host join` (its own Prefect
worker, the process runtime, llama-server bound to the host's address).

    with running_fleet(root) as fleet:     # all three hosts online in `cortex hosts`
        fleet.cortex("deploy", spec, "--fleet")
        fleet.join(fleet.hosts[0])         # (re)start a host's `cortex host join`

Used by tests/test_fleet_hosts.py and tests/test_fleet_rollout.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cortex.net import free_port
from cortex.testing.gateway import GatewayProcess
from netns import SimHost, simulated_hosts

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "cortex-admin-fleet-test"
LABELS = {"h1": "zone=a", "h2": "zone=b", "h3": "zone=a"}


@dataclass
class Fleet:
    hosts: list[SimHost]
    env: dict[str, str]  # the root namespace's: the control plane's CLI
    gateway: GatewayProcess
    home: Path
    host_env_extra: dict[str, str]  # every host's
    host_envs: dict[str, dict[str, str]] = field(default_factory=dict)  # one host's, by name

    def cortex(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,  # a hang guard
            cwd=REPO,
        )

    def deploy_unseen(
        self, file_name: str, text: str, *flags: str, timeout: float = 900
    ) -> subprocess.CompletedProcess:
        """`cortex deploy SPEC --fleet ...` with SPEC at a path only that command sees: a tmpfs
        mounted in its own mount namespace over <home>/control-only, a folder that stays empty
        for every other process, the hosts included. A deploy that works proves the hosts got
        the spec's text, not its path."""
        folder = self.home / "control-only"
        folder.mkdir(exist_ok=True)
        script = 'mount -t tmpfs control-only "$1" && printf "%s" "$2" > "$1/$3" && shift 3 && exec "$@"'
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(folder), text, file_name]
            + [sys.executable, "-m", "cli.main", "deploy", str(folder / file_name), "--fleet", *flags],
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

    def host_env(self, host: SimHost) -> dict[str, str]:
        api = self.env["PREFECT_API_URL"].replace("127.0.0.1", host.root_address)
        return (
            base_env(self.home / host.name)
            | {"PREFECT_API_URL": api, "CORTEX_GATEWAY_URL": f"http://{host.root_address}:{self.gateway.port}"}
            | self.host_env_extra
            | self.host_envs.get(host.name, {})
        )

    def join(self, host: SimHost) -> None:
        """Start the host's `cortex host join` in its namespace (log: <home>/<host>/join.log)."""
        home = self.home / host.name
        host.popen(
            [sys.executable, "-m", "cli.main", "host", "join", host.name, "--address", host.address]
            + ["--label", LABELS[host.name], "--refresh", "2"],
            env=self.host_env(host),
            cwd=REPO,
            stdout=open(home / "join.log", "ab"),
            stderr=subprocess.STDOUT,
        )


def base_env(home: Path) -> dict[str, str]:
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


def wait_for(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout  # a hang guard, not a measurement
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    pytest.fail(f"{what} within {timeout:.0f} s" + (f":\n{log.read_text()[-3000:]}" if log else ""))


@contextlib.contextmanager
def running_fleet(
    root: Path,
    server_env: dict[str, str] | None = None,
    host_env: dict[str, str] | None = None,
    host_envs: dict[str, dict[str, str]] | None = None,
) -> Iterator[Fleet]:
    """Three hosts joined and online; everything stopped on exit, the hosts' engines too.
    `host_env`: settings of every host; `host_envs`: of one host, by name."""
    with simulated_hosts(3) as hosts:
        port = free_port()
        server_log = root / "prefect-server.log"
        env = base_env(root / "server") | {"PREFECT_UI_ENABLED": "false"} | (server_env or {})
        with open(server_log, "ab") as log:
            server = (
                subprocess.Popen(  # on 0.0.0.0: the workers in the namespaces reach it at the bridge's root address
                    [sys.executable, "-m", "prefect", "server", "start", "--host", "0.0.0.0", "--port", str(port)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        gateway = None
        try:
            api = f"http://127.0.0.1:{port}/api"

            def answers() -> bool:
                try:
                    return httpx.get(f"{api}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for("the Prefect server answered", answers, 180, server_log)
            gateway = GatewayProcess(
                root / "gateway",
                no_auth=True,
                env={
                    "CORTEX_GATEWAY_HOST": "0.0.0.0",
                    "CORTEX_ADMIN_TOKEN": ADMIN_TOKEN,
                    "CORTEX_GATEWAY_HEALTH_INTERVAL": "0.5",
                    # least-in-flight only: these tests send one conversation from many clients and
                    # count on it reaching every replica; prefix affinity (which would keep it on one
                    # replica) is tested in test_routing.py and test_gateway*.py
                    "CORTEX_GATEWAY_AFFINITY": "false",
                },
            ).start()
            control = base_env(root / "control") | {"PREFECT_API_URL": api, "CORTEX_GATEWAY_URL": gateway.url}
            fleet = Fleet(hosts, control, gateway, root, host_env or {}, host_envs or {})
            for host in hosts:
                (root / host.name).mkdir(parents=True, exist_ok=True)
                fleet.join(host)

            def all_online() -> bool:
                rows = fleet.hosts_json()
                return sorted(r["host"] for r in rows if r["status"] == "online") == ["h1", "h2", "h3"]

            wait_for("three hosts online", all_online, 240, root / "h1" / "join.log")
            yield fleet
        finally:
            for host in hosts:
                host.stop()  # `cortex host join` stops its worker
            for state in root.glob("h*/runtime/process/replicas/*.json"):  # engines the hosts' runs started
                pid = json.loads(state.read_text())["pid"]
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, 15)
            if gateway is not None:
                gateway.stop()
            os.killpg(server.pid, 15)
            server.wait(timeout=60)


def write_spec(fleet: Fleet, name: str, gguf: Path, extra: str, context_length: int = 1024) -> Path:
    path = fleet.home / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nsource:\n  gguf: {gguf}\nruntime: process\n"
        f"resources:\n  concurrency: 1\n  context_length: {context_length}\n{extra}"
    )
    return path


def routes(fleet: Fleet, model: str) -> dict[str, str]:
    """replica id -> endpoint, from the gateway's registry."""
    from cortex.gateway.client import GatewayClient

    with GatewayClient(url=fleet.gateway.url, admin_token=ADMIN_TOKEN) as client:
        return {r["id"]: r["url"] for r in client.replicas_of(model)}


def healthy(fleet: Fleet, model: str) -> set[str]:
    from cortex.gateway.client import GatewayClient

    with GatewayClient(url=fleet.gateway.url, admin_token=ADMIN_TOKEN) as client:
        return {r["id"] for r in client.replicas_of(model) if r["healthy"] and r["state"] == "active"}


def answered_by_each(fleet: Fleet, model: str) -> set[str]:
    """The replicas that answered two requests through the gateway: one streaming request held
    open, then a short one, which the gateway (least in flight) sends to another replica.
    x-cortex-replica says which answered each."""
    body = {"model": model, "messages": [{"role": "user", "content": "Count to a thousand."}]}
    with httpx.Client(base_url=fleet.gateway.url, timeout=120) as client:
        long = {**body, "stream": True, "max_tokens": 1000, "ignore_eos": True}
        with client.stream("POST", "/v1/chat/completions", json=long) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped generator would close the stream
            next(lines)  # it is being answered: in flight
            second = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
            assert second.status_code == 200, second.text
            return {first.headers["x-cortex-replica"], second.headers["x-cortex-replica"]}


class RouteWatch:
    """The fewest active routes of `model` the gateway had, read every 0.2 s until stopped."""

    def __init__(self, fleet: Fleet, model: str) -> None:
        self.fleet = fleet
        self.model = model
        self.fewest: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        from cortex.gateway.client import GatewayClient

        with GatewayClient(url=self.fleet.gateway.url, admin_token=ADMIN_TOKEN) as client:
            while not self._stop.wait(0.2):
                active = sum(r["state"] == "active" for r in client.replicas_of(self.model))
                self.fewest = active if self.fewest is None else min(self.fewest, active)

    def __enter__(self) -> RouteWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
