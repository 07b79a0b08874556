"""`cortex schema`: write the spec's JSON Schema (specs/schema.json) for editors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.commands import add_command
from cortex.spec import ModelSpec

DEFAULT_PATH = Path("specs/schema.json")


def schema_text() -> str:
    schema = ModelSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Cortex model spec"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def register(app: typer.Typer) -> None:
    add_command(app, run, "schema", help="write the spec JSON Schema (default specs/schema.json)")


def run(
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write it ('-' prints it)")] = DEFAULT_PATH,
) -> int:
    text = schema_text()
    if str(output) == "-":
        print(text, end="")
    else:
        output.write_text(text)
        print(f"wrote {output}")
    return 0
