"""`cortex deploy SPEC`: prepare, launch, test and route a model; replace its old replica.

cortex deploy specs/smollm2.yaml [--runtime docker|process] [--json]
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from cli.commands import add_command
from cli.options import SpecArgument
from cortex.runtime import RuntimeKind
from cli.output import JsonFlag, output


def register(app: typer.Typer) -> None:
    add_command(
        app,
        run,
        "deploy",
        short_help="deploy a spec: prepare, launch, smoke-test, route, replace the old replica",
        help="Run the deploy-model flow on SPEC. A new replica replaces the model's old "
        "one only after it is healthy, has passed the smoke tests and is routed; if any step "
        "fails it is removed and the old one keeps serving. With --fleet: run the fleet-apply flow "
        "instead: place the spec's replicas on the hosts joined with `cortex host join` (online "
        "workers only) and deploy each on its host.",
    )


def run(
    spec: SpecArgument,
    runtime: Annotated[
        Optional[RuntimeKind], typer.Option(help="where the engine runs (default: the spec's `runtime`)")
    ] = None,
    gateway: Annotated[
        Optional[bool],
        typer.Option(
            "--gateway/--no-gateway",
            show_default=False,
            help="require the gateway (CORTEX_GATEWAY_URL) and register there / do not register even if one runs "
            "(default: register if one runs)",
        ),
    ] = None,
    fleet: Annotated[
        bool,
        typer.Option("--fleet", help="place the replicas on the joined hosts and deploy there (flow fleet-apply)"),
    ] = False,
    pool: Annotated[str, typer.Option(help="with --fleet: the hosts' Prefect work pool")] = "cortex",
    as_json: JsonFlag = False,
) -> int:
    from cli.commands.local_prefect import run_flow
    from flows.deploy import deploy_model

    if fleet:
        if runtime is not None:
            print("cortex deploy: --runtime is per host; with --fleet the spec's `runtime` is used", file=sys.stderr)
            return 2
        from flows.fleet import fleet_apply

        done = run_flow(
            f"fleet deploy of {spec}",
            fleet_apply,
            spec,
            pool=pool,
            gateway=gateway,
            json_errors=as_json,
            context={"spec": spec},
        )
        if done.exit_code:
            return done.exit_code
        output(done.result, as_json, _render_fleet)
        return 0

    outcome = run_flow(
        f"deploy of {spec}",
        deploy_model,
        spec,
        runtime=runtime,
        gateway=gateway,
        json_errors=as_json,
        context={"spec": spec},
    )
    if outcome.exit_code:
        return outcome.exit_code
    output(outcome.result.to_json(), as_json, _render)
    return 0


def _render_fleet(result: dict) -> list[str]:
    lines = [f"applied {result['model']} to the fleet: {len(result['deployed'])} step(s)"]
    for step in result["steps"]:
        lines.append(f"  {step['replica']}: {step['action']}: {step['outcome']}")
    lines += [f"  {replica} runs {version}" for replica, version in sorted(result["versions"].items())]
    return lines


def _render(result: dict) -> list[str]:
    smoke = result["smoke"]
    lines = [
        f"deployed {result['name']} ({result['engine']}, {result['runtime']}) as {result['replica']}",
        f"  endpoint  {result['endpoint']}/v1",
        f"  gateway   {result['gateway']}",
        f"  smoke     {'passed' if smoke['passed'] else 'FAILED'} ({len(smoke['checks'])} checks)",
    ]
    lines += [f"    {check['name']:<12} {check['detail']}" for check in smoke["checks"]]
    if result["stopped"]:
        lines.append(f"  replaced  {', '.join(result['stopped'])}")
    return lines
