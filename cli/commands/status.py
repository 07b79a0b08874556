"""`cortex status [NAME]`: what Cortex runs — name, engine, runtime, endpoint, health, since;
with --json also each replica's memory, planned against what its engine reported at start, and
its provenance record (cortex.provenance)."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from cli.commands import add_command
from cortex.runtime import RuntimeKind
from cli.output import JsonFlag, output, table
from cortex.actual import read_memory_record
from cortex.provenance import read_record_json
from cortex.runtime import get_runtime, reachable_runtimes


def register(app: typer.Typer) -> None:
    add_command(
        app,
        run,
        "status",
        short_help="list the engines Cortex runs, with their health",
        help="Every replica Cortex started, in the process runtime and (if a Docker "
        "daemon answers) the docker runtime, with a live health check; NAME shows one model's. "
        "--json adds each replica's memory (the plan's bytes per device against the engine's report) "
        "and its provenance record (source commit and file sha256s, GGUF, toolchain, engine, launch, plan, "
        "test results).",
    )


def collect(runtime: str | None = None) -> tuple[list[dict], list[str]]:
    """(rows, notes): one row per replica; notes say which runtimes could not be asked."""
    runtimes, unreachable = ({runtime: get_runtime(runtime)}, {}) if runtime else reachable_runtimes()
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    notes = [f"{kind}: no daemon answers at {where}, so no containers are listed" for kind in unreachable]
    rows = []
    for rt in runtimes.values():
        for replica in rt.list():
            health = rt.health(replica) if rt.is_running(replica) else "exited"
            rows.append(
                {
                    "name": replica.model,
                    "replica": replica.name,
                    "engine": replica.engine,
                    "runtime": replica.runtime,
                    "endpoint": replica.endpoint,
                    "health": health,
                    "since": replica.since,
                    "memory": read_memory_record(replica.name),
                    "provenance": _provenance(replica.model, replica.name),
                }
            )
    return rows, notes


def _provenance(model: str, replica: str) -> dict | None:
    """The model's provenance record if it describes this replica (a replica being replaced,
    or one started by `roll-out` alone, has none)."""
    record = read_record_json(model)
    if record is None or record.get("replica", replica) != replica:
        return None
    return record


COLUMNS = ("name", "engine", "runtime", "endpoint", "health", "since", "replica")


def run(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="only this model (its served name)")] = None,
    runtime: Annotated[Optional[RuntimeKind], typer.Option(help="only this runtime")] = None,
    as_json: JsonFlag = False,
) -> int:
    rows, notes = collect(runtime)
    if name is not None:
        rows = [r for r in rows if r["name"] == name]
        if not rows:
            print(f"cortex status: no replica of model {name!r} is running (see `cortex status`)", file=sys.stderr)
            return 1

    def render(rows: list[dict]) -> list:
        listing = (
            table([c.upper() for c in COLUMNS], ([r[c] for c in COLUMNS] for r in rows))
            if rows
            else "Cortex runs no engine."
        )
        return [listing, *(f"({note})" for note in notes)]

    output(rows, as_json, render)
    return 0
