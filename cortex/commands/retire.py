"""`cortex retire NAME`: drain a model from the gateway, then stop and remove its replicas."""

from __future__ import annotations

import argparse
import json
import os
import sys

from cortex.runtime import RUNTIMES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retire",
        help="stop and remove every replica of a model",
        description="Run the retire-model flow: drain NAME's replicas from the gateway (if one "
        "runs), stop them gracefully and remove them.",
    )
    parser.add_argument("name", help="the served model name (see `cortex status`)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=None,
                        help="look only in this runtime (default: process, and docker if a daemon answers)")
    parser.add_argument("--json", action="store_true", help="print the stopped replicas as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # On a busy 2-core machine Prefect's ephemeral API server can take longer than its
    # default 20 s to start; a deploy is worth the wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.deploy import retire_model

    state = retire_model(args.name, runtime=args.runtime, return_state=True)
    try:
        stopped = state.result()
    except Exception as exc:
        print(f"retire {args.name} failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"name": args.name, "stopped": stopped}))
    else:
        for name in stopped:
            print(f"stopped and removed {name}")
    return 0
