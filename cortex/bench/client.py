"""The benchmark client: streams `/v1/completions` requests at a level's load and times them.

It measures as vLLM's OpenAI completions request function does (see `cortex.bench.metrics`
for what the numbers mean). One deliberate difference: vLLM reads `usage` only from a
message without `choices`; llama-server puts `usage` into the last message beside `choices`,
so vLLM falls back to re-tokenizing the text there. Cortex reads `usage` wherever it
appears, which is the server's own count.

A level stops sending at `max_duration_s` and cancels what is still in flight. Output
length is fixed with `ignore_eos` (llama-server and vLLM both accept it).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

import httpx
import numpy as np

from cortex.bench.metrics import BenchmarkResult, LevelResult, RequestRecord, compute_level_metrics
from cortex.bench.settings import BenchmarkSettings
from cortex.bench.workload import Prompt, arrival_offsets, make_prompts
from cortex.progress import SILENT, Reporter
from cortex.sse import DONE, sse_data


class BenchmarkError(RuntimeError):
    """The benchmark could not run (endpoint unreachable, misconfigured, every request failed)."""


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
                # One line at a time (no generator between the socket and the clock), and
                # [DONE] read past: the connection is drained and kept alive for the next.
                data = sse_data(line)
                if data is None or data == DONE:
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
    on_request: Callable[[RequestRecord], None] | None = None,
) -> LevelResult:
    """Send one level's requests with its load shape and measure it; `on_request` sees each
    request as it ends."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    offsets = list(arrivals) if arrivals is not None else [0.0] * len(prompts)
    sem = asyncio.Semaphore(concurrency)

    async def limited(p: Prompt) -> RequestRecord:
        async with sem:
            record = await send_streaming_request(client, url, _payload(model, p, settings), headers)
        if on_request is not None:
            on_request(record)
        return record

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
    progress: Reporter | None = None,
) -> BenchmarkResult:
    """Benchmark an OpenAI-compatible endpoint at each concurrency level of `settings`.

    `base_url` is the server root (with or without `/v1`); `model` defaults to the first
    one the endpoint lists. `on_level(level_result)` is called after each level; `progress`
    gets one bar per level (requests done of the level's total).
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
                raise BenchmarkError(f"the first test request to {url} (model {model!r}) failed: {rec.error}")
        levels: list[LevelResult] = []
        for i, conc in enumerate(settings.concurrency):
            seed = settings.seed + 1000 * (i + 1)
            prompts = make_prompts(settings, settings.requests, seed=seed)
            arrivals = arrival_offsets(
                settings.requests,
                settings.request_rate,
                settings.burstiness,
                rng=np.random.default_rng(seed),
            )
            with (progress or SILENT).task(f"benchmark concurrency {conc}", total=len(prompts), unit="requests") as bar:
                errors = [0]

                def ended(record: RequestRecord) -> None:
                    errors[0] += not record.success
                    bar.update(bar.done + 1, note=f"{errors[0]} failed" if errors[0] else None)

                level = await run_level(
                    client, url, model, prompts, conc, settings, headers, arrivals=arrivals, on_request=ended
                )
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
