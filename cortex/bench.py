"""Serving benchmark for any OpenAI-compatible endpoint, measured as `vllm bench serve` measures.

The definitions follow vLLM's `vllm/benchmarks/serve.py` (`calculate_metrics`) and its
OpenAI completions request function, so numbers from Cortex and from vLLM's own tool mean
the same thing:

- every streamed message that carries `choices` is a token event; TTFT is the time from
  sending the request to the first one, ITL every gap between consecutive ones, and the
  end-to-end latency (E2EL) the time to the last one;
- TPOT of a request is (E2EL - TTFT) / (output tokens - 1), only for requests with more
  than one output token;
- output tokens are the server's `usage.completion_tokens` (requested with
  `stream_options.include_usage`); without usage, the number of content chunks;
- throughputs divide by the wall time of the whole level (first send to last answer);
- goodput is the rate of requests that meet every SLO that is set (TPOT counts as 0 for a
  one-token answer);
- statistics are mean, std, and numpy's linear-interpolated percentiles 50, 90 and 99.

One deliberate difference: vLLM reads `usage` only from a message without `choices`;
llama-server puts `usage` into the last message beside `choices`, so vLLM falls back to
re-tokenizing the text there. Cortex reads `usage` wherever it appears, which is the
server's own count.

Load: for each concurrency level, a fixed number of requests, either all at once (closed
loop: at most `concurrency` in flight) or arriving at `request_rate` per second with
Poisson (burstiness 1) or gamma inter-arrival times, still capped at `concurrency`.
A level stops sending at `max_duration_s` and cancels what is still in flight.

Prompts are random token ids sent as a token-id prompt (exactly `input_len` tokens without
needing a tokenizer here) or a bundled set of English prompts. Output length is fixed with
`ignore_eos` (llama-server and vLLM both accept it).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import httpx
import numpy as np
from pydantic import BaseModel, Field

PERCENTILES = (50, 90, 99)

LatencyMetric = Literal["ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"]
RateMetric = Literal["output_tokens_per_s", "requests_per_s", "goodput_per_s"]
GateStat = Literal["mean", "p50", "p90", "p99"]
LATENCY_METRICS: tuple[str, ...] = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
RATE_METRICS: tuple[str, ...] = ("output_tokens_per_s", "requests_per_s", "goodput_per_s")


class BenchmarkError(RuntimeError):
    """The benchmark could not run (endpoint unreachable, misconfigured, every request failed)."""


# --------------------------------------------------------------------------- settings


class GoodputSLO(BaseModel):
    """Per-request service level objectives; a request that meets all set ones is 'good'."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))


class BenchmarkSettings(BaseModel):
    """What load to send. Mirrors the spec's `benchmark` section plus the GPU count for cost."""

    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16])
    requests: int = Field(32, ge=1, description="requests per concurrency level")
    input_len: int = Field(128, ge=1, description="prompt tokens (random prompts)")
    output_len: int = Field(64, ge=1, description="tokens to generate per request")
    request_rate: float | None = Field(None, gt=0, description="req/s; None = closed loop")
    burstiness: float = Field(1.0, gt=0, description="1.0 = Poisson, otherwise gamma shape")
    max_duration_s: float = Field(300.0, gt=0, description="time bound per level")
    prompts: Literal["random", "bundled"] = "random"
    gpu_hour_price_usd: float | None = Field(None, ge=0)
    gpus: int = Field(1, ge=0, description="GPUs the deployment holds, for cost")
    goodput_slo: GoodputSLO = Field(default_factory=GoodputSLO)
    ignore_eos: bool = Field(True, description="generate exactly output_len tokens")
    seed: int = 0
    warmup: bool = Field(True, description="one unmeasured request first, as vLLM does")
    request_timeout_s: float = 600.0
    # Random prompt token ids are drawn from this range: above the special tokens most
    # vocabularies put first, below the size of the smallest common vocabulary (32k).
    token_id_low: int = 1000
    token_id_high: int = 30000

    @classmethod
    def from_spec(cls, benchmark: Any, *, gpus: int = 1, **overrides: Any) -> "BenchmarkSettings":
        """Build settings from the spec's `benchmark` section (a pydantic model or a mapping)."""
        if benchmark is None:
            data: dict[str, Any] = {}
        elif isinstance(benchmark, Mapping):
            data = dict(benchmark)
        elif hasattr(benchmark, "model_dump"):
            data = benchmark.model_dump()
        else:
            data = dict(vars(benchmark))
        known = set(cls.model_fields)
        data = {k: v for k, v in data.items() if k in known and v is not None}
        slo = data.get("goodput_slo")
        if slo is not None and not isinstance(slo, (Mapping, GoodputSLO)):
            data["goodput_slo"] = slo.model_dump() if hasattr(slo, "model_dump") else vars(slo)
        data["gpus"] = gpus
        data.update(overrides)
        return cls.model_validate(data)


# --------------------------------------------------------------------------- results


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
        raise ValueError(
            f"unknown metric {metric!r}; use one of {', '.join(LATENCY_METRICS + RATE_METRICS)}"
        )


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


# --------------------------------------------------------------------------- pure metrics


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


def cost_per_1m_output_tokens(
    output_tokens_per_s: float, gpu_hour_price_usd: float | None, gpus: int
) -> float | None:
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
        cost_per_1m_output_tokens_usd=cost_per_1m_output_tokens(
            out_tps, settings.gpu_hour_price_usd, settings.gpus
        ),
        output_tokens_counted_by=counted_by,
        error_samples=samples,
    )


def arrival_offsets(
    n: int, request_rate: float | None, burstiness: float = 1.0, *, rng: np.random.Generator | None = None
) -> list[float]:
    """Send times (seconds from the start) of n requests, as vLLM's `get_request` draws them.

    None (or inf) means all at once. Otherwise gamma inter-arrival times with shape
    `burstiness` and mean 1/rate (burstiness 1 is a Poisson process), rescaled so the last
    request is sent at exactly n/rate, which removes the run-to-run spread of the sum.
    """
    if n <= 0:
        return []
    if request_rate is None or math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    rng = rng or np.random.default_rng(0)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / request_rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    offsets = np.cumsum(gaps)
    offsets *= (n / request_rate) / offsets[-1]
    return [float(x) for x in offsets]


@dataclass(frozen=True)
class Prompt:
    """One request's prompt: token ids (exact length) or text (length known from usage)."""

    prompt: list[int] | str
    expected_len: int | None


def bundled_prompts() -> list[str]:
    """The short English prompts shipped with Cortex (benchmark and quality check)."""
    text = resources.files("cortex").joinpath("data/prompts.json").read_text()
    return list(json.loads(text)["prompts"])


def make_prompts(settings: BenchmarkSettings, n: int, *, seed: int) -> list[Prompt]:
    """n prompts for one level. Random prompts differ per seed, so no level or run hits
    another's prompt cache."""
    if settings.prompts == "bundled":
        texts = bundled_prompts()
        rnd = random.Random(seed)
        start = rnd.randrange(len(texts))
        return [Prompt(texts[(start + i) % len(texts)], None) for i in range(n)]
    if settings.token_id_high - settings.token_id_low < 2:
        raise ValueError("token_id_high must exceed token_id_low")
    rng = np.random.default_rng(seed)
    ids = rng.integers(settings.token_id_low, settings.token_id_high, size=(n, settings.input_len))
    return [Prompt([int(t) for t in row], settings.input_len) for row in ids]


# --------------------------------------------------------------------------- the client


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _payload(model: str, prompt: Prompt, settings: BenchmarkSettings) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt.prompt,
        "max_tokens": settings.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.ignore_eos:
        body["ignore_eos"] = True
    return body


class _StaleConnection(Exception):
    """The server closed a kept-alive connection as the request went out: nothing was processed."""


async def send_streaming_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: Mapping[str, str]
) -> RequestRecord:
    """POST one streaming completion and time its token events. Never raises for a failed
    request: the failure is part of the measurement (`success=False`, `error`).

    A request that meets a kept-alive connection the server has just closed (llama-server
    closes idle ones after a few seconds) is sent once more on a fresh connection, with a fresh
    clock: the server never saw it, so it is a client artifact, not a server error."""
    try:
        return await _stream_once(client, url, body, headers)
    except _StaleConnection:
        return await _stream_once(client, url, body, headers, retry=False)


async def _stream_once(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: Mapping[str, str], retry: bool = True
) -> RequestRecord:
    rec = RequestRecord()
    if isinstance(body.get("prompt"), list):
        rec.prompt_tokens = len(body["prompt"])
    content_chunks = 0
    usage_tokens: int | None = None
    first = True
    responded = False
    st = time.perf_counter()
    rec.start_time = st
    last = st
    try:
        async with client.stream("POST", url, json=body, headers=dict(headers)) as resp:
            responded = True
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                rec.error = f"HTTP {resp.status_code}: {detail}"
                return rec
            async for line in resp.aiter_lines():
                line = line.strip()
                # SSE comments (pings) start with ':'; only data lines carry messages.
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    continue
                ts = time.perf_counter()
                msg = json.loads(data)
                if msg.get("error"):
                    rec.error = f"server error in stream: {json.dumps(msg['error'])[:300]}"
                    return rec
                choices = msg.get("choices")
                if choices:
                    if first:
                        rec.ttft = ts - st
                        first = False
                    else:
                        rec.itl.append(ts - last)
                    last = ts
                    text = choices[0].get("text")
                    if text is None:  # a chat-style delta, if a server answers that way
                        text = (choices[0].get("delta") or {}).get("content")
                    if text:
                        rec.text += text
                        content_chunks += 1
                usage = msg.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        rec.prompt_tokens = int(usage["prompt_tokens"])
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        if retry and not responded:
            raise _StaleConnection() from exc
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    if first:
        rec.error = "the stream ended without a single token event"
        return rec
    rec.success = True
    rec.latency = last - st
    if usage_tokens is not None:
        rec.output_tokens = usage_tokens
        rec.output_tokens_from_usage = True
    else:
        rec.output_tokens = content_chunks
    return rec


def _completions_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return f"{base}/v1/completions"


async def first_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    """The first model the endpoint lists, as vLLM picks it when no model is given."""
    base = base_url.rstrip("/").removesuffix("/v1")
    url = f"{base}/v1/models"
    try:
        resp = await client.get(url, headers=_headers(api_key))
    except httpx.HTTPError as exc:
        raise BenchmarkError(f"cannot reach {url}: {exc}. Is the endpoint running?") from exc
    if resp.status_code != 200:
        raise BenchmarkError(f"GET {url} answered {resp.status_code}: {resp.text[:200]}")
    data = resp.json().get("data") or []
    if not data:
        raise BenchmarkError(f"{url} lists no models; pass the model name explicitly")
    return str(data[0]["id"])


async def run_level(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompts: Sequence[Prompt],
    concurrency: int,
    settings: BenchmarkSettings,
    headers: Mapping[str, str],
    *,
    arrivals: Sequence[float] | None = None,
) -> LevelResult:
    """Send one level's requests with its load shape and measure it."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    offsets = list(arrivals) if arrivals is not None else [0.0] * len(prompts)
    sem = asyncio.Semaphore(concurrency)

    async def limited(p: Prompt) -> RequestRecord:
        async with sem:
            return await send_streaming_request(client, url, _payload(model, p, settings), headers)

    tasks: list[asyncio.Task[RequestRecord]] = []
    start = time.perf_counter()
    deadline = start + settings.max_duration_s

    async def dispatch() -> None:
        for p, offset in zip(prompts, offsets):
            wait = start + offset - time.perf_counter()
            if start + offset >= deadline:
                return
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(limited(p)))

    dispatcher = asyncio.create_task(dispatch())
    try:
        await asyncio.wait_for(asyncio.shield(dispatcher), timeout=settings.max_duration_s)
    except asyncio.TimeoutError:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
    remaining = max(0.0, deadline - time.perf_counter())
    done, pending = (await asyncio.wait(tasks, timeout=remaining)) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    duration = time.perf_counter() - start
    records = [t.result() for t in tasks if t in done]
    return compute_level_metrics(
        records,
        duration,
        concurrency=concurrency,
        settings=settings,
        requests_planned=len(prompts),
        cancelled=len(pending),
    )


async def run_benchmark(
    base_url: str,
    settings: BenchmarkSettings | None = None,
    *,
    model: str | None = None,
    api_key: str | None = None,
    target: str | None = None,
    on_level: Any = None,
) -> BenchmarkResult:
    """Benchmark an OpenAI-compatible endpoint at each concurrency level of `settings`.

    `base_url` is the server root (with or without `/v1`); `model` defaults to the first
    one the endpoint lists. `on_level(level_result)` is called after each level.
    """
    settings = settings or BenchmarkSettings()
    url = _completions_url(base_url)
    headers = _headers(api_key)
    max_conc = max(settings.concurrency)
    limits = httpx.Limits(max_connections=max_conc + 2, max_keepalive_connections=max_conc + 2)
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        model = model or await first_model(client, base_url, api_key)
        if settings.warmup:
            # Like vLLM's initial test run: proves the endpoint and settings work before
            # any number is taken, and is not measured.
            probe = make_prompts(settings, 1, seed=settings.seed + 7919)[0]
            rec = await send_streaming_request(client, url, _payload(model, probe, settings), headers)
            if not rec.success:
                raise BenchmarkError(
                    f"the first test request to {url} (model {model!r}) failed: {rec.error}"
                )
        levels: list[LevelResult] = []
        for i, conc in enumerate(settings.concurrency):
            seed = settings.seed + 1000 * (i + 1)
            prompts = make_prompts(settings, settings.requests, seed=seed)
            arrivals = arrival_offsets(
                settings.requests, settings.request_rate, settings.burstiness,
                rng=np.random.default_rng(seed),
            )
            level = await run_level(client, url, model, prompts, conc, settings, headers, arrivals=arrivals)
            levels.append(level)
            if on_level is not None:
                on_level(level)
    return BenchmarkResult(
        target=target or base_url,
        base_url=base_url,
        model=model,
        started_at=started,
        settings=settings,
        levels=levels,
    )


def benchmark(base_url: str, settings: BenchmarkSettings | None = None, **kwargs: Any) -> BenchmarkResult:
    """Blocking form of `run_benchmark` for flows, tasks and the command line."""
    return asyncio.run(run_benchmark(base_url, settings, **kwargs))


# --------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class GateResult:
    """One gate checked at one level."""

    metric: str
    stat: str | None
    concurrency: int | None
    value: float | None
    max: float | None
    min: float | None
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class GatesFailed(RuntimeError):
    """A benchmark gate failed; the message lists every failed gate with its measured value."""

    def __init__(self, failed: Sequence[GateResult]):
        self.failed = list(failed)
        lines = "\n".join(f"  - {g.message}" for g in self.failed)
        super().__init__(f"{len(self.failed)} benchmark gate(s) failed:\n{lines}")


def _gate_field(gate: Any, name: str, default: Any = None) -> Any:
    if isinstance(gate, Mapping):
        return gate.get(name, default)
    return getattr(gate, name, default)


def evaluate_gates(results: BenchmarkResult, gates: Sequence[Any]) -> list[GateResult]:
    """Check each gate (`metric`, `stat`, `concurrency`, `max`, `min`) against the results.

    A gate without a concurrency applies to every level. A level that was not measured,
    a value that could not be measured (no successful request), or a level with failed
    requests under a latency gate all fail the gate: a gate never passes for lack of data.
    """
    out: list[GateResult] = []
    for gate in gates:
        metric = _gate_field(gate, "metric")
        stat = _gate_field(gate, "stat", "p99") or "p99"
        conc = _gate_field(gate, "concurrency")
        vmax = _gate_field(gate, "max")
        vmin = _gate_field(gate, "min")
        if metric not in LATENCY_METRICS + RATE_METRICS:
            raise ValueError(f"gate metric {metric!r} is not one of {LATENCY_METRICS + RATE_METRICS}")
        if vmax is None and vmin is None:
            raise ValueError(f"gate on {metric} sets neither max nor min")
        shown_stat = stat if metric in LATENCY_METRICS else None
        name = f"{metric}.{stat}" if shown_stat else metric
        bound = " and ".join(
            s for s in (f"<= {vmax:g}" if vmax is not None else "", f">= {vmin:g}" if vmin is not None else "") if s
        )
        levels = results.levels if conc is None else [results.level(conc)]
        if conc is not None and levels[0] is None:
            out.append(GateResult(metric, shown_stat, conc, None, vmax, vmin, False,
                                  f"{name} at concurrency {conc}: level not measured "
                                  f"(measured: {[lv.concurrency for lv in results.levels]}); must be {bound}"))
            continue
        for lv in levels:
            assert lv is not None
            value = lv.value(metric, stat)
            where = f"{name} at concurrency {lv.concurrency}"
            if value is None:
                passed, msg = False, f"{where}: no value ({lv.completed} of {lv.requests_planned} requests completed); must be {bound}"
            else:
                passed = (vmax is None or value <= vmax) and (vmin is None or value >= vmin)
                msg = f"{where} = {value:.2f}; must be {bound}: {'ok' if passed else 'FAILED'}"
            out.append(GateResult(metric, shown_stat, lv.concurrency, value, vmax, vmin, passed, msg))
    return out


def enforce_gates(results: BenchmarkResult, gates: Sequence[Any]) -> list[GateResult]:
    """Evaluate the gates and raise `GatesFailed` with the numbers when any fails."""
    checked = evaluate_gates(results, gates)
    failed = [g for g in checked if not g.passed]
    if failed:
        raise GatesFailed(failed)
    return checked


# --------------------------------------------------------------------------- reports


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def results_table(results: BenchmarkResult) -> list[dict[str, Any]]:
    """One row per level, for a Prefect table artifact or a terminal table."""
    rows = []
    for lv in results.levels:
        rows.append(
            {
                "concurrency": lv.concurrency,
                "completed": lv.completed,
                "errors": lv.errors,
                "req/s": round(lv.requests_per_s, 3),
                "out tok/s": round(lv.output_tokens_per_s, 2),
                "TTFT p50 ms": _fmt(lv.ttft_ms.p50),
                "TTFT p99 ms": _fmt(lv.ttft_ms.p99),
                "TPOT p50 ms": _fmt(lv.tpot_ms.p50),
                "TPOT p99 ms": _fmt(lv.tpot_ms.p99),
                "ITL p99 ms": _fmt(lv.itl_ms.p99),
                "E2EL p99 ms": _fmt(lv.e2el_ms.p99),
                "goodput req/s": _fmt(lv.goodput_per_s, 3),
                "USD / 1M out tok": _fmt(lv.cost_per_1m_output_tokens_usd, 2),
            }
        )
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain aligned text table."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "_no rows_"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def results_markdown(results: BenchmarkResult, gates: Sequence[GateResult] | None = None) -> str:
    """A markdown summary: load, the table, and the gates with their measured values."""
    s = results.settings
    load = (
        "closed loop" if s.request_rate is None
        else f"{s.request_rate:g} req/s ({'Poisson' if s.burstiness == 1.0 else f'gamma, burstiness {s.burstiness:g}'})"
    )
    parts = [
        f"# Benchmark: {results.model}",
        f"Target `{results.target}` ({results.base_url}{results.endpoint}), started {results.started_at}.",
        f"Load: {s.requests} requests per level, {load}, prompts {s.prompts}"
        f"{f' of {s.input_len} tokens' if s.prompts == 'random' else ''}, {s.output_len} output tokens"
        f"{' (ignore_eos)' if s.ignore_eos else ''}, at most {s.max_duration_s:g} s per level.",
        "Metrics as `vllm bench serve` defines them (TTFT, TPOT excluding the first token, ITL, E2EL).",
        "",
        markdown_table(results_table(results)),
    ]
    if s.gpu_hour_price_usd is not None:
        parts.append(f"\nCost at {s.gpu_hour_price_usd:g} USD per GPU-hour x {s.gpus} GPU(s).")
    errors = [e for lv in results.levels for e in lv.error_samples]
    if errors:
        parts.append("\n## Errors (samples)\n" + "\n".join(f"- `{e[:200]}`" for e in errors[:5]))
    if gates:
        verdict = "all passed" if all(g.passed for g in gates) else "FAILED"
        parts.append(f"\n## Gates: {verdict}\n" + "\n".join(
            f"- {'✅' if g.passed else '❌'} {g.message}" for g in gates))
    return "\n".join(parts) + "\n"
