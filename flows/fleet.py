"""The fleet on Prefect: hosts join a process work pool, and a spec's replicas run on them.

    join_host(record)       the pool (type process), the host's own work queue, the host's
                            deployments of deploy-model, prepare-model and retire-model on that
                            queue (deploy-model/deploy-<host>, ...), and its
                            record (inventory + replicas) in the Prefect Variable cortex-host-<name>
    publish_record(record)  refresh the record (`cortex host join` does it while its worker runs)
    read_fleet(pool)        every joined host: its record and its worker's status and heartbeat
    remove_host(name)       the host's deployments, queue and record, gone
    fleet_apply(spec_path)  (flow fleet-apply) place the spec's replicas on the online hosts,
                            publish the placement trace, run each replica's deploy as a run of
                            that host's deployment (deploy-model/deploy-<host>), on its queue,
                            and wait for them all

Nothing here polls hosts or keeps a heartbeat: a host is online when Prefect says its worker is
(the worker's own heartbeat), and a run reaches a host because only that host's worker polls its
queue. The deploy runs on the host: the weights are prepared there and its engines start there,
listening on the host's address (CORTEX_ENGINE_HOST, set by `cortex host join --address`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from cortex.fleet.hosts import (
    VARIABLE_PREFIX,
    HostRecord,
    HostStatus,
    deployment_name,
    host_status,
    variable_name,
)
from cortex.fleet.placement import Placement
from cortex.spec import format_bytes
from tasks.common import artifact_key

POOL = "cortex"
# The flows each host has a deployment of, on its own queue: flow name -> entrypoint (a module
# path: the worker imports it from the Cortex installed on the host; nothing is pulled).
HOST_FLOWS = {
    "deploy-model": "flows.deploy.deploy_model",
    "prepare-model": "flows.prepare.prepare_model",
    "retire-model": "flows.deploy.retire_model",
}
DEPLOY_TIMEOUT_S = 4 * 3600.0  # a hang guard for one replica's deploy run (weights can take hours)


class PlacementFailed(RuntimeError):
    """The spec's replicas do not fit the online hosts; the message carries the placement trace."""


@dataclass(frozen=True)
class FleetHost:
    record: HostRecord
    status: HostStatus
    last_heartbeat: datetime | None


def _flow_function(entrypoint: str) -> Any:
    import importlib

    module, _, name = entrypoint.rpartition(".")
    return getattr(importlib.import_module(module), name)


def ensure_pool(client: SyncPrefectClient, pool: str) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass  # another host joined at the same moment


def join_host(record: HostRecord) -> list[str]:
    """Make the pool, the host's queue and its deployments (idempotent), publish its record.
    Returns the deployments' names."""
    from prefect.utilities.callables import parameter_schema

    host = record.name
    made = []
    with get_client(sync_client=True) as client:
        ensure_pool(client, record.pool)
        try:
            client.read_work_queue_by_name(record.queue, work_pool_name=record.pool)
        except ObjectNotFound:
            try:
                client.create_work_queue(record.queue, description=f"Cortex host {host}", work_pool_name=record.pool)
            except ObjectAlreadyExists:
                pass
        for flow_name, entrypoint in HOST_FLOWS.items():
            fn = _flow_function(entrypoint)
            full = deployment_name(flow_name, host)
            client.create_deployment(  # creates or updates the deployment of that name
                client.create_flow_from_name(flow_name),
                full.split("/", 1)[1],
                work_pool_name=record.pool,
                work_queue_name=record.queue,
                entrypoint=entrypoint,
                pull_steps=[],
                tags=["cortex", f"host:{host}"],
                description=f"{flow_name} on host {host} (made by `cortex host join`)",
                parameter_openapi_schema=parameter_schema(fn.fn).model_dump_for_openapi(),
                enforce_parameter_schema=False,
            )
            made.append(full)
    publish_record(record)
    return made


def publish_record(record: HostRecord) -> None:
    from prefect.variables import Variable

    Variable.set(variable_name(record.name), json.loads(record.to_variable()), tags=["cortex", "host"], overwrite=True)


def read_fleet(pool: str = POOL) -> list[FleetHost]:
    """Every host joined to `pool`, by name, with its worker's status."""
    from pydantic import ValidationError

    with get_client(sync_client=True) as client:
        variables = [v for v in client.read_variables() if v.name.startswith(VARIABLE_PREFIX)]
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            workers = {}  # no host has joined yet
        else:
            workers = {w.name: w for w in client.read_workers_for_work_pool(pool)}
    hosts = []
    for variable in variables:
        try:
            record = HostRecord.model_validate(variable.value)
        except ValidationError as e:
            raise ValueError(
                f"Prefect Variable {variable.name} is not a Cortex host record ({e.error_count()} problems, "
                f"first: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}); delete it or join the host again"
            ) from None
        if record.pool != pool:
            continue
        worker = workers.get(record.name)
        hosts.append(
            FleetHost(
                record,
                host_status(worker.status.value if worker is not None else None),
                worker.last_heartbeat_time if worker is not None else None,
            )
        )
    return sorted(hosts, key=lambda h: h.record.name)


def remove_host(name: str, pool: str = POOL) -> list[str]:
    """Delete the host's deployments, its work queue and its record; returns what was removed."""
    removed = []
    with get_client(sync_client=True) as client:
        for flow_name in HOST_FLOWS:
            full = deployment_name(flow_name, name)
            try:
                client.delete_deployment(client.read_deployment_by_name(full).id)
                removed.append(f"deployment {full}")
            except ObjectNotFound:
                pass
        try:
            queue = client.read_work_queue_by_name(name, work_pool_name=pool)
            client.delete_work_queue_by_id(queue.id)
            removed.append(f"work queue {pool}/{name}")
        except ObjectNotFound:
            pass
        try:
            client.delete_variable_by_name(variable_name(name))
            removed.append(f"variable {variable_name(name)}")
        except ObjectNotFound:
            pass
    return removed


def pause_queue(name: str, pool: str = POOL) -> None:
    """No new run reaches the host (its worker stays up for the ones already running)."""
    with get_client(sync_client=True) as client:
        try:
            queue = client.read_work_queue_by_name(name, work_pool_name=pool)
        except ObjectNotFound:
            return
        client.update_work_queue(queue.id, is_paused=True)


def placement_markdown(spec_path: str, placement: Placement, left_out: list[str]) -> str:
    lines = [
        f"## Placement of {placement.model} ({placement.replicas} replica{'s' if placement.replicas != 1 else ''})",
        "",
        f"spec `{spec_path}`",
        "",
        "| host | plan | fits | replicas | left after | why |",
        "|---|---|---|---|---|---|",
    ]
    for t in placement.hosts:
        lines.append(
            f"| {t.host} | {t.plan_summary()} | {'yes' if t.fits else 'NO'} | "
            f"{','.join(map(str, t.replicas)) or '-'} | "
            f"{format_bytes(t.free_after) if t.free_after is not None else '-'} | {t.reason.replace('|', '/')} |"
        )
    lines += [""] + [f"- note: {n}" for n in placement.notes]
    lines += [f"- left out (worker not online): {h}" for h in left_out]
    if not placement.ok:
        lines += ["", f"**Not placed**: {placement.shortfall}"] + [f"- would fit: {w}" for w in placement.would_fit]
    return "\n".join(lines)


def _trace_lines(placement: Placement) -> str:
    return "\n".join(f"  {t.host}: {t.reason}" for t in placement.hosts)


@flow(name="fleet-apply")
def fleet_apply(
    spec_path: str, pool: str = POOL, gateway: bool | None = None, timeout_s: float = DEPLOY_TIMEOUT_S
) -> dict[str, Any]:
    """Place the spec's replicas on the online hosts of `pool` and deploy each on its host (see
    the module docstring). Fails with the placement trace when they do not fit, and when any
    replica's deploy fails (the others keep what they deployed)."""
    from cortex.pipeline import place_spec_file

    logger = get_run_logger()
    path = str(Path(spec_path).expanduser().absolute())
    fleet = read_fleet(pool)
    online = [h for h in fleet if h.status == "online"]
    left_out = [f"{h.record.name} ({h.status})" for h in fleet if h.status != "online"]
    if not online:
        raise PlacementFailed(
            f"no host of work pool {pool!r} is online"
            + (f" (joined: {', '.join(left_out)})" if left_out else "")
            + "; run `cortex host join NAME` on each GPU host"
        )
    spec, placement = place_spec_file(path, [h.record.inventory for h in online])
    create_markdown_artifact(
        key=artifact_key("placement", spec.name),
        markdown=placement_markdown(path, placement, left_out),
        description=f"where {spec.name}'s replicas run, and why",
    )
    if not placement.ok:
        raise PlacementFailed(f"{spec.name}: {placement.shortfall}\n{_trace_lines(placement)}")
    hosts = list(dict.fromkeys(r.host for r in placement.placed))
    if len(hosts) < len(placement.placed):
        # one deploy per host: the replica's name is the launch's and the host's, so a second
        # replica on the same host would be the same replica
        logger.warning(
            "%s: %d replicas placed on %d hosts; replicas that share a host are deployed once",
            spec.name,
            len(placement.placed),
            len(hosts),
        )
    runs: dict[str, UUID] = {}
    for host in hosts:
        run: FlowRun = run_deployment(  # type: ignore[assignment]  # the sync form, outside an event loop
            deployment_name("deploy-model", host),
            parameters={"spec_path": path, "gateway": gateway},
            timeout=0,  # start them all, then wait: the hosts deploy side by side
            tags=[f"model:{spec.name}", f"host:{host}"],
        )
        logger.info("%s: replica on %s is flow run %s", spec.name, host, run.name)
        runs[host] = run.id
    results: dict[str, Any] = {}
    failed: list[str] = []
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        pending = dict(runs)
        while pending:
            for host, run_id in list(pending.items()):
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    del pending[host]
                    if run.state.is_completed():
                        results[host] = {"flow_run": run.name, "state": run.state.name}
                    else:
                        failed.append(f"{host}: {run.state.name}: {run.state.message}")
            if pending and time.monotonic() > deadline:
                failed += [f"{host}: still running after {timeout_s:.0f} s" for host in pending]
                break
            if pending:
                time.sleep(1.0)
    outcome = {
        "model": spec.name,
        "placement": placement.to_json(),
        "deployed": results,  # host -> its deploy run (the replicas are in `cortex hosts` and the gateway)
        "failed": failed,
    }
    if failed:
        raise RuntimeError(f"{spec.name}: deploy failed on " + "; ".join(failed))
    return outcome
