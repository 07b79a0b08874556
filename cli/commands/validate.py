"""`cortex validate PATH...`: check spec files; every problem as FILE:LINE: field: message."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cli.commands import add_command
from cortex.specfile import SpecError, load_spec, spec_files


def register(app: typer.Typer) -> None:
    add_command(
        app,
        run,
        "validate",
        short_help="check spec files (exit 2 if any is invalid)",
        help="Check spec files or folders of specs. Exit 0 when all are valid, 2 otherwise.",
    )


def run(
    paths: Annotated[list[str], typer.Argument(metavar="PATH", help="spec files or folders holding *.yaml specs")],
) -> int:
    files = spec_files(paths)
    if not files:
        print(f"{' '.join(paths)}: no spec files (*.yaml, *.yml) found", file=sys.stderr)
        return 2
    bad = 0
    for f in files:
        try:
            spec = load_spec(f)
        except SpecError as e:
            bad += 1
            for problem in e.problems:
                print(problem, file=sys.stderr)
            continue
        print(f"{f}: ok ({spec.name}, source {spec.source.kind}, engine {spec.engine})")
    if bad:
        print(f"{bad} of {len(files)} spec(s) invalid", file=sys.stderr)
        return 2
    return 0
