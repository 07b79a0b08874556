"""`cortex retire NAME`: drain a model from the gateway, then stop and remove its replicas."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.commands import add_command
from cortex.runtime import RuntimeKind
from cli.output import JsonFlag, output


def register(app: typer.Typer) -> None:
    add_command(
        app,
        run,
        "retire",
        short_help="stop and remove every replica of a model",
        help="Run the retire-model flow: drain NAME's replicas from the gateway (if one "
        "runs), stop them gracefully and remove them; remove the gateway routes of NAME's replicas "
        "whose engine already died.",
    )


def run(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the served model name (see `cortex status`)")],
    runtime: Annotated[
        Optional[RuntimeKind],
        typer.Option(help="look only in this runtime (default: process, and docker if a daemon answers)"),
    ] = None,
    as_json: JsonFlag = False,
) -> int:
    from cli.commands.local_prefect import run_flow
    from flows.deploy import retire_model

    outcome = run_flow(
        f"retire {name}", retire_model, name, runtime=runtime, json_errors=as_json, context={"name": name}
    )
    if outcome.exit_code:
        return outcome.exit_code
    output(
        {"name": name, "stopped": outcome.result},
        as_json,
        lambda result: [f"retired {replica}" for replica in result["stopped"]],
    )
    return 0
