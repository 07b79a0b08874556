"""The `cortex` subcommands, one module each; each has `register(app)` adding its commands.

Command functions return an exit code; `add_command` turns it into the process's exit status
(and Ctrl-C into 130, as a shell does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer


def add_command(app: typer.Typer, fn: Callable[..., int | None], name: str, **kwargs: Any) -> None:
    @functools.wraps(fn)
    def command(*args: Any, **options: Any) -> None:
        try:
            code = fn(*args, **options)
        except KeyboardInterrupt:
            code = 130
        if code:
            raise typer.Exit(int(code))

    app.command(name, **kwargs)(command)


def group(app: typer.Typer, name: str, help: str, **kwargs: Any) -> typer.Typer:
    """A command with actions (`cortex cache list|prune`)."""
    sub = typer.Typer(help=help, no_args_is_help=True, **kwargs)
    app.add_typer(sub, name=name)
    return sub
