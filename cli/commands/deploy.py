"""`cortex deploy SPEC`: prepare, launch, test and route a model; replace its old replica.

cortex deploy specs/smollm2.yaml [--runtime docker|process] [--json]
"""

from __future__ import annotations

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
        "fails it is removed and the old one keeps serving.",
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
    as_json: JsonFlag = False,
) -> int:
    from cli.commands.local_prefect import run_flow
    from flows.deploy import deploy_model

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
