"""`cortex prepare SPEC`: download, convert and quantize what the spec's engine will load.

    cortex prepare specs/smollm2.yaml [--json]

Runs the prepare-model Prefect flow (against PREFECT_API_URL, or Cortex's local Prefect server) and
prints the files it produced. With --json: one object with `files` ({path, bytes, sha256}),
`source_revision` (the commit sha, or a local GGUF's sha256), `cached` and the plan.
"""

from __future__ import annotations


import typer

from cli.commands import add_command
from cli.options import SpecArgument
from cli.output import JsonFlag, output, table


def register(app: typer.Typer) -> None:
    add_command(
        app,
        run,
        "prepare",
        short_help="download, convert and quantize a spec's model into the cache (verified)",
        help="Run the prepare-model flow on SPEC: resolve the source to a commit, plan, "
        "download only the needed files (resumable, sha256-verified), convert and quantize with "
        "the pinned llama.cpp tools when the plan needs a GGUF. A second run reuses the cache.",
    )


def run(
    spec: SpecArgument,
    as_json: JsonFlag = False,
) -> int:
    from cli.commands.local_prefect import run_flow
    from flows.prepare import prepare_model

    outcome = run_flow(f"prepare of {spec}", prepare_model, spec, json_errors=as_json, context={"spec": spec})
    if outcome.exit_code:
        return outcome.exit_code
    output(outcome.result.to_json(), as_json, _render)
    return 0


def _render(result: dict) -> list:
    from rich.padding import Padding

    from cortex.artifacts import source_origin

    files = table(
        ("path", "bytes", "sha256"), ((f["path"], f["bytes"], f["sha256"]) for f in result["files"]), right=("bytes",)
    )
    return [
        f"prepared {result['name']} for {result['engine']}: {result['format']} {result['quantization']}",
        f"  source    {source_origin(result['source'])} -> {result['source_revision']}",
        f"  cached    {'yes (nothing downloaded or built)' if result['cached'] else 'no'}"
        f"; downloaded {result['downloaded_bytes']} bytes; built {', '.join(result['built']) or 'nothing'}",
        f"  load      {result['artifact_path']}",
        Padding(files, (0, 0, 0, 2), expand=False),
    ]
