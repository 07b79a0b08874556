"""`cortex cache list|prune`: the GGUF artifacts Cortex built, and removing them.

    cortex cache list [--json]
    cortex cache prune (--unused-for DAYS | --key DIGEST... | --all) [--dry-run]

Artifacts live in $CORTEX_CACHE/artifacts/<key>/ (key = sha256 of source id, quantization,
toolchain version). Prune also removes what crashed builds left behind. Downloaded Hub files
stay in the huggingface_hub cache; manage those with `hf cache ls` / `hf cache rm`.
"""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from cli.commands import add_command, group
from cli.output import JsonFlag, output, table


def register(app: typer.Typer) -> None:
    cache = group(app, "cache", help=__doc__.split("\n\n")[0], short_help="list or prune the GGUF artifact cache")
    add_command(cache, run_list, "list", help="list cached artifacts")
    add_command(cache, run_prune, "prune", help="remove cached artifacts (and leftovers of crashed builds)")


def _row(store, a) -> dict:
    from cortex.artifacts import source_origin

    return {
        "key": a.key.digest,
        "quantization": a.key.quantization,
        "toolchain_version": a.key.toolchain_version,
        "source_id": a.key.source_id,
        "source": source_origin(a.source),
        "bytes": a.total_bytes,
        "files": [f.path for f in a.files],
        "last_used": store.last_used(a),
    }


def run_list(as_json: JsonFlag = False) -> int:
    from cortex.artifacts import ArtifactStore

    store = ArtifactStore()
    rows = [_row(store, a) for a in store.list()]
    listing = {"root": str(store.root), "artifacts": rows, "stale_builds": [str(p) for p in store.stale_builds()]}
    output(listing, as_json, _render_list)
    return 0


def _render_list(listing: dict) -> list:
    rows = listing["artifacts"]
    if not rows:
        return [f"no artifacts in {listing['root']}"]
    artifacts = table(
        ("key", "quant", "bytes", "last used", "source"),
        (
            (
                r["key"][:12],
                r["quantization"],
                r["bytes"],
                time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"])),
                f"{r['source']}@{r['source_id'][:12]}",
            )
            for r in rows
        ),
        right=("bytes",),
    )
    return [artifacts, f"{len(rows)} artifacts, {sum(r['bytes'] for r in rows)} bytes in {listing['root']}"]


def run_prune(
    unused_for: Annotated[Optional[float], typer.Option(metavar="DAYS", help="not used for this many days")] = None,
    key: Annotated[Optional[list[str]], typer.Option(metavar="DIGEST", help="this artifact (a prefix will do)")] = None,
    everything: Annotated[bool, typer.Option("--all", help="every artifact")] = False,
    stale_builds: Annotated[bool, typer.Option("--stale-builds", help="only the leftovers of crashed builds")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would go, remove nothing")] = False,
    as_json: JsonFlag = False,
) -> int:
    from cortex.artifacts import ArtifactStore

    chosen = [unused_for is not None, bool(key), everything, stale_builds]
    if sum(chosen) != 1:
        raise typer.BadParameter("give exactly one of them", param_hint="--unused-for, --key, --all, --stale-builds")
    store = ArtifactStore()
    removed, stale = store.prune(
        unused_for_s=unused_for * 86400 if unused_for is not None else None,
        keys=key or [],
        everything=everything,
        dry_run=dry_run,
    )
    verb = "would remove" if dry_run else "removed"
    result = {
        "dry_run": dry_run,
        "artifacts": [_row(store, a) | {"last_used": None} for a in removed]
        if dry_run
        else [a.key.digest for a in removed],
        "stale_builds": [str(p) for p in stale],
    }

    def render(_: dict) -> list[str]:
        lines = [f"{verb} {a.key.digest[:12]} {a.key.quantization} ({a.total_bytes} bytes)" for a in removed]
        lines += [f"{verb} leftover build {p}" for p in stale]
        return lines or ["nothing to remove"]

    output(result, as_json, render)
    return 0
