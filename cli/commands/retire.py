"""`cortex retire NAME`: drain a model from the gateway, then stop and remove its replicas."""

from __future__ import annotations

import argparse
import json

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
    from cli.commands.local_prefect import run_flow
    from flows.deploy import retire_model

    outcome = run_flow(f"retire {args.name}", retire_model, args.name, runtime=args.runtime,
                       json_errors=args.json, context={"name": args.name})
    if outcome.exit_code:
        return outcome.exit_code
    stopped = outcome.result
    if args.json:
        print(json.dumps({"name": args.name, "stopped": stopped}))
    else:
        for name in stopped:
            print(f"stopped and removed {name}")
    return 0
