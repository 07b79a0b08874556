"""Options more than one command takes, declared once (`--json` is in `cli.output`)."""

from __future__ import annotations

from typing import Annotated

import typer


SpecArgument = Annotated[str, typer.Argument(metavar="SPEC", help="path to the model's YAML spec")]
