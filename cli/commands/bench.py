"""`cortex bench`: benchmark a served model (through the gateway) or an engine's base URL.

    cortex bench TARGET [--concurrency 1,4,16] [--requests N] [--input-len N] [--output-len N]
                        [--request-rate R] [--burstiness B] [--max-duration S] [--prompts random|bundled]
                        [--model NAME] [--api-key KEY] [--save DIR] [--json]

TARGET with a scheme (http://...) is an engine's (or any OpenAI-compatible server's) base
URL; otherwise it is a model name served by the gateway at CORTEX_GATEWAY_URL, with the
client key from --api-key or CORTEX_API_KEY.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.commands import add_command
from cli.output import JsonFlag, dict_table, output
from cortex.bench import BenchmarkError, BenchmarkSettings, benchmark, results_table
from cortex.progress import Reporter
from cortex.spec import PromptSet


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint="--concurrency"
        ) from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"concurrency levels must be integers >= 1, got {text!r}", param_hint="--concurrency")
    return values


@dataclass(frozen=True)
class Load:
    """What `--concurrency ... --api-key` say: the load to offer and whom to ask."""

    settings: BenchmarkSettings
    model: str | None
    api_key: str | None


_D = BenchmarkSettings()  # the defaults are the spec's (cortex.spec.BenchmarkLoad)


def _option(name: str, kind: Any, default: Any, **option: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, typer.Option(**option)]
    )


# The load options `bench` and `compare` share, one line each.
LOAD_OPTIONS = [
    _option("concurrency", str, ",".join(map(str, _D.concurrency)), help="comma-separated concurrency levels"),
    _option("requests", int, _D.requests, help="requests per level"),
    _option("input_len", int, _D.input_len, help="prompt tokens"),
    _option("output_len", int, _D.output_len, help="output tokens"),
    _option(
        "request_rate",
        Optional[float],
        _D.request_rate,
        help="requests per second (default: closed loop at each concurrency)",
    ),
    _option("burstiness", float, _D.burstiness, help="1 = Poisson arrivals, else gamma shape"),
    _option("max_duration", float, _D.max_duration_s, help="seconds per level at most"),
    _option("prompts", PromptSet, _D.prompts, help="random tokens, or the bundled prompt set"),
    _option("gpu_hour_price", float, _D.gpu_hour_price_usd, help="USD per GPU-hour, for cost per 1M tokens"),
    _option("gpus", int, _D.gpus, help="GPUs the deployment holds (for cost)"),
    _option("model", Optional[str], None, help="model name to request (default: the first the endpoint lists)"),
    _option("api_key", Optional[str], None, help="API key (default: $CORTEX_API_KEY)"),
]


def takes_load(fn: Callable[..., int]) -> Callable[..., int]:
    """`fn(..., load: Load)` as a command taking the load options instead of `load`."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "load"]

    @functools.wraps(fn)
    def command(*args: Any, **options: Any) -> int:
        o = {p.name: options.pop(p.name) for p in LOAD_OPTIONS}
        settings = BenchmarkSettings(
            concurrency=_int_list(o["concurrency"]),
            requests=o["requests"],
            input_len=o["input_len"],
            output_len=o["output_len"],
            request_rate=o["request_rate"],
            burstiness=o["burstiness"],
            max_duration_s=o["max_duration"],
            prompts=o["prompts"],
            gpu_hour_price_usd=o["gpu_hour_price"],
            gpus=o["gpus"],
        )
        return fn(*args, **options, load=Load(settings, o["model"], o["api_key"]))

    command.__signature__ = inspect.Signature(own + LOAD_OPTIONS)  # type: ignore[attr-defined]
    return command


def register(app: typer.Typer) -> None:
    add_command(
        app,
        takes_load(run),
        "bench",
        short_help="benchmark an endpoint: TTFT, TPOT, ITL, throughput per concurrency level",
        help="Benchmark an OpenAI-compatible endpoint with vLLM's metric definitions "
        "(streamed /v1/completions). TARGET is a base URL (http://host:port) or a model name "
        "served by the gateway.",
    )


def resolve_target(target: str, model: str | None, api_key: str | None) -> tuple[str, str | None, str | None]:
    """(base_url, model, api_key) for a URL or a gateway model name."""
    from cortex.settings import Settings

    settings = Settings.load()
    api_key = api_key or settings.api_key
    if "://" in target:
        return target, model, api_key
    return settings.gateway_url, model or target, api_key


def run(
    target: Annotated[str, typer.Argument(metavar="TARGET", help="base URL, or a model name behind the gateway")],
    save: Annotated[
        Optional[str], typer.Option(metavar="DIR", help="write results.json and chart.png into DIR")
    ] = None,
    as_json: JsonFlag = False,
    *,
    load: Load,
) -> int:
    base_url, model, api_key = resolve_target(target, load.model, load.api_key)

    def say_level(level) -> None:
        if not as_json:
            print(
                f"  concurrency {level.concurrency}: {level.output_tokens_per_s:.1f} out tok/s, "
                f"{level.completed} ok, {level.errors} errors",
                file=sys.stderr,
            )

    try:
        result = benchmark(
            base_url,
            load.settings,
            model=model,
            api_key=api_key,
            target=target,
            on_level=say_level,
            progress=Reporter(),
        )
    except BenchmarkError as exc:
        print(f"cortex bench: {exc}", file=sys.stderr)
        return 1
    if save:
        from cortex.charts import save_chart

        result.save(Path(save) / "results.json")
        save_chart(result, Path(save) / "chart.png")

    def render(_: dict) -> list:
        lines: list = [
            f"{result.model} at {result.base_url}{result.endpoint}",
            dict_table(rows := results_table(result), right=list(rows[0])[1:] if rows else ()),
        ]
        if save:
            lines.append(f"saved {save}/results.json and {save}/chart.png")
        return lines

    output(result.summary(), as_json, render)
    return 0 if all(lv.completed for lv in result.levels) else 1
