"""`cortex deploy SPEC`: prepare, launch, test and route a model; replace its old replica.

    cortex deploy specs/smollm2.yaml [--runtime docker|process] [--json]
"""

from __future__ import annotations

import argparse
import json

from cortex.runtime import RUNTIMES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="deploy a spec: prepare, launch, smoke-test, route, replace the old replica",
        description="Run the deploy-model flow on SPEC. A new replica replaces the model's old "
        "one only after it is healthy, has passed the smoke tests and is routed; if any step "
        "fails it is removed and the old one keeps serving.",
    )
    parser.add_argument("spec", help="path to the model's YAML spec")
    parser.add_argument("--runtime", choices=RUNTIMES, default=None,
                        help="where the engine runs (default: the spec's `runtime`)")
    gateway = parser.add_mutually_exclusive_group()
    gateway.add_argument("--gateway", dest="gateway", action="store_true", default=None,
                         help="require the gateway (CORTEX_GATEWAY_URL) and register there")
    gateway.add_argument("--no-gateway", dest="gateway", action="store_false",
                         help="do not register in the gateway even if one runs")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cli.commands.local_prefect import run_flow
    from flows.deploy import deploy_model

    outcome = run_flow(f"deploy of {args.spec}", deploy_model, args.spec, runtime=args.runtime,
                       gateway=args.gateway, json_errors=args.json, context={"spec": args.spec})
    if outcome.exit_code:
        return outcome.exit_code
    result = outcome.result.to_json()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    smoke = result["smoke"]
    print(f"deployed {result['name']} ({result['engine']}, {result['runtime']}) as {result['replica']}")
    print(f"  endpoint  {result['endpoint']}/v1")
    print(f"  gateway   {result['gateway']}")
    print(f"  smoke     {'passed' if smoke['passed'] else 'FAILED'} ({len(smoke['checks'])} checks)")
    for check in smoke["checks"]:
        print(f"    {check['name']:<12} {check['detail']}")
    if result["stopped"]:
        print(f"  replaced  {', '.join(result['stopped'])}")
    return 0
