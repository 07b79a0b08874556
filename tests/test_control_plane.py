"""One control plane: apply-spec, reconcile-specs and retire-spec act on the fleet as soon as a
host with a Prefect worker has joined the pool, and on this machine when none has.

The local path is what tests/test_serve.py runs (no host joined: the README's demo). Here, a
host joins a pool of its own on the real Prefect server with a worker that stops heartbeating
(a host that went down): the runs take the fleet path, say so in their log and `control-path`
artifact, and fail with the fleet-apply trace (no host online) without starting an engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cortex.fleet.hosts import control_path
from test_serve import REPO, PrefectServer, client, prefect_server, run_artifacts, smollm2_spec, write_spec  # noqa: F401


def test_control_path_is_the_fleet_once_a_host_has_a_worker() -> None:
    assert control_path({}, "cortex")[0] == "local"
    kind, why = control_path({"gpu-1": "no worker"}, "cortex")  # a record whose worker never started
    assert kind == "local" and "gpu-1" in why and "this machine is the fleet" in why
    kind, why = control_path({"gpu-1": "offline", "gpu-2": "online", "gpu-3": "no worker"}, "cortex")
    assert kind == "fleet"
    assert why == "2 host(s) joined work pool 'cortex', 1 online: gpu-1 (offline), gpu-2 (online), gpu-3 (no worker)"
    assert control_path({"gpu-1": "offline"}, "cortex")[0] == "fleet"  # all down: fail on the fleet, not deploy here


def test_cortex_hosts_rows_give_gpu_memory_and_each_replicas_state() -> None:
    from cortex.fleet.hosts import HostRecord, HostReplica, host_row
    from cortex.fleet.inventory import GpuInfo, HostInventory

    gpus = [
        GpuInfo(name="H100", memory_total_mib=81559, memory_free_mib=1559),
        GpuInfo(memory_total_mib=81559, memory_free_mib=81559),
    ]
    inventory = HostInventory(name="gpu-1", address="10.0.0.5", cpu_cores=32, ram_bytes=256 << 30, gpus=gpus)
    names = ("serving", "sick", "draining", "unrouted", "new")
    record = HostRecord(
        inventory=inventory,
        pool="cortex",
        queue="gpu-1",
        replicas=[
            HostReplica(name=n, model="m", engine="vllm", runtime="docker", endpoint="http://10.0.0.5:1") for n in names
        ],
        updated_at=datetime.now(timezone.utc),
    )
    routed = {
        "serving": {"state": "active", "healthy": True},
        "sick": {"state": "active", "healthy": False, "reason": "GET /health: 503"},
        "draining": {"state": "draining", "healthy": True},
        "new": {"state": "active", "healthy": None},
    }
    row = host_row(record, "online", None, routed)
    assert (row["gpu_total_bytes"], row["gpu_used_bytes"], row["gpu_free_bytes"]) == (
        2 * 81559 << 20,
        80000 << 20,
        83118 << 20,
    )
    assert [g["used_bytes"] for g in row["gpu_memory"]] == [80000 << 20, 0]
    assert row["gpu_summary"] == "2 GPUs: 78.12 GiB used, 81.17 GiB free"
    assert {s["name"]: s["state"] for s in row["replica_states"]} == {
        "serving": "serving",
        "sick": "unhealthy: GET /health: 503",
        "draining": "draining",
        "unrouted": "running, not in the gateway",
        "new": "registered, not yet checked",
    }
    assert row["replicas"] == list(names)
    # no gateway answered: what the host's last record says, and whether the host is up
    assert host_row(record, "online", None)["replica_states"][0]["state"] == "running (no gateway answered)"
    assert host_row(record, "offline", None)["replica_states"][0]["state"] == "last seen running (host offline)"
    assert (
        host_row(record.model_copy(update={"inventory": inventory.model_copy(update={"gpus": []})}), "online", None)[
            "gpu_summary"
        ]
        == "no GPU"
    )


def _wait(what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout  # a hang guard, not a measure
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


def test_with_a_host_joined_the_runs_act_on_the_fleet(
    prefect_server: PrefectServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    test_model,
) -> None:
    from cortex.applied import FLEET, AppliedSpec, read_applied, spec_sha256, write_applied
    from cortex.fleet.hosts import HostRecord, HostReplica
    from cortex.fleet.inventory import HostInventory
    from flows.fleet import join_host, read_fleet, remove_host
    from flows.reconcile import apply_spec, reconcile_specs, retire_spec

    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "cortex-home"))
    monkeypatch.setenv("CORTEX_GATEWAY_URL", "http://127.0.0.1:9")
    suffix = uuid.uuid4().hex[:8]
    pool, host = f"control-{suffix}", f"gpu-{suffix}"
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = specs / "smollm2.yaml"
    write_spec(spec, smollm2_spec(test_model.gguf))

    inventory = HostInventory(name=host, address="127.0.0.1", cpu_cores=2, ram_bytes=8 << 30)
    replica = HostReplica(
        name=f"smollm2-served-{host}", model="smollm2-served", engine="llamacpp", runtime="process", endpoint="x"
    )
    join_host(
        HostRecord(
            inventory=inventory, pool=pool, queue=host, replicas=[replica], updated_at=datetime.now(timezone.utc)
        )
    )
    try:
        # the host's worker heartbeats once (every second, it says), then never again: a host that
        # went down. Prefect marks it offline after three missed heartbeats.
        with client() as c:
            c.send_worker_heartbeat(pool, host, heartbeat_interval_seconds=1)
        _wait(f"Prefect to mark {host}'s worker offline", lambda: read_fleet(pool)[0].status == "offline", 120)

        # `cortex hosts` shows it, and its replica as last seen (no gateway answers here)
        env = prefect_server.env(CORTEX_HOME=str(tmp_path / "cortex-home"), CORTEX_GATEWAY_URL="http://127.0.0.1:9")
        listed = subprocess.run(
            [sys.executable, "-m", "cli", "hosts", "--pool", pool, "--json"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert row["status"] == "offline" and row["gpu_summary"] == "no GPU"
        assert row["replica_states"] == [
            {
                "name": replica.name,
                "model": "smollm2-served",
                "engine": "llamacpp",
                "endpoint": "x",
                "state": "last seen running (host offline)",
            }
        ]

        state = apply_spec(str(spec), pool=pool, return_state=True)
        assert state.is_failed()
        assert f"no host of work pool {pool!r} is online (joined: {host} (offline))" in str(state.message)
        [path] = [a for a in run_artifacts(state.state_details.flow_run_id) if a.key == "control-path"]
        assert "Acting on the fleet" in path.data and f"{host} (offline)" in path.data
        assert read_applied(spec) is None  # nothing was applied

        state = reconcile_specs(str(specs), pool=pool, return_state=True)
        assert state.is_failed() and "could not apply smollm2.yaml" in str(state.message)
        assert "is online" in str(state.message)

        # a spec applied on the fleet, now deleted: retired on the hosts that run it; this one is
        # offline, so the run fails naming it instead of forgetting a model that still runs there
        write_applied(
            AppliedSpec(
                str(spec), spec_sha256(spec), "smollm2-served", FLEET, "", host, "", "2026-01-01T00:00:00+00:00"
            )
        )
        spec.unlink()
        state = retire_spec(str(spec), pool=pool, return_state=True)
        assert state.is_failed()
        assert f"{host}: offline, its replicas of smollm2-served could not be retired" in str(state.message)
        assert read_applied(spec) is not None
    finally:
        remove_host(host, pool)
        with client() as c:
            c.delete_work_pool(pool)


def _cortex_serve(server: PrefectServer, root: Path, **env: str) -> tuple[subprocess.Popen, Path]:  # noqa: F811
    specs = root / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    log = root / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--specs", str(specs), "--prefect-url", server.api_url],
        env=server.env(CORTEX_HOME=str(root / "cortex-home"), PYTHONUNBUFFERED="1", **env),
        cwd=REPO,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log


def test_cortex_serve_runs_the_control_worker_and_its_schedule_starts_fleet_reconcile(
    prefect_server: PrefectServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`cortex serve` (no host joined: the demo's setting) registers the control queue's
    deployments and starts their worker; the fleet-reconcile schedule (CORTEX_FLEET_RECONCILE_S)
    creates runs that this worker runs; a second control plane would not start a second worker;
    the worker stops with `cortex serve`."""
    import os

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.control import CONTROL_QUEUE, ControlWorker
    from test_serve import stop_process

    proc, log = _cortex_serve(prefect_server, tmp_path, CORTEX_FLEET_RECONCILE_S="10")
    try:

        def deployment():
            with client() as c:
                try:
                    return c.read_deployment_by_name("fleet-reconcile/fleet-reconcile")
                except Exception:  # noqa: BLE001 - not registered yet
                    return None

        _wait("cortex serve registered fleet-reconcile", lambda: proc.poll() is None and deployment(), 180)
        dep = deployment()
        assert (dep.work_pool_name, dep.work_queue_name, dep.entrypoint) == (
            "cortex",
            CONTROL_QUEUE,
            "flows.fleet.fleet_reconcile",
        )

        def scheduled_run_done():
            with client() as c:
                runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            return next(
                (
                    r
                    for r in runs
                    if r.auto_scheduled
                    and r.created_by is not None
                    and r.created_by.type == "SCHEDULE"
                    and r.state is not None
                    and r.state.is_final()
                ),
                None,
            )

        # a hang guard: the scheduler, then the worker's poll, then the run's own process
        run = None
        deadline = time.monotonic() + 300
        while run is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no scheduled fleet-reconcile run finished:\n" + log.read_text()[-3000:]
            run = scheduled_run_done()
            time.sleep(1)
        assert run.state.is_completed(), (
            run.state,
            (tmp_path / "cortex-home" / "control-worker.log").read_text()[-3000:],
        )
        assert run.work_queue_name == CONTROL_QUEUE and "auto-scheduled" in run.tags
        assert run.idempotency_key.startswith(f"scheduled {dep.id} ")

        # the worker that ran it is this serve's: named control-<host>, online in the pool
        with client() as c:
            workers = {w.name: w for w in c.read_workers_for_work_pool("cortex")}
        ours = ControlWorker(tmp_path / "second.log")
        assert workers[ours.name].status.value == "ONLINE"
        [line] = [row for row in log.read_text().splitlines() if "started the control worker" in row]
        pid = int(line.split("(pid ")[1].split(")")[0])
        os.kill(pid, 0)  # it runs

        # a second control plane sees the queue polled and starts nothing
        ours.check()
        assert ours.process is None and ours.other is not None and ours.other.startswith("queue cortex/control polled")
    finally:
        stop_process(proc, timeout=60)
        with client() as c:  # its schedule's future runs go with it: later tests' workers must not run them
            c.delete_deployment(c.read_deployment_by_name("fleet-reconcile/fleet-reconcile").id)
    with pytest.raises(ProcessLookupError):  # the worker stopped with cortex serve
        os.kill(pid, 0)


def test_a_spec_applied_here_is_handed_over_to_the_fleet_once_its_replica_serves_there(
    prefect_server: PrefectServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    test_model,
    toolchain,
) -> None:
    """The single-machine path deploys a spec here (a real llama-server, routed by a real
    gateway); a host joins: while its worker is down the fleet apply fails and the local replica
    keeps serving; with the host's `cortex host join` running (its own CORTEX_HOME, as on another
    machine), the apply deploys the host's replica, and only once the gateway routes to it
    healthy is the local replica drained and stopped. The host's replica is untouched."""
    import os
    import signal

    from cortex.applied import read_applied
    from cortex.fleet.inventory import HostInventory
    from cortex.fleet.hosts import HostRecord
    from cortex.runtime.process import ProcessRuntime
    from cortex.testing.gateway import GatewayProcess
    from flows.fleet import join_host, read_fleet, remove_host
    from flows.reconcile import apply_spec

    token = "cortex-admin-takeover-test"
    home, host_home = tmp_path / "control-home", tmp_path / "host-home"
    gateway = GatewayProcess(
        tmp_path / "gateway",
        no_auth=True,
        env={"CORTEX_ADMIN_TOKEN": token, "CORTEX_GATEWAY_HEALTH_INTERVAL": "0.5"},
    ).start()
    monkeypatch.setenv("CORTEX_HOME", str(home))
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", token)
    monkeypatch.setenv("CORTEX_GATEWAY_URL", gateway.url)
    suffix = uuid.uuid4().hex[:8]
    pool, host = f"takeover-{suffix}", f"gpu-{suffix}"
    spec = tmp_path / "smollm2.yaml"
    write_spec(spec, smollm2_spec(test_model.gguf))
    join = None

    def routes() -> dict[str, dict]:
        from cortex.gateway.client import GatewayClient

        with GatewayClient() as c:
            return {r["id"]: r for r in c.replicas_of("smollm2-served")}

    try:
        local = apply_spec(str(spec), pool=pool)  # no host has joined: this machine
        assert local["action"] == "deployed" and "this machine is the fleet" in local["control_path"]
        local_id = local["replica"]
        _wait("the gateway routes to the local replica", lambda: routes().get(local_id, {}).get("healthy") is True, 60)

        # a host joined, its worker down: the fleet apply fails; the local replica keeps serving
        inventory = HostInventory(name=host, address="127.0.0.1", cpu_cores=2, ram_bytes=8 << 30)
        join_host(HostRecord(inventory=inventory, pool=pool, queue=host, updated_at=datetime.now(timezone.utc)))
        with client() as c:
            c.send_worker_heartbeat(pool, host, heartbeat_interval_seconds=1)
        _wait(f"Prefect to mark {host}'s worker offline", lambda: read_fleet(pool)[0].status == "offline", 120)
        state = apply_spec(str(spec), pool=pool, return_state=True)
        assert state.is_failed() and "is online" in str(state.message)
        assert not read_applied(spec).on_fleet
        assert list(routes()) == [local_id] and routes()[local_id]["healthy"] is True

        # the host's `cortex host join`: its worker runs the fleet's deploy; then the hand-over
        host_env = prefect_server.env(
            CORTEX_HOME=str(host_home),
            CORTEX_ADMIN_TOKEN=token,
            CORTEX_GATEWAY_URL=gateway.url,
            PYTHONPATH=str(REPO),
            PYTHONUNBUFFERED="1",
        )
        host_home.mkdir()
        join = subprocess.Popen(
            [sys.executable, "-m", "cli", "host", "join", host, "--pool", pool, "--address", "127.0.0.1"]
            + ["--refresh", "2"],
            env=host_env,
            cwd=REPO,
            stdout=open(tmp_path / "join.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait(f"{host} online", lambda: read_fleet(pool)[0].status == "online", 180)
        state = apply_spec(str(spec), pool=pool, return_state=True)
        assert state.is_completed(), (state.message, (tmp_path / "join.log").read_text()[-3000:])
        outcome = state.result()
        assert outcome["hosts"] == [host]
        said = outcome["local_replica"]
        assert said.startswith(f"drained and stopped the local replica {local_id} (process)"), said
        assert f"the gateway routes to healthy replicas on {host}" in said
        [fleet_id] = routes()  # only the host's replica is routed now, named after its host
        assert fleet_id != local_id and fleet_id.endswith(f"-{host}")
        assert ProcessRuntime(state_dir=home / "runtime" / "process").list() == []
        [fleet_replica] = ProcessRuntime(state_dir=host_home / "runtime" / "process").list()
        assert fleet_replica.name == fleet_id
        assert read_applied(spec).on_fleet
        [artifact] = [a for a in run_artifacts(state.state_details.flow_run_id) if a.key == "fleet-takeover"]
        assert local_id in artifact.data
    finally:
        if join is not None:
            os.killpg(join.pid, signal.SIGTERM)  # `cortex host join` stops its worker
            join.wait(timeout=60)
        for state_dir in (home, host_home):
            runtime = ProcessRuntime(state_dir=state_dir / "runtime" / "process")
            for replica in runtime.list():
                runtime.stop(replica)
        gateway.stop()
        remove_host(host, pool)
        with client() as c:
            c.delete_work_pool(pool)


def test_cortex_serve_makes_the_control_deployments_prefect_yaml_declares(tmp_path: Path) -> None:
    """One set of control-plane deployments: what `cortex serve` registers from code and what
    `prefect deploy --all` makes from prefect.yaml agree (name, module entrypoint, queue, tags,
    schedule, trigger), so either can run them and neither overwrites the other with something else."""
    import yaml

    from flows.control import control_deployments

    declared = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    made = {d.name: d for d in control_deployments(tmp_path)}
    assert set(made) == set(declared)
    for name, d in made.items():
        want = declared[name]
        assert d.entrypoint == want["entrypoint"], name
        assert (d.work_pool_name, d.work_queue_name) == (
            want["work_pool"]["name"],
            want["work_pool"]["work_queue_name"],
        )
        assert set(d.tags) == set(want["tags"]), name
    reconcile = made["fleet-reconcile"]
    assert reconcile.concurrency_limit == declared["fleet-reconcile"]["concurrency_limit"]
    [schedule] = reconcile.schedules
    assert schedule.schedule.interval.total_seconds() == declared["fleet-reconcile"]["schedules"][0]["interval"]
    [trigger] = reconcile.triggers
    [want] = declared["fleet-reconcile"]["triggers"]
    assert trigger.expect == set(want["expect"])
    assert trigger.match.root == want["match"] and trigger.match_related.root == want["match_related"]
