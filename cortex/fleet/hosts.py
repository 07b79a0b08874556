"""A joined host as the fleet sees it: its inventory, the replicas it runs, and its status.

`cortex host join NAME` publishes a `HostRecord` for its host and refreshes it while the host's
Prefect worker runs; the control plane reads every record to place replicas, and `cortex hosts`
lists them. The record lives in a Prefect Variable named `cortex-host-<name>` (see
`variable_name`), a JSON value that every Prefect client (the host, the control plane, the UI)
reads and writes without registering a block type. Whether a host is up is not in the record:
it comes from its Prefect worker's heartbeat (`host_status`), so a host that dies without
leaving shows `offline` as soon as Prefect says its worker is.

This module is pure: the Prefect calls are in flows/fleet.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from cortex.fleet.inventory import HostInventory
from cortex.spec import MAX_TEXT, Section, format_bytes

VARIABLE_PREFIX = "cortex-host-"
MAX_RECORD_CHARS = 5000  # Prefect's limit on a Variable's JSON value (prefect.types.MAX_VARIABLE_VALUE_LENGTH)

HostStatus = Literal["online", "offline", "no worker"]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


@dataclass(frozen=True, order=True)
class Slot:
    """One replica's place in the fleet: a host, and which of the model's replicas there (its
    instance: 0, 1, ...; a host runs several when a spec has more replicas than hosts). Written
    `<host>` for instance 0 and `<host>_<i>` after, as the replica's name ends and as a
    `FleetApplied` record keys it; host names have no `_`."""

    host: str
    instance: int = 0

    def __str__(self) -> str:
        return self.host if self.instance == 0 else f"{self.host}_{self.instance}"

    @classmethod
    def parse(cls, key: str) -> Slot:
        host, sep, instance = key.partition("_")
        return cls(host, int(instance)) if sep else cls(host)


class HostReplica(Section):
    """A replica a host runs, as its last inventory saw it."""

    name: Text
    model: Text
    engine: Text
    runtime: Text
    endpoint: Text
    # the version it runs, from the host's provenance record of the model (None: no record, or
    # the record is of another replica): 12 hex of the spec file's sha256, of the source's id
    spec_sha256: str | None = Field(default=None, max_length=64)
    source_revision: str | None = Field(default=None, max_length=64)
    # which of the model's replicas on this host it is (cortex.runtime.rollout.instance_of); a
    # record from before instances has none: its one replica of a model is instance 0
    instance: int = Field(default=0, ge=0)

    @property
    def version(self) -> str:
        """`spec <sha> source <rev>`, or "unknown" when the host has no record of it."""
        if self.spec_sha256 is None:
            return "unknown"
        return f"spec {self.spec_sha256[:12]}" + (
            f" source {self.source_revision[:12]}" if self.source_revision else ""
        )


class HostRecord(Section):
    """What a joined host publishes: its inventory, its Prefect pool and queue, its replicas."""

    inventory: HostInventory
    pool: Text = Field(description="the Prefect work pool its worker polls")
    queue: Text = Field(description="its own work queue in that pool (the host's name)")
    replicas: list[HostReplica] = Field(default_factory=list)
    updated_at: datetime

    @property
    def name(self) -> str:
        return self.inventory.name

    def to_variable(self) -> str:
        """The compact JSON stored in the host's Variable; ValueError when it is over Prefect's limit."""
        text = self.model_dump_json(exclude_none=True)
        if len(text) > MAX_RECORD_CHARS:
            raise ValueError(
                f"host {self.name}'s record is {len(text)} characters of JSON, over the "
                f"{MAX_RECORD_CHARS} a Prefect Variable holds ({len(self.inventory.gpus)} GPUs, "
                f"{len(self.replicas)} replicas, {len(self.inventory.labels)} labels); use fewer labels"
            )
        return text


def variable_name(host: str) -> str:
    """The Prefect Variable of a host: names there are lower case letters, digits, - and _."""
    return VARIABLE_PREFIX + re.sub(r"[^a-z0-9_-]", "_", host.lower())


def deployment_name(flow: str, host: str) -> str:
    """`<flow>/<flow's short name>-<host>`: the host's deployment of a flow, e.g. deploy-model/deploy-gpu-1."""
    return f"{flow}/{flow.split('-')[0]}-{host.lower()}"


def host_status(worker_status: str | None) -> HostStatus:
    """A host's status from its Prefect worker's (None: no worker of that name in the pool)."""
    if worker_status is None:
        return "no worker"
    return "online" if worker_status.upper() == "ONLINE" else "offline"


def replica_state(status: HostStatus, routed: dict[str, Any] | None, gateway_answered: bool) -> str:
    """A host's replica as `cortex hosts` shows it. Its record says the replica ran at the
    host's last refresh; when a gateway answers, its view (`GET /admin/replicas`: health checked
    every few seconds) says whether it serves."""
    if not gateway_answered:
        return "running (no gateway answered)" if status == "online" else f"last seen running (host {status})"
    if routed is None:
        return "running, not in the gateway"
    if routed.get("state") == "draining":
        return "draining"
    if routed.get("healthy") is True:
        return "serving"
    if routed.get("healthy") is False:
        return f"unhealthy: {routed.get('reason') or 'failed its health check'}"
    return "registered, not yet checked"


def host_row(
    record: HostRecord,
    status: HostStatus,
    last_heartbeat: datetime | None,
    gateway_replicas: dict[str, dict[str, Any]] | None = None,
) -> dict[str, object]:
    """One host as `cortex hosts` lists it (and its --json). `gateway_replicas`: the gateway's
    replicas by id (a replica's id is its name), None when no gateway answered."""
    inv = record.inventory
    total = sum(g.memory_total_mib for g in inv.gpus) * 2**20
    free = sum(g.memory_free_mib for g in inv.gpus) * 2**20
    answered = gateway_replicas is not None
    return {
        "host": inv.name,
        "status": status,
        "address": inv.address,
        "labels": dict(inv.labels),
        "gpus": len(inv.gpus),
        "gpu_total_bytes": total,
        "gpu_used_bytes": total - free,
        "gpu_free_bytes": free,
        "gpu_memory": [
            {
                "index": i,
                "name": g.name,
                "total_bytes": g.memory_total_mib * 2**20,
                "used_bytes": (g.memory_total_mib - g.memory_free_mib) * 2**20,
                "free_bytes": g.memory_free_mib * 2**20,
            }
            for i, g in enumerate(inv.gpus)
        ],
        "cpu_cores": inv.cpu_cores,
        "ram_free_bytes": inv.ram_bytes,
        "disk_free_bytes": inv.disk_free_bytes,
        "runtimes": list(inv.runtimes),
        "engines": dict(inv.engine_versions),
        "replicas": [r.name for r in record.replicas],
        "replica_states": [
            {
                "name": r.name,
                "model": r.model,
                "engine": r.engine,
                "endpoint": r.endpoint,
                "state": replica_state(status, (gateway_replicas or {}).get(r.name), answered),
            }
            for r in record.replicas
        ],
        "replica_versions": {r.name: r.version for r in record.replicas},
        "models": sorted({r.model for r in record.replicas}),
        "pool": record.pool,
        "queue": record.queue,
        "last_heartbeat": last_heartbeat.isoformat() if last_heartbeat else None,
        "updated_at": record.updated_at.isoformat(),
        "free": free_summary(inv),
        "gpu_summary": gpu_summary(inv),
    }


def gpu_summary(inv: HostInventory) -> str:
    """`2 GPUs: 12.00 GiB used, 148.00 GiB free`: the GPU memory of a host at its last refresh."""
    if not inv.gpus:
        return "no GPU"
    total = sum(g.memory_total_mib for g in inv.gpus) * 2**20
    free = sum(g.memory_free_mib for g in inv.gpus) * 2**20
    n = len(inv.gpus)
    return f"{n} GPU{'s' if n != 1 else ''}: {format_bytes(total - free)} used, {format_bytes(free)} free"


def free_summary(inv: HostInventory) -> str:
    """`2 GPUs, 150.0 GiB free; 16 cores; 120.0 GiB RAM; 1.2 TiB disk`: what a host has free."""
    gpus = len(inv.gpus)
    free = sum(g.memory_free_mib for g in inv.gpus) * 2**20
    parts = [f"{gpus} GPU{'s' if gpus != 1 else ''}, {format_bytes(free)} free" if gpus else "no GPU"]
    parts += [f"{inv.cpu_cores} cores", f"{format_bytes(inv.ram_bytes)} RAM"]
    if inv.disk_free_bytes is not None:
        parts.append(f"{format_bytes(inv.disk_free_bytes)} disk")
    return "; ".join(parts)


ControlKind = Literal["fleet", "local"]


def control_path(hosts: dict[str, HostStatus], pool: str) -> tuple[ControlKind, str]:
    """Where the control plane applies specs, and why. `hosts`: each record in `pool` -> status.

    The fleet, as soon as one host has a Prefect worker in the pool, online or not: with every
    worker offline a spec then fails with the placement trace ("no host ... is online") instead
    of landing on the control plane's own machine by surprise. This machine, when no host has
    one: no record, or only records whose worker never started (`no worker`: nothing can run
    there). That keeps the single-machine path exactly as it was."""
    joined = {h: s for h, s in hosts.items() if s != "no worker"}
    if not joined:
        never = sorted(h for h, s in hosts.items() if s == "no worker")
        return "local", f"no host with a Prefect worker has joined work pool {pool!r}: this machine is the fleet" + (
            f" (records without a worker, ignored: {', '.join(never)})" if never else ""
        )
    online = sorted(h for h, s in joined.items() if s == "online")
    listed = ", ".join(f"{h} ({s})" for h, s in sorted(hosts.items()))
    return "fleet", f"{len(joined)} host(s) joined work pool {pool!r}, {len(online)} online: {listed}"
