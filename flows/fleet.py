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
                            and wait for them all; when the model already runs on hosts, roll
                            the new spec over them one replica at a time (cortex.fleet.rollout)
    fleet_reconcile()       (flow fleet-reconcile) re-place the replicas of lost hosts, retire
                            the stale ones of hosts that come back, say what could not be placed

A host gets the spec's text, not its path (no host has the control plane's files): its deploy
writes the text to its own fleet-specs folder and deploys from there. A local path in a fleet
spec must be absolute (or start with ~ or ${VAR}, expanded on each host); a relative one is
refused before anything runs, since it names the spec's folder on the control plane. Several
replicas on one host (more replicas than hosts) are its instances 0, 1, ... (cortex.fleet.hosts.
Slot): each deploy run is told its instance, and each instance is swapped and retired alone.

Nothing here polls hosts or keeps a heartbeat: a host is online when Prefect says its worker is
(the worker's own heartbeat), and a run reaches a host because only that host's worker polls its
queue. The deploy runs on the host: the weights are prepared there and its engines start there,
listening on the host's address (CORTEX_ENGINE_HOST, set by `cortex host join --address`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from cortex.applied import FleetApplied, all_fleet_applied, read_fleet_applied, text_sha256, write_fleet_applied
from cortex.fleet.hosts import (
    VARIABLE_PREFIX,
    HostRecord,
    HostReplica,
    HostStatus,
    Slot,
    deployment_name,
    host_status,
    variable_name,
)
from cortex.fleet.placement import Placement
from cortex.fleet.rollout import FleetStep, new_slots, reconcile_steps, rollout_steps
from cortex.gateway.client import GatewayClient, gateway_client
from cortex.settings import Settings
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
# How long a reconcile waits for a stale replica's retire run: the host may be gone again, and
# then the run waits on its queue and cleans up when the host's worker next polls.
RETIRE_WAIT_S = 300.0


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
        except ObjectAlreadyExists:  # another host joined at the same moment: it is there now
            client.read_work_pool(pool)


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
            except ObjectAlreadyExists:  # made at the same moment by another join of this host
                client.read_work_queue_by_name(record.queue, work_pool_name=record.pool)
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
                removed.append(f"deployment {full} (already gone)")
        try:
            queue = client.read_work_queue_by_name(name, work_pool_name=pool)
            client.delete_work_queue_by_id(queue.id)
            removed.append(f"work queue {pool}/{name}")
        except ObjectNotFound:
            removed.append(f"work queue {pool}/{name} (already gone)")
        try:
            client.delete_variable_by_name(variable_name(name))
            removed.append(f"variable {variable_name(name)}")
        except ObjectNotFound:
            removed.append(f"variable {variable_name(name)} (already gone)")
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


def start_host_run(flow_name: str, host: str, parameters: dict[str, Any], model: str) -> UUID:
    """Start a run of the host's deployment of `flow_name` on its queue; returns the run's id."""
    run: FlowRun = run_deployment(  # type: ignore[assignment]  # the sync form, outside an event loop
        deployment_name(flow_name, host),
        parameters=parameters,
        timeout=0,  # started here, waited for by wait_for_runs
        tags=[f"model:{model}", f"host:{host}"],
    )
    get_run_logger().info("%s: %s on %s is flow run %s", model, flow_name, host, run.name)
    return run.id


def wait_for_runs(runs: dict[str, UUID], timeout_s: float) -> tuple[dict[str, str], dict[str, str]]:
    """Wait for the runs (slot -> run id) to end: ({slot: run name} completed, {slot: why} not)."""
    done: dict[str, str] = {}
    failed: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        pending = dict(runs)
        while pending:
            for host, run_id in list(pending.items()):
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    del pending[host]
                    if run.state.is_completed():
                        done[host] = run.name
                    else:
                        failed[host] = f"{run.state.name}: {run.state.message}"
            if pending and time.monotonic() > deadline:
                failed |= {host: f"still running after {timeout_s:.0f} s" for host in pending}
                break
            if pending:
                time.sleep(1.0)
    return done, failed


def replicas_of(host: FleetHost, model: str) -> list[HostReplica]:
    return [r for r in host.record.replicas if r.model == model]


def held_slots(hosts: list[FleetHost], model: str) -> dict[Slot, list[HostReplica]]:
    """The slots of `hosts` that run a replica of `model` (two during a swap), by host and instance."""
    held: dict[Slot, list[HostReplica]] = {}
    for h in hosts:
        for r in replicas_of(h, model):
            held.setdefault(Slot(h.record.name, r.instance), []).append(r)
    return held


def deploy_parameters(spec_path: str, spec_text: str, instance: int, gateway: bool | None) -> dict[str, Any]:
    """A host's deploy-model run: the spec's text (the host has no file at spec_path), its instance."""
    return {"spec_path": spec_path, "spec_text": spec_text, "instance": instance, "gateway": gateway}


def versions_markdown(model: str, versions: dict[str, str], steps: list[FleetStep], outcome: dict[str, str]) -> str:
    lines = [
        f"## Rollout of {model}",
        "",
        "| replica (host_instance) | step | why | outcome | version it runs |",
        "|---|---|---|---|---|",
    ]
    for step in steps:
        key = str(step.slot)
        lines.append(
            f"| {key} | {step.action} | {step.why.replace('|', '/')} | "
            f"{outcome.get(key, 'not run').replace('|', '/')} | {versions.get(key, '-')} |"
        )
    return "\n".join(lines)


@flow(name="fleet-apply")
def fleet_apply(
    spec_path: str, pool: str = POOL, gateway: bool | None = None, timeout_s: float = DEPLOY_TIMEOUT_S
) -> dict[str, Any]:
    """Place the spec's replicas on the online hosts of `pool` and deploy each on its host (see
    the module docstring). A spec whose model already runs on hosts of the pool is a rolling
    update (cortex.fleet.rollout): one replica at a time, each swapped make-before-break by its
    host's deploy, stopping at the first failure; the result (and the error) says which version
    every replica runs, by slot (`<host>`, `<host>_<instance>`). Fails with the placement trace
    when a new spec does not fit, and with FILE:LINE when a local path in it is relative."""
    from cortex.pipeline import place_spec_text
    from cortex.specfile import fleet_spec_text

    logger = get_run_logger()
    path = str(Path(spec_path).expanduser().absolute())
    text = fleet_spec_text(path)  # read once: what is placed is what the hosts get
    fleet = read_fleet(pool)
    online = [h for h in fleet if h.status == "online"]
    left_out = [f"{h.record.name} ({h.status})" for h in fleet if h.status != "online"]
    if not online:
        raise PlacementFailed(
            f"no host of work pool {pool!r} is online"
            + (f" (joined: {', '.join(left_out)})" if left_out else "")
            + "; run `cortex host join NAME` on each GPU host"
        )
    spec, placement = place_spec_text(text, path, [h.record.inventory for h in online])
    create_markdown_artifact(
        key=artifact_key("placement", spec.name),
        markdown=placement_markdown(path, placement, left_out),
        description=f"where {spec.name}'s replicas run, and why",
    )
    holding = held_slots(online, spec.name)
    if not holding and not placement.ok:
        raise PlacementFailed(f"{spec.name}: {placement.shortfall}\n{_trace_lines(placement)}")
    steps = rollout_steps(placement, list(holding))
    new_version = text_sha256(text)[:12]
    # slot ("h1", "h1_1") -> the version its replica runs
    versions = {str(slot): replicas[0].version for slot, replicas in holding.items()}
    outcome: dict[str, str] = {}
    failed: dict[str, str] = {}

    def deploy(step: FleetStep) -> UUID:
        return start_host_run(
            "deploy-model", step.host, deploy_parameters(path, text, step.instance, gateway), spec.name
        )

    def retire(step: FleetStep) -> UUID:
        return start_host_run("retire-model", step.host, {"name": spec.name, "instance": step.instance}, spec.name)

    if not holding:  # a first apply: nothing serves yet, so the hosts deploy side by side
        runs = {str(s.slot): deploy(s) for s in steps}
        done, failed = wait_for_runs(runs, timeout_s)
        outcome |= {k: f"deployed ({name})" for k, name in done.items()}
        versions |= {k: f"spec {new_version}" for k in done}
    else:  # a rolling update: one replica at a time, stop at the first failure
        for step in steps:
            key = str(step.slot)
            if step.action == "stop-then-deploy":
                logger.warning("%s on %s: %s", spec.name, key, step.why)
                _, stop_failed = wait_for_runs({key: retire(step)}, timeout_s)
                if stop_failed:
                    failed |= stop_failed
                    outcome[key] = "stopping the old replica failed: " + stop_failed[key]
                    break
            run_id = retire(step) if step.action == "retire" else deploy(step)
            done, step_failed = wait_for_runs({key: run_id}, timeout_s)
            if step_failed:
                failed |= step_failed
                outcome[key] = f"{step.action} failed: {step_failed[key]}"
                if step.action == "stop-then-deploy":
                    versions[key] = "none (the old replica was stopped first)"
                break
            outcome[key] = f"{step.action} done ({done[key]})" + (
                "; the old replica was stopped first (N-1 during this swap)"
                if step.action == "stop-then-deploy"
                else ""
            )
            if step.action == "retire":
                versions.pop(key, None)
            else:
                versions[key] = f"spec {new_version}"
            logger.info("%s: %s on %s done; %s", spec.name, step.action, key, versions.get(key, "retired"))
    create_markdown_artifact(
        key=artifact_key("rollout", spec.name),
        markdown=versions_markdown(spec.name, versions, steps, outcome),
        description=f"{spec.name}: each step of the fleet apply, and the version each replica runs",
    )
    serving = {h: v for h, v in versions.items() if not v.startswith("none")}
    record = FleetApplied(
        spec_path=path,
        spec_sha256=new_version,
        name=spec.name,
        pool=pool,
        replicas=spec.replicas,
        hosts={k: v.split()[1] if v.startswith("spec ") else "unknown" for k, v in serving.items()},
        applied_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        spec_text=text,
    )
    write_fleet_applied(record if not failed else record.after_failure(read_fleet_applied(path)))
    failures = [f"{h}: {why}" for h, why in failed.items()]
    result: dict[str, Any] = {
        "model": spec.name,
        "placement": placement.to_json(),
        "steps": [s.to_json() | {"outcome": outcome.get(str(s.slot), "not run")} for s in steps],
        "deployed": {k: o for k, o in outcome.items() if k not in failed},
        "versions": versions,  # slot -> the version its replica runs (spec sha256, source revision)
        "failed": failures,
    }
    if failed:
        raise RuntimeError(
            f"{spec.name}: deploy failed on "
            + "; ".join(failures)
            + ("; the rollout stopped there" if holding else "")
            + ". Versions now: "
            + ", ".join(f"{h}: {v}" for h, v in sorted(versions.items()))
        )
    short = spec.replicas - len(serving)
    if short > 0:
        raise PlacementFailed(
            f"{spec.name}: {len(serving)} of {spec.replicas} replicas run; {placement.shortfall or 'no host left'}\n"
            + _trace_lines(placement)
        )
    return result


@flow(name="fleet-reconcile")
def fleet_reconcile(pool: str = POOL, timeout_s: float = DEPLOY_TIMEOUT_S) -> dict[str, Any]:
    """Keep every spec applied to the fleet (fleet-apply) at its replicas on online hosts: a
    replica whose host is offline or whose engine does not answer in the gateway is placed
    again (cortex.fleet.rollout.reconcile_steps; another host first, or another instance on a
    host that runs one when no other fits), and a host that holds a replica nobody assigned it
    (it was lost and came back) has that instance retired. The hosts get the spec text that was
    applied (kept in its FleetApplied record), not the file as it is now. Started on a schedule
    and by the `prefect.work-queue.not-ready` / `ready` events of the hosts' queues
    (flows/serve.py). Returns, per model, what it kept, placed, retired and could not place,
    by slot (`<host>`, `<host>_<instance>`)."""
    from cortex.facts import facts_for_source
    from cortex.fleet.placement import HostLoad, place
    from cortex.specfile import SpecError, fleet_spec_text, parse_spec_text

    logger = get_run_logger()
    fleet = read_fleet(pool)
    online = {h.record.name: h for h in fleet if h.status == "online"}
    gw = gateway_client(None)
    report: dict[str, Any] = {}
    for applied in [a for a in all_fleet_applied() if a.pool == pool]:
        model = applied.name
        health = _serving(gw, model) if gw is not None else {}
        held = held_slots(list(online.values()), model)
        holding = {slot: any(health.get(r.name, gw is None) for r in replicas) for slot, replicas in held.items()}
        assigned = [Slot.parse(key) for key in applied.hosts]
        steps = reconcile_steps(applied.replicas, assigned, list(online), holding)
        entry: dict[str, Any] = {
            "wanted": applied.replicas,
            "alive": [str(s) for s in steps.alive],
            "placed": [],
            "retired": [],
        }
        entry["not_placed"] = ""
        new: dict[str, str] = {}
        if steps.missing:
            try:  # what was applied; a record from before the text was kept: the file as it is now
                text = applied.spec_text or fleet_spec_text(applied.spec_path)
                spec = parse_spec_text(text, applied.spec_path, base=Path(applied.spec_path).parent)
            except (SpecError, OSError) as e:
                entry["not_placed"] = f"{steps.missing} replicas: the spec cannot be read ({e})"
                report[model] = entry
                logger.error("%s: %s", model, entry["not_placed"])
                continue
            facts = facts_for_source(spec.source, spec_dir=Path(applied.spec_path).parent)
            want = spec.model_copy(update={"replicas": steps.missing})
            per_host: dict[str, int] = {}
            for slot in holding:
                per_host[slot.host] = per_host.get(slot.host, 0) + 1
            load = {h: HostLoad(models=[model] * n) for h, n in per_host.items()}  # spread: empty hosts first
            placement = place(want, facts, [online[h].record.inventory for h in steps.candidates], load)
            slots = new_slots([r.host for r in placement.placed], steps.alive)
            runs = {
                str(s): start_host_run(
                    "deploy-model", s.host, deploy_parameters(applied.spec_path, text, s.instance, None), model
                )
                for s in slots
            }
            done, failed = wait_for_runs(runs, timeout_s)
            version = applied.spec_sha256 if applied.spec_text else text_sha256(text)[:12]
            new = {key: version for key in done}
            entry["placed"] = sorted(new)
            problems = [f"{key}: deploy {why}" for key, why in failed.items()]
            if not placement.ok:
                problems.append(placement.shortfall or "no host fits")
            if len(new) < steps.missing:
                entry["not_placed"] = f"{steps.missing - len(new)} of {steps.missing} missing replicas: " + "; ".join(
                    problems
                )
                logger.error("%s: could not place %s", model, entry["not_placed"])
        retire = [s for s in steps.stale if str(s) not in new]
        if retire:
            runs = {
                str(s): start_host_run("retire-model", s.host, {"name": model, "instance": s.instance}, model)
                for s in retire
            }
            done, failed = wait_for_runs(runs, min(timeout_s, RETIRE_WAIT_S))
            entry["retired"] = sorted(done)
            entry["retire_pending"] = [f"{key}: {why}" for key, why in failed.items()]
        applied.hosts = {str(s): applied.hosts.get(str(s), "unknown") for s in steps.alive} | new
        write_fleet_applied(applied)
        report[model] = entry
        logger.info(
            "%s: %d wanted, alive on %s, placed on %s, retired on %s%s",
            model,
            applied.replicas,
            ", ".join(entry["alive"]) or "none",
            ", ".join(entry["placed"]) or "none",
            ", ".join(entry["retired"]) or "none",
            f"; NOT PLACED: {entry['not_placed']}" if entry["not_placed"] else "",
        )
    if gw is not None:
        gw.close()
    create_markdown_artifact(
        key=artifact_key("fleet-reconcile", pool),
        markdown=reconcile_markdown(pool, report),
        description=f"fleet-reconcile of pool {pool}: what was re-placed, retired, or could not be placed",
    )
    return report


def _serving(gw: GatewayClient, model: str) -> dict[str, bool]:
    """Replica id -> whether the gateway routes to it. A replica it marks unhealthy is asked
    about again a few health intervals later, so that one slow health check on a busy host does
    not count as a lost replica (which would be re-placed and then retired)."""

    def read() -> dict[str, bool]:
        return {r["id"]: bool(r["healthy"]) and r["state"] == "active" for r in gw.replicas_of(model)}

    first = read()
    if all(first.values()):
        return first
    time.sleep(max(2.0, 4 * Settings.load().gateway_health_interval))
    again = read()
    return {rid: first.get(rid, True) or ok for rid, ok in again.items()}


def reconcile_markdown(pool: str, report: dict[str, Any]) -> str:
    lines = [
        f"## Fleet reconcile of pool {pool}",
        "",
        "| model | wanted | alive on | placed on | retired on | not placed |",
        "|---|---|---|---|---|---|",
    ]
    for model, e in sorted(report.items()):
        lines.append(
            f"| {model} | {e['wanted']} | {', '.join(e['alive']) or '-'} | {', '.join(e['placed']) or '-'} | "
            f"{', '.join(e['retired']) or '-'} | {e['not_placed'].replace('|', '/') or '-'} |"
        )
    return "\n".join(lines)
