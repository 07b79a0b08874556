"""Serving benchmark for any OpenAI-compatible endpoint, measured as `vllm bench serve` measures.

One module per concern, in the order a benchmark runs:

- `settings`: `BenchmarkSettings`, the load to send (its fields and defaults are the spec's
  `benchmark` section, `cortex.spec.BenchmarkLoad`) and the client's knobs;
- `workload`: the prompts of a level and their send times (closed loop, Poisson, gamma);
- `client`: streams the requests, times each token event, runs the levels (`benchmark`);
- `metrics`: TTFT, TPOT, ITL, E2EL, throughput, goodput and cost by vLLM's definitions,
  and the typed results (`BenchmarkResult`, saved and loaded as JSON);
- `gates`: the spec's SLOs checked against the results (`GatesFailed`);
- `report`: tables and markdown for the terminal and Prefect artifacts.

Everything public is importable from `cortex.bench` itself.
"""

from cortex.bench.client import (
    BenchmarkError,
    benchmark,
    first_model,
    run_benchmark,
    run_level,
    send_streaming_request,
)
from cortex.bench.gates import GateResult, GatesFailed, enforce_gates, evaluate_gates
from cortex.bench.metrics import (
    LATENCY_METRICS,
    PERCENTILES,
    RATE_METRICS,
    BenchmarkResult,
    LevelResult,
    RequestRecord,
    Stats,
    compute_level_metrics,
    cost_per_1m_output_tokens,
)
from cortex.bench.report import format_table, markdown_table, results_markdown, results_table
from cortex.bench.settings import BenchmarkSettings, GoodputSLO
from cortex.bench.workload import Prompt, arrival_offsets, bundled_prompts, make_prompts
from cortex.spec import GateStat, LatencyMetric, RateMetric

__all__ = [
    "LATENCY_METRICS",
    "PERCENTILES",
    "RATE_METRICS",
    "BenchmarkError",
    "BenchmarkResult",
    "BenchmarkSettings",
    "GateResult",
    "GateStat",
    "GatesFailed",
    "GoodputSLO",
    "LatencyMetric",
    "LevelResult",
    "Prompt",
    "RateMetric",
    "RequestRecord",
    "Stats",
    "arrival_offsets",
    "benchmark",
    "bundled_prompts",
    "compute_level_metrics",
    "cost_per_1m_output_tokens",
    "enforce_gates",
    "evaluate_gates",
    "first_model",
    "format_table",
    "make_prompts",
    "markdown_table",
    "results_markdown",
    "results_table",
    "run_benchmark",
    "run_level",
    "send_streaming_request",
]
