"""`cortex bench`: benchmark a served model (through the gateway) or an engine's base URL.

    cortex bench TARGET [--concurrency 1,4,16] [--requests N] [--input-len N] [--output-len N]
                        [--request-rate R] [--burstiness B] [--max-duration S] [--prompts random|bundled]
                        [--model NAME] [--api-key KEY] [--save DIR] [--json]

TARGET with a scheme (http://...) is an engine's (or any OpenAI-compatible server's) base
URL; otherwise it is a model name served by the gateway at CORTEX_GATEWAY_URL, with the
client key from --api-key or CORTEX_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import get_args

from cortex.bench import (
    BenchmarkError,
    BenchmarkSettings,
    benchmark,
    format_table,
    results_table,
)
from cortex.spec import PromptSet


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrency levels must be integers >= 1, got {text!r}")
    return values


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchmarkSettings()  # the defaults are the spec's (cortex.spec.BenchmarkLoad)
    levels = ",".join(map(str, d.concurrency))
    parser.add_argument("--concurrency", type=_int_list, default=d.concurrency,
                        help=f"comma-separated concurrency levels (default: {levels})")
    parser.add_argument("--requests", type=int, default=d.requests, help=f"requests per level (default {d.requests})")
    parser.add_argument("--input-len", type=int, default=d.input_len, help=f"prompt tokens (default {d.input_len})")
    parser.add_argument("--output-len", type=int, default=d.output_len, help=f"output tokens (default {d.output_len})")
    parser.add_argument("--request-rate", type=float, default=d.request_rate,
                        help="requests per second (default: closed loop at each concurrency)")
    parser.add_argument("--burstiness", type=float, default=d.burstiness, help="1 = Poisson arrivals, else gamma shape")
    parser.add_argument("--max-duration", type=float, default=d.max_duration_s, help="seconds per level at most")
    parser.add_argument("--prompts", choices=get_args(PromptSet), default=d.prompts)
    parser.add_argument("--gpu-hour-price", type=float, default=d.gpu_hour_price_usd,
                        help="USD per GPU-hour, for cost per 1M tokens")
    parser.add_argument("--gpus", type=int, default=d.gpus, help="GPUs the deployment holds (for cost)")
    parser.add_argument("--model", default=None, help="model name to request (default: the first the endpoint lists)")
    parser.add_argument("--api-key", default=None, help="API key (default: $CORTEX_API_KEY)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark an endpoint: TTFT, TPOT, ITL, throughput per concurrency level",
        description="Benchmark an OpenAI-compatible endpoint with vLLM's metric definitions "
        "(streamed /v1/completions). TARGET is a base URL (http://host:port) or a model name "
        "served by the gateway.",
    )
    parser.add_argument("target", metavar="TARGET", help="base URL, or a model name behind the gateway")
    add_load_arguments(parser)
    parser.add_argument("--save", metavar="DIR", default=None, help="write results.json and chart.png into DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object with a `levels` list")
    parser.set_defaults(func=run)


def resolve_target(target: str, model: str | None, api_key: str | None) -> tuple[str, str | None, str | None]:
    """(base_url, model, api_key) for a URL or a gateway model name."""
    from cortex.settings import Settings

    settings = Settings.load()
    api_key = api_key or settings.api_key
    if "://" in target:
        return target, model, api_key
    return settings.gateway_url, model or target, api_key


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    return BenchmarkSettings(
        concurrency=args.concurrency, requests=args.requests, input_len=args.input_len,
        output_len=args.output_len, request_rate=args.request_rate, burstiness=args.burstiness,
        max_duration_s=args.max_duration, prompts=args.prompts,
        gpu_hour_price_usd=args.gpu_hour_price, gpus=args.gpus,
    )


def run(args: argparse.Namespace) -> int:
    base_url, model, api_key = resolve_target(args.target, args.model, args.api_key)
    settings = settings_from_args(args)

    def progress(level) -> None:
        if not args.json:
            print(f"  concurrency {level.concurrency}: {level.output_tokens_per_s:.1f} out tok/s, "
                  f"{level.completed} ok, {level.errors} errors", file=sys.stderr)

    try:
        result = benchmark(base_url, settings, model=model, api_key=api_key, target=args.target, on_level=progress)
    except BenchmarkError as exc:
        print(f"cortex bench: {exc}", file=sys.stderr)
        return 1
    if args.save:
        from pathlib import Path

        from cortex.charts import save_chart

        folder = Path(args.save)
        result.save(folder / "results.json")
        save_chart(result, folder / "chart.png")
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(f"{result.model} at {result.base_url}{result.endpoint}")
        print(format_table(results_table(result)))
        if args.save:
            print(f"saved {args.save}/results.json and {args.save}/chart.png")
    return 0 if all(lv.completed for lv in result.levels) else 1
