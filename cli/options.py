"""Options more than one command takes, declared once (`--json` is in `cli.output`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import typer

from cortex.runtime import RUNTIMES


def runtime_option(help: str) -> Any:
    """`--runtime docker|process`, absent by default."""
    return Annotated[Optional[Literal[RUNTIMES]], typer.Option(help=help)]  # type: ignore[valid-type]


SpecArgument = Annotated[str, typer.Argument(metavar="SPEC", help="path to the model's YAML spec")]
