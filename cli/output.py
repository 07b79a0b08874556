"""How every command prints: `--json` declared once, JSON or a Rich table from the same data.

A listing builds its rows once; `output(data, as_json, render)` prints them as JSON with
--json, else prints what `render` makes of them (a Rich table, text lines). Tables go through
one console whose width does not depend on a terminal, so piped output is not wrapped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.table import Table

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of text (one object or list)")]


def console() -> Console:
    # markup off: cells hold model names and flags like `[llama.cpp]`, never Rich markup.
    # Wide when piped, so a test or `grep` sees each row on one line.
    return Console(
        markup=False, highlight=False, emoji=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240
    )


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], right: Collection[str] = ()) -> Table:
    """A borderless Rich table; the columns named in `right` (numbers) are right-aligned."""
    t = Table(box=None, header_style="bold", pad_edge=False)
    for name in columns:
        t.add_column(name, justify="right" if name in right else "left")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def dict_table(rows: Sequence[dict[str, Any]], right: Collection[str] = ()) -> Table:
    """A table whose columns are the first row's keys."""
    columns = list(rows[0]) if rows else []
    return table(columns, ([r.get(c) for c in columns] for r in rows), right=right)


def show(*renderables: RenderableType) -> None:
    console().print(*renderables)


def output(data: Any, as_json: bool, render: Callable[[Any], RenderableType | Iterable[RenderableType] | None]) -> None:
    """Print `data` as JSON with --json, else what `render(data)` returns (a table, a line, or several)."""
    if as_json:
        print_json(data)
        return
    rendered = render(data)
    if rendered is None:
        return
    if isinstance(rendered, (str, Table)) or not isinstance(rendered, Iterable):
        rendered = [rendered]
    for part in rendered:
        show(part)
