"""Hosts of the fleet: join, leave, list.

    cortex host join NAME [--pool cortex] [--address ADDR] [--label k=v ...]
        on a GPU host: make the pool, the host's queue and its deployments, publish its inventory
        (Prefect Variable cortex-host-NAME), start a Prefect worker (`prefect worker start --type
        process`) on its queue, and refresh the inventory every --refresh seconds until stopped
    cortex host leave [NAME] [--pool cortex]
        on that host: pause its queue, retire every replica it runs (drained from the gateway
        first), stop its `cortex host join`, remove its deployments, queue and record
    cortex hosts [--pool cortex] [--json]
        every joined host: status (its Prefect worker's), address, labels, GPU memory used and
        free, free capacity, and each replica with its state (the gateway's health, when one answers)
    cortex hosts --prometheus-targets
        Prometheus file_sd JSON for every engine replica the gateway routes (its admin route
        /admin/replicas/{id}/metrics); needs the gateway, not Prefect

The host's flow runs (its worker's children) get CORTEX_HOST_NAME=NAME and
CORTEX_ENGINE_HOST=ADDR: engines listen on the host's address, register there in the gateway,
and their replica names end in the host's name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import urlsplit

import typer
from rich.console import RenderableType

from cli.commands import add_command, group
from cli.output import JsonFlag, output, table

PoolOption = Annotated[str, typer.Option(help="the Prefect work pool of the fleet (type process)")]


def register(app: typer.Typer) -> None:
    host = group(app, "host", help="Join this machine to the fleet as a GPU host, or take it out.")
    add_command(
        host,
        run_join,
        "join",
        help="Start a Prefect worker on this host's work queue, create the host's deployments and "
        "publish its inventory (kept fresh until stopped with Ctrl-C or SIGTERM).",
    )
    add_command(
        host,
        run_leave,
        "leave",
        help="Pause this host's queue, retire the replicas it runs, stop its worker, remove the host.",
    )
    add_command(
        app,
        run_hosts,
        "hosts",
        short_help="the fleet's hosts: status, labels, GPU memory, free capacity, replicas and their state",
        help="List the hosts joined with `cortex host join`: status from their Prefect worker's heartbeat, "
        "labels, GPU memory used and free, free capacity, and the replicas each runs with their state (the "
        "gateway's health check, when a gateway answers). No host joined: the local machine is the fleet.",
    )


def _state_path() -> Path:
    from cortex.settings import Settings

    return Path(Settings.load().home) / "host" / "joined.json"


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value (e.g. --label gpu=h100)", param_hint="--label")
        labels[key] = value
    return labels


def default_address(api_url: str) -> str:
    """The address this host reaches the Prefect API from: the one the others can reach it at
    (for a loopback API: 127.0.0.1)."""
    host = urlsplit(api_url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((socket.gethostbyname(host), 9))  # no packet is sent: it only picks a route
        except OSError:
            return "127.0.0.1"
        return sock.getsockname()[0]


def _record(name: str, pool: str, address: str, labels: dict[str, str]):
    from cortex.fleet.hosts import HostRecord, HostReplica
    from cortex.fleet.inventory import local_inventory, offered_ram
    from cortex.provenance import replica_version
    from cortex.settings import Settings
    from cortex.runtime import reachable_runtimes
    from cortex.runtime.rollout import instance_of

    replicas = []
    ram_in_use = 0  # planned RAM of the replicas here, taken off a declared budget (CORTEX_HOST_RAM)
    for rt in reachable_runtimes()[0].values():
        for r in rt.list():
            ram_in_use += r.launch.planned_ram if r.launch is not None else 0
            instance = instance_of(r.name, name)
            spec_sha, source = replica_version(r.model, r.name, host=name)
            replicas.append(
                HostReplica(
                    name=r.name,
                    model=r.model,
                    engine=r.engine,
                    runtime=r.runtime,
                    endpoint=r.endpoint,
                    spec_sha256=spec_sha[:12] if spec_sha else None,
                    source_revision=source[:12] if source else None,
                    instance=instance or 0,
                )
            )
    inventory = local_inventory(name, address, labels)
    ram = offered_ram(inventory.ram_bytes, Settings.load().host_ram, ram_in_use)
    return HostRecord(
        inventory=inventory.model_copy(update={"ram_bytes": ram}),
        pool=pool,
        queue=name,
        replicas=replicas,
        updated_at=datetime.now(timezone.utc),
    )


def run_join(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the host's name in the fleet (its work queue)")],
    pool: PoolOption = "cortex",
    address: Annotated[
        Optional[str],
        typer.Option(
            help="where the gateway reaches this host's engines (default: the address it reaches Prefect from)"
        ),
    ] = None,
    label: Annotated[
        list[str], typer.Option("--label", help="key=value, repeatable (placement.labels selects on it)")
    ] = [],  # noqa: B006
    refresh: Annotated[float, typer.Option(help="seconds between inventory refreshes", min=1.0)] = 30.0,
) -> int:
    from pydantic import ValidationError

    from cli.commands.local_prefect import ensure_api
    from cortex.fileio import atomic_write_json
    from cortex.spec import check_host_name
    from flows.control import CONTROL_QUEUE
    from flows.fleet import join_host, publish_record

    try:
        check_host_name(name)
    except ValueError as e:
        print(f"cortex host join: NAME: {e}", file=sys.stderr)
        return 2
    if name == CONTROL_QUEUE:  # a host's queue is its name; this one runs the control plane's flows
        print(
            f"cortex host join: NAME: {name!r} is the control plane's queue; name the host otherwise", file=sys.stderr
        )
        return 2
    api = ensure_api()
    address = address or default_address(api)
    # what this host's flow runs (the worker's children) and this process see
    os.environ["CORTEX_HOST_NAME"] = name
    os.environ["CORTEX_ENGINE_HOST"] = address
    os.environ.setdefault("CORTEX_DOCKER_BIND", address)
    try:
        record = _record(name, pool, address, _labels(label))
    except ValidationError as e:
        print(f"cortex host join: {e}", file=sys.stderr)
        return 2
    deployments = join_host(record)
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--work-queue", name]
        + ["--type", "process", "--name", name],
        env={**os.environ, "PREFECT_API_URL": api},
        start_new_session=True,
    )
    state = _state_path()
    atomic_write_json(state, {"name": name, "pool": pool, "pid": os.getpid(), "worker_pid": worker.pid}, newline=True)
    print(
        f"host {name} joined pool {pool} at {address}: worker pid {worker.pid}, deployments " + ", ".join(deployments),
        file=sys.stderr,
        flush=True,
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and worker.poll() is None:
            deadline = time.monotonic() + refresh
            while not stopping and worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if not stopping and worker.poll() is None:
                publish_record(_record(name, pool, address, record.inventory.labels))
    except KeyboardInterrupt:  # Ctrl-C stops join as SIGTERM does: not a worker failure
        stopping = True
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        state.unlink(missing_ok=True)
    if worker.returncode and not stopping:
        print(f"cortex host join: the Prefect worker exited with {worker.returncode}", file=sys.stderr)
        return 1
    return 0


def run_leave(
    name: Annotated[
        Optional[str], typer.Argument(metavar="[NAME]", help="the host (default: the one joined from this machine)")
    ] = None,
    pool: PoolOption = "cortex",
) -> int:
    from cli.commands.local_prefect import ensure_api, run_flow
    from cortex.runtime import reachable_runtimes
    from flows.deploy import retire_model
    from flows.fleet import pause_queue, remove_host

    state_path = _state_path()
    try:
        joined = json.loads(state_path.read_text())
    except FileNotFoundError:
        joined = None
    name = name or (joined or {}).get("name")
    if not name:
        print(
            "cortex host leave: no host joined from here (no `cortex host join` state); name the host", file=sys.stderr
        )
        return 2
    ensure_api()
    os.environ["CORTEX_HOST_NAME"] = name
    pause_queue(name, pool)
    failed = 0
    models = sorted({r.model for rt in reachable_runtimes()[0].values() for r in rt.list()})
    for model in models:  # drained from the gateway first, then stopped
        failed |= run_flow(f"retire {model} on {name}", retire_model, model).exit_code
    if joined and joined.get("name") == name:
        for pid in (joined["pid"], joined["worker_pid"]):
            try:
                os.kill(pid, signal.SIGTERM)  # `cortex host join` stops its worker and exits
            except ProcessLookupError:
                print(f"cortex host leave: process {pid} had already exited", file=sys.stderr)
    removed = remove_host(name, pool)
    print(
        f"host {name} left pool {pool}: retired {', '.join(models) or 'nothing'}; removed {', '.join(removed) or 'nothing'}"
    )
    return 1 if failed else 0


def _gateway_replicas() -> dict[str, dict] | None:
    """The gateway's replicas by id when one answers at CORTEX_GATEWAY_URL, else None."""
    from cortex.gateway.client import gateway_client

    gw = gateway_client(None)
    if gw is None:
        return None
    with gw:
        return {r["id"]: r for r in gw.list()["replicas"]}


def run_hosts(
    pool: PoolOption = "cortex",
    as_json: JsonFlag = False,
    prometheus_targets: Annotated[
        bool,
        typer.Option(
            "--prometheus-targets",
            help="print Prometheus file_sd JSON: one target per engine replica the gateway routes, "
            "scraped through GET /admin/replicas/{id}/metrics (see the README's scrape config)",
        ),
    ] = False,
) -> int:
    from cli.commands.local_prefect import ensure_api
    from cortex.fleet.hosts import host_row
    from flows.fleet import read_fleet

    if prometheus_targets:
        from cortex.gateway.client import GatewayClient, GatewayError
        from cortex.gateway.metrics import engine_scrape_targets
        from cortex.settings import SettingsError

        try:
            with GatewayClient() as gw:
                targets = engine_scrape_targets(gw.url, gw.list()["replicas"])
        except (GatewayError, SettingsError) as e:
            print(f"cortex hosts --prometheus-targets: {e}", file=sys.stderr)
            return 1
        print(json.dumps(targets, indent=2))
        return 0

    ensure_api()
    routed = _gateway_replicas()
    rows = [host_row(h.record, h.status, h.last_heartbeat, routed) for h in read_fleet(pool)]

    def render(rows: list[dict]) -> RenderableType:
        if not rows:
            return f"no host has joined pool {pool}: this machine is the fleet (`cortex host join NAME` adds one)"
        return table(
            ("host", "status", "address", "labels", "GPU memory", "free", "replicas"),
            (
                (
                    r["host"],
                    r["status"],
                    r["address"],
                    ",".join(f"{k}={v}" for k, v in r["labels"].items()) or "-",
                    r["gpu_summary"],
                    r["free"],
                    ", ".join(f"{s['name']} ({s['state']})" for s in r["replica_states"]) or "-",
                )
                for r in rows
            ),
        )

    output(rows, as_json, render)
    return 0
