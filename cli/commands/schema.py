"""`cortex schema`: write the spec's JSON Schema (specs/schema.json) for editors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cortex.spec import ModelSpec

DEFAULT_PATH = Path("specs/schema.json")


def schema_text() -> str:
    schema = ModelSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Cortex model spec"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schema", help="write the spec JSON Schema (default specs/schema.json)")
    p.add_argument("--output", "-o", type=Path, default=DEFAULT_PATH, help="where to write it ('-' prints it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = schema_text()
    if str(args.output) == "-":
        print(text, end="")
    else:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0
