"""`cortex compare-engines SPEC`: the spec on llama.cpp and on vLLM side by side, measured.

cortex compare-engines specs/smollm2-135m-instruct.yaml [--runtime process] [--promote] [--json]
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.console import RenderableType

from cli.commands import add_command
from cli.options import SpecArgument
from cli.output import JsonFlag, dict_table, output
from cortex.runtime import RuntimeKind


def register(app: typer.Typer) -> None:
    add_command(
        app,
        run,
        "compare-engines",
        short_help="deploy a spec on llama.cpp and vLLM side by side, benchmark both, pick by the gates",
        help="Run the compare-engines flow on SPEC: deploy it on both engines as <name>-llamacpp and "
        "<name>-vllm, run the spec's benchmark load on each, measure their greedy agreement, print the "
        "table and say whether the measurement agrees with the engine the rules chose. Both replicas are "
        "retired at the end; --promote then deploys the spec under its own name on the winner.",
    )


def run(
    spec: SpecArgument,
    runtime: Annotated[
        Optional[RuntimeKind], typer.Option(help="where both engines run (default: the spec's `runtime`)")
    ] = None,
    promote: Annotated[
        bool,
        typer.Option(
            "--promote",
            help="deploy the spec under its own name on the winner by its gates (the usual gated deploy, "
            "replacing its old replica); without it nothing is kept running",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> int:
    from cli.commands.local_prefect import run_flow
    from flows.compare import compare_engines

    outcome = run_flow(
        f"compare-engines of {spec}",
        compare_engines,
        spec,
        runtime=runtime,
        promote=promote,
        json_errors=as_json,
        context={"spec": spec},
    )
    if outcome.exit_code:
        return outcome.exit_code
    comparison = outcome.result
    output(comparison.model_dump(mode="json"), as_json, lambda _: _render(comparison))
    return 0


def _render(comparison: Any) -> list[RenderableType]:
    return [
        f"{comparison.name}: llama.cpp against vLLM, the same load on both",
        dict_table(comparison.rows(), right=("llama.cpp", "vLLM", "vLLM/llama.cpp")),
        *comparison.lines(),
    ]
