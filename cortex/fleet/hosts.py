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
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from cortex.fleet.inventory import HostInventory
from cortex.spec import MAX_TEXT, Section, format_bytes

VARIABLE_PREFIX = "cortex-host-"
MAX_RECORD_CHARS = 5000  # Prefect's limit on a Variable's JSON value (prefect.types.MAX_VARIABLE_VALUE_LENGTH)

HostStatus = Literal["online", "offline", "no worker"]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


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


def host_row(record: HostRecord, status: HostStatus, last_heartbeat: datetime | None) -> dict[str, object]:
    """One host as `cortex hosts` lists it (and its --json)."""
    inv = record.inventory
    return {
        "host": inv.name,
        "status": status,
        "address": inv.address,
        "labels": dict(inv.labels),
        "gpus": len(inv.gpus),
        "gpu_free_bytes": sum(g.memory_free_mib for g in inv.gpus) * 2**20,
        "cpu_cores": inv.cpu_cores,
        "ram_free_bytes": inv.ram_bytes,
        "disk_free_bytes": inv.disk_free_bytes,
        "runtimes": list(inv.runtimes),
        "engines": dict(inv.engine_versions),
        "replicas": [r.name for r in record.replicas],
        "replica_versions": {r.name: r.version for r in record.replicas},
        "models": sorted({r.model for r in record.replicas}),
        "pool": record.pool,
        "queue": record.queue,
        "last_heartbeat": last_heartbeat.isoformat() if last_heartbeat else None,
        "updated_at": record.updated_at.isoformat(),
        "free": free_summary(inv),
    }


def free_summary(inv: HostInventory) -> str:
    """`2 GPUs, 150.0 GiB free; 16 cores; 120.0 GiB RAM; 1.2 TiB disk`: what a host has free."""
    gpus = len(inv.gpus)
    free = sum(g.memory_free_mib for g in inv.gpus) * 2**20
    parts = [f"{gpus} GPU{'s' if gpus != 1 else ''}, {format_bytes(free)} free" if gpus else "no GPU"]
    parts += [f"{inv.cpu_cores} cores", f"{format_bytes(inv.ram_bytes)} RAM"]
    if inv.disk_free_bytes is not None:
        parts.append(f"{format_bytes(inv.disk_free_bytes)} disk")
    return "; ".join(parts)
