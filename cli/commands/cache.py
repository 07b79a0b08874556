"""`cortex cache list|prune`: the GGUF artifacts Cortex built, and removing them.

    cortex cache list [--json]
    cortex cache prune (--unused-for DAYS | --key DIGEST... | --all) [--dry-run]

Artifacts live in $CORTEX_CACHE/artifacts/<key>/ (key = sha256 of source id, quantization,
toolchain version). Prune also removes what crashed builds left behind. Downloaded Hub files
stay in the huggingface_hub cache; manage those with `hf cache ls` / `hf cache rm`.
"""

from __future__ import annotations

import argparse
import json
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cache", help="list or prune the GGUF artifact cache",
                                   description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="list cached artifacts")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(func=run_list)
    prune = sub.add_parser("prune", help="remove cached artifacts (and leftovers of crashed builds)")
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--unused-for", type=float, metavar="DAYS", help="not used for this many days")
    which.add_argument("--key", action="append", default=[], metavar="DIGEST", help="this artifact (a prefix will do)")
    which.add_argument("--all", action="store_true", help="every artifact")
    which.add_argument("--stale-builds", action="store_true", help="only the leftovers of crashed builds")
    prune.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    prune.add_argument("--json", action="store_true", help="print one JSON object")
    prune.set_defaults(func=run_prune)


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


def run_list(args: argparse.Namespace) -> int:
    from cortex.artifacts import ArtifactStore

    store = ArtifactStore()
    rows = [_row(store, a) for a in store.list()]
    if args.json:
        print(json.dumps({"root": str(store.root), "artifacts": rows,
                          "stale_builds": [str(p) for p in store.stale_builds()]}, indent=2))
        return 0
    if not rows:
        print(f"no artifacts in {store.root}")
        return 0
    print(f"{'key':<14} {'quant':<7} {'bytes':>12}  {'last used':<16}  source")
    for r in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))
        print(f"{r['key'][:12]:<14} {r['quantization']:<7} {r['bytes']:>12}  {used:<16}  {r['source']}@{r['source_id'][:12]}")
    print(f"{len(rows)} artifacts, {sum(r['bytes'] for r in rows)} bytes in {store.root}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from cortex.artifacts import ArtifactStore

    store = ArtifactStore()
    removed, stale = store.prune(
        unused_for_s=args.unused_for * 86400 if args.unused_for is not None else None,
        keys=args.key, everything=args.all, dry_run=args.dry_run,
    )
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "artifacts": [_row(store, a) | {"last_used": None} for a in removed]
                          if args.dry_run else [a.key.digest for a in removed],
                          "stale_builds": [str(p) for p in stale]}, indent=2))
        return 0
    for a in removed:
        print(f"{verb} {a.key.digest[:12]} {a.key.quantization} ({a.total_bytes} bytes)")
    for p in stale:
        print(f"{verb} leftover build {p}")
    if not removed and not stale:
        print("nothing to remove")
    return 0
