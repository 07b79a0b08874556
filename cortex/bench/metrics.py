"""The numbers of a benchmark, computed as `vllm bench serve` computes them.

The definitions follow vLLM's `vllm/benchmarks/serve.py` (`calculate_metrics`), so numbers
from Cortex and from vLLM's own tool mean the same thing:

- every streamed message that carries `choices` is a token event; TTFT is the time from
  sending the request to the first one, ITL every gap between consecutive ones, and the
  end-to-end latency (E2EL) the time to the last one (the client records them:
  `cortex.bench.client`);
- TPOT of a request is (E2EL - TTFT) / (output tokens - 1), only for requests with more
  than one output token;
- output tokens are the server's `usage.completion_tokens` (requested with
  `stream_options.include_usage`); without usage, the number of content chunks;
- throughputs divide by the wall time of the whole level (first send to last answer);
- goodput is the rate of requests that meet every SLO that is set (TPOT counts as 0 for a
  one-token answer);
- statistics are mean, std, and numpy's linear-interpolated percentiles 50, 90 and 99.

Pure: request records in, typed results out; `BenchmarkResult` saves and loads as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

import numpy as np
from pydantic import BaseModel, Field

from cortex.bench.settings import BenchmarkSettings
from cortex.spec import LatencyMetric, RateMetric

PERCENTILES = (50, 90, 99)
LATENCY_METRICS: tuple[str, ...] = get_args(LatencyMetric)
RATE_METRICS: tuple[str, ...] = get_args(RateMetric)


class Stats(BaseModel):
    """Summary of one per-request (or per-token-gap) metric, in milliseconds."""

    n: int = 0
    mean: float | None = None
    std: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> "Stats":
        if not values:
            return cls()
        ms = np.asarray(values, dtype=float) * 1000.0
        p50, p90, p99 = (float(np.percentile(ms, p)) for p in PERCENTILES)
        return cls(n=len(ms), mean=float(ms.mean()), std=float(ms.std()), p50=p50, p90=p90, p99=p99)

    def get(self, stat: str) -> float | None:
        if stat not in ("mean", "std", "p50", "p90", "p99"):
            raise ValueError(f"unknown statistic {stat!r}; use mean, p50, p90 or p99")
        return getattr(self, stat)


class LevelResult(BaseModel):
    """The measurement of one load level."""

    concurrency: int
    request_rate: float | None = None
    burstiness: float = 1.0
    requests_planned: int
    requests_sent: int
    completed: int
    errors: int
    cancelled: int = Field(0, description="still in flight at the time bound")
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    goodput_per_s: float | None = None
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2el_ms: Stats
    cost_per_1m_output_tokens_usd: float | None = None
    output_tokens_counted_by: Literal["usage", "chunks", "mixed", "none"] = "none"
    error_samples: list[str] = Field(default_factory=list)

    def value(self, metric: str, stat: str = "p99") -> float | None:
        """One number of this level, as gates name it (`ttft_ms`+`p99`, `requests_per_s`)."""
        if metric in LATENCY_METRICS:
            return getattr(self, metric).get(stat)
        if metric in RATE_METRICS:
            return getattr(self, metric)
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(LATENCY_METRICS + RATE_METRICS)}")


class BenchmarkResult(BaseModel):
    """A whole benchmark run: what was measured, with what load, and each level's numbers."""

    target: str
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    started_at: str
    tool: str = "cortex"
    settings: BenchmarkSettings
    levels: list[LevelResult]

    def level(self, concurrency: int) -> LevelResult | None:
        for lv in self.levels:
            if lv.concurrency == concurrency:
                return lv
        return None

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_json(cls, text: str) -> "BenchmarkResult":
        return cls.model_validate_json(text)

    @classmethod
    def load(cls, path: str | Path) -> "BenchmarkResult":
        return cls.from_json(Path(path).read_text())

    def summary(self) -> dict[str, Any]:
        """The compact shape `cortex bench --json` prints."""
        keep = ("mean", "p50", "p90", "p99")
        levels = []
        for lv in self.levels:
            levels.append(
                {
                    "concurrency": lv.concurrency,
                    "request_rate": lv.request_rate,
                    "completed": lv.completed,
                    "errors": lv.errors,
                    "cancelled": lv.cancelled,
                    "duration_s": lv.duration_s,
                    "output_tokens_per_s": lv.output_tokens_per_s,
                    "requests_per_s": lv.requests_per_s,
                    "total_tokens_per_s": lv.total_tokens_per_s,
                    "goodput_per_s": lv.goodput_per_s,
                    "ttft_ms": {k: getattr(lv.ttft_ms, k) for k in keep},
                    "tpot_ms": {k: getattr(lv.tpot_ms, k) for k in keep},
                    "itl_ms": {k: getattr(lv.itl_ms, k) for k in keep},
                    "e2el_ms": {k: getattr(lv.e2el_ms, k) for k in keep},
                    "cost_per_1m_output_tokens_usd": lv.cost_per_1m_output_tokens_usd,
                }
            )
        return {"target": self.target, "model": self.model, "levels": levels}


@dataclass
class RequestRecord:
    """What the client saw of one streamed request. Times are seconds (perf_counter)."""

    success: bool = False
    error: str = ""
    start_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    output_tokens_from_usage: bool = False
    text: str = ""


def cost_per_1m_output_tokens(output_tokens_per_s: float, gpu_hour_price_usd: float | None, gpus: int) -> float | None:
    """USD per million output tokens at a measured throughput (the seed's cost analysis)."""
    if gpu_hour_price_usd is None or output_tokens_per_s <= 0:
        return None
    usd_per_s = gpu_hour_price_usd * max(gpus, 1) / 3600.0
    return usd_per_s / output_tokens_per_s * 1_000_000


def compute_level_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    *,
    concurrency: int,
    settings: BenchmarkSettings,
    requests_planned: int | None = None,
    cancelled: int = 0,
) -> LevelResult:
    """Turn request records into one level's numbers, by vLLM's `calculate_metrics` rules."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    ttfts, tpots, all_tpots, itls, e2els = [], [], [], [], []
    total_in = total_out = 0
    for r in ok:
        out = r.output_tokens
        total_out += out
        total_in += r.prompt_tokens
        tpot = 0.0
        if out > 1:
            tpot = (r.latency - r.ttft) / (out - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)  # a one-token answer counts as TPOT 0 for goodput, as in vLLM
        itls.extend(r.itl)
        ttfts.append(r.ttft)
        e2els.append(r.latency)

    slo = settings.goodput_slo
    goodput = None
    if slo.is_set():
        good = 0
        for ttft, tpot, e2el in zip(ttfts, all_tpots, e2els):
            if slo.ttft_ms is not None and ttft * 1000 > slo.ttft_ms:
                continue
            if slo.tpot_ms is not None and tpot * 1000 > slo.tpot_ms:
                continue
            if slo.e2el_ms is not None and e2el * 1000 > slo.e2el_ms:
                continue
            good += 1
        goodput = good / duration_s

    from_usage = {r.output_tokens_from_usage for r in ok}
    counted_by = (
        "none" if not ok else "usage" if from_usage == {True} else "chunks" if from_usage == {False} else "mixed"
    )
    out_tps = total_out / duration_s
    samples: list[str] = []
    for r in failed:
        if r.error and r.error not in samples:
            samples.append(r.error)
        if len(samples) >= 5:
            break
    return LevelResult(
        concurrency=concurrency,
        request_rate=settings.request_rate,
        burstiness=settings.burstiness,
        requests_planned=requests_planned if requests_planned is not None else len(records) + cancelled,
        requests_sent=len(records) + cancelled,
        completed=len(ok),
        errors=len(failed),
        cancelled=cancelled,
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        requests_per_s=len(ok) / duration_s,
        output_tokens_per_s=out_tps,
        total_tokens_per_s=(total_in + total_out) / duration_s,
        goodput_per_s=goodput,
        ttft_ms=Stats.of_seconds(ttfts),
        tpot_ms=Stats.of_seconds(tpots),
        itl_ms=Stats.of_seconds(itls),
        e2el_ms=Stats.of_seconds(e2els),
        cost_per_1m_output_tokens_usd=cost_per_1m_output_tokens(out_tps, settings.gpu_hour_price_usd, settings.gpus),
        output_tokens_counted_by=counted_by,
        error_samples=samples,
    )
