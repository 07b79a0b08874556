"""`cortex status`: what Cortex runs — name, engine, runtime, endpoint, health, since."""

from __future__ import annotations

import argparse
import json
import os

from cortex.runtime import RUNTIMES, get_runtime, reachable_runtimes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="list the engines Cortex runs, with their health",
        description="Every replica Cortex started, in the process runtime and (if a Docker "
        "daemon answers) the docker runtime, with a live health check.",
    )
    parser.add_argument("--runtime", choices=RUNTIMES, default=None, help="only this runtime")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.set_defaults(func=run)


def collect(runtime: str | None = None) -> tuple[list[dict], list[str]]:
    """(rows, notes): one row per replica; notes say which runtimes could not be asked."""
    runtimes, unreachable = ({runtime: get_runtime(runtime)}, {}) if runtime else reachable_runtimes()
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    notes = [f"{kind}: no daemon answers at {where}, so no containers are listed" for kind in unreachable]
    rows = []
    for rt in runtimes.values():
        for replica in rt.list():
            health = rt.health(replica) if rt.is_running(replica) else "exited"
            rows.append({
                "name": replica.model, "replica": replica.name, "engine": replica.engine,
                "runtime": replica.runtime, "endpoint": replica.endpoint, "health": health,
                "since": replica.since,
            })
    return rows, notes


def run(args: argparse.Namespace) -> int:
    rows, notes = collect(args.runtime)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("Cortex runs no engine.")
    else:
        header = ("NAME", "ENGINE", "RUNTIME", "ENDPOINT", "HEALTH", "SINCE", "REPLICA")
        table = [header] + [
            (r["name"], r["engine"], r["runtime"], r["endpoint"], r["health"], r["since"], r["replica"]) for r in rows
        ]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    for note in notes:
        print(f"({note})")
    return 0
