"""`cortex compare A B`: two benchmark results side by side, with B/A ratios.

A and B are each a results JSON file (from `cortex bench --save`, or a deploy's results.json)
or a target to benchmark now (a base URL, or a model name behind the gateway), both with the
same load. The seed's migration check: the same model on vLLM and on llama.cpp, or at two
quantization types.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import RenderableType

from cli.commands import add_command
from cli.commands.bench import Load, resolve_target, takes_load
from cli.output import JsonFlag, dict_table, output
from cortex.bench import BenchmarkError, BenchmarkResult, benchmark
from cortex.bench.compare import COLUMNS, cell, compare_levels, judge, same_load


def register(app: typer.Typer) -> None:
    add_command(
        app,
        takes_load(run),
        "compare",
        short_help="two benchmark results (files or targets) side by side, with ratios",
        help="Compare two deployments of a model. A and B are results JSON files or "
        "targets to benchmark now with the same load (base URL or gateway model name).",
    )


def load_or_measure(ref: str, load: Load) -> BenchmarkResult:
    path = Path(ref)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise BenchmarkError(f"no results file at {path}")
        return BenchmarkResult.load(path)
    base_url, model, api_key = resolve_target(ref, load.model, load.api_key)
    return benchmark(base_url, load.settings, model=model, api_key=api_key, target=ref)


def format_comparison(a: BenchmarkResult, b: BenchmarkResult, rows: list[dict[str, Any]]) -> list[RenderableType]:
    lines = [f"A: {a.target} ({a.model}, {a.tool})", f"B: {b.target} ({b.model}, {b.tool})"]
    if not same_load(a, b):
        lines.append("warning: A and B were measured with different prompt or output lengths")
    table = []
    for row in rows:
        for label, _, higher_better in COLUMNS:
            values = row[label]
            ratio = values["b/a"]
            verdict = judge(label, ratio, higher_better)
            table.append(
                {
                    "conc": row["concurrency"],
                    "metric": label,
                    "A": cell(values["a"]),
                    "B": cell(values["b"]),
                    "B/A": "-" if ratio is None else f"{ratio:.2f}x",
                    "": verdict,
                }
            )
    lines.append("(B better / B worse: by 5% or more)")
    return [*lines, dict_table(table, right=("conc", "A", "B", "B/A")) if table else "(no concurrency level in common)"]


def run(
    a: Annotated[str, typer.Argument(metavar="A", help="results JSON file, base URL, or gateway model name")],
    b: Annotated[str, typer.Argument(metavar="B", help="results JSON file, base URL, or gateway model name")],
    chart: Annotated[Optional[str], typer.Option(metavar="PNG", help="write both into one chart")] = None,
    as_json: JsonFlag = False,
    *,
    load: Load,
) -> int:
    try:
        result_a = load_or_measure(a, load)
        result_b = load_or_measure(b, load)
    except BenchmarkError as exc:
        print(f"cortex compare: {exc}", file=sys.stderr)
        return 1
    rows = compare_levels(result_a, result_b)
    if chart:
        from cortex.charts import save_chart

        save_chart([result_a, result_b], chart, title=f"A: {result_a.target}  vs  B: {result_b.target}")
    output(
        {"a": result_a.summary(), "b": result_b.summary(), "levels": rows},
        as_json,
        lambda _: format_comparison(result_a, result_b, rows),
    )
    return 0 if rows else 1
