"""The benchmark client and its metrics, against a tiny in-process OpenAI-style streaming
server whose timing we control, and the metric formulas against hand-computed values."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from cortex.bench import (
    BenchmarkError,
    BenchmarkResult,
    BenchmarkSettings,
    GatesFailed,
    GoodputSLO,
    RequestRecord,
    arrival_offsets,
    benchmark,
    compute_level_metrics,
    cost_per_1m_output_tokens,
    enforce_gates,
    evaluate_gates,
    make_prompts,
    results_markdown,
    results_table,
)


# --------------------------------------------------------------------------- fake server


@dataclass
class FakeEngine:
    """Streams `max_tokens` one-character tokens: the first after `ttft_s`, then one every
    `token_s`. `usage_style` 'llama' puts usage beside choices in the last message (as
    llama-server does), 'vllm' sends it in its own message without choices, 'none' omits it.
    `overlap`: every stream waits before its first token until that many were in flight at once
    (at most a minute), so a test sees requests overlap however slowly the client sends them."""

    ttft_s: float = 0.02
    token_s: float = 0.005
    usage_style: str = "llama"
    fail_every: int = 0  # every n-th request answers HTTP 500
    overlap: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    requests: int = 0
    bodies: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def models(request: Request):
            return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        async def completions(request: Request):
            body = await request.json()
            with self.lock:
                self.requests += 1
                n = self.requests
                self.bodies.append(body)
            if self.fail_every and n % self.fail_every == 0:
                return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
            max_tokens = int(body["max_tokens"])
            prompt_len = len(body["prompt"]) if isinstance(body["prompt"], list) else 7

            async def stream():
                with self.lock:
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    until = time.monotonic() + 60
                    while self.max_in_flight < self.overlap and time.monotonic() < until:
                        await asyncio.sleep(0.005)
                    await asyncio.sleep(self.ttft_s)
                    for i in range(max_tokens):
                        if i:
                            await asyncio.sleep(self.token_s)
                        last = i == max_tokens - 1
                        msg = {"choices": [{"text": "x", "index": 0, "finish_reason": "length" if last else None}]}
                        if last and self.usage_style == "llama":
                            msg["usage"] = {"prompt_tokens": prompt_len, "completion_tokens": max_tokens}
                        yield f"data: {json.dumps(msg)}\n\n"
                    if self.usage_style == "vllm":
                        usage = {"prompt_tokens": prompt_len, "completion_tokens": max_tokens}
                        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    with self.lock:
                        self.in_flight -= 1

            return StreamingResponse(stream(), media_type="text/event-stream")

        return Starlette(
            routes=[
                Route("/v1/models", models),
                Route("/v1/completions", completions, methods=["POST"]),
            ]
        )


class ServerThread:
    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        # The stdlib loop: its timers never fire early (uvloop's have millisecond ticks and can),
        # so the fake engine's sleeps are lower bounds of what a client measures.
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", loop="asyncio"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def fake():
    engine = FakeEngine()
    with ServerThread(engine.app()) as server:
        engine.base_url = server.base_url
        yield engine


def small(**kw) -> BenchmarkSettings:
    base = dict(concurrency=[1, 4], requests=8, input_len=16, output_len=10)
    base.update(kw)
    return BenchmarkSettings(**base)


# --------------------------------------------------------------------------- client behaviour


def test_benchmark_measures_the_fake_engines_timing(fake):
    result = benchmark(fake.base_url, small())
    assert result.model == "fake-model"
    assert [lv.concurrency for lv in result.levels] == [1, 4]
    for lv in result.levels:
        assert lv.completed == 8 and lv.errors == 0 and lv.cancelled == 0
        assert lv.total_output_tokens == 8 * 10
        assert lv.total_input_tokens == 8 * 16
        assert lv.output_tokens_counted_by == "usage"
        # the server sleeps ttft_s before the first token and token_s between tokens
        assert lv.ttft_ms.p50 >= 20.0
        assert lv.itl_ms.n == 8 * 9  # nine gaps between ten token events per request
        assert lv.e2el_ms.p50 >= 20.0 + 9 * 5.0
        # Gaps are measured as tokens reach the client, which may read several at once, so TPOT
        # is checked by its definition: each request's time after its first token over its nine
        # gaps, which are also its nine ITLs.
        assert lv.tpot_ms.p50 > 0
        assert lv.tpot_ms.mean == pytest.approx((lv.e2el_ms.mean - lv.ttft_ms.mean) / 9)
        assert lv.itl_ms.mean == pytest.approx(lv.tpot_ms.mean)
        # throughput is the level's tokens over the level's wall time
        assert lv.output_tokens_per_s == pytest.approx(lv.total_output_tokens / lv.duration_s)
        assert lv.requests_per_s == pytest.approx(8 / lv.duration_s)
    # warmup request + 2 levels x 8
    assert fake.requests == 1 + 16
    assert fake.max_in_flight <= 4


def test_requests_carry_fixed_length_token_prompts_and_usage_options(fake):
    benchmark(fake.base_url, small(concurrency=[2], requests=3))
    body = fake.bodies[-1]
    assert len(body["prompt"]) == 16 and all(isinstance(t, int) for t in body["prompt"])
    assert body["max_tokens"] == 10
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True
    # every level gets fresh prompts, so no level reuses another's prompt cache
    prompts = [tuple(b["prompt"]) for b in fake.bodies]
    assert len(set(prompts)) == len(prompts)


def test_concurrency_caps_requests_in_flight(fake):
    fake.overlap = 3  # the first three wait for each other: the cap is reached, not just allowed
    benchmark(fake.base_url, small(concurrency=[3], requests=9, warmup=False))
    assert fake.max_in_flight == 3


def test_usage_in_its_own_message_is_counted(fake):
    fake.usage_style = "vllm"
    lv = benchmark(fake.base_url, small(concurrency=[2], requests=4)).levels[0]
    assert lv.output_tokens_counted_by == "usage"
    assert lv.total_output_tokens == 40
    # the usage-only message has no choices, so it is not a token event
    assert lv.itl_ms.n == 4 * 9


def test_without_usage_the_content_chunks_are_counted(fake):
    fake.usage_style = "none"
    lv = benchmark(fake.base_url, small(concurrency=[1], requests=3)).levels[0]
    assert lv.output_tokens_counted_by == "chunks"
    assert lv.total_output_tokens == 30


def test_failed_requests_are_errors_with_samples(fake):
    fake.fail_every = 3
    lv = benchmark(fake.base_url, small(concurrency=[1], requests=9, warmup=False)).levels[0]
    assert lv.errors == 3 and lv.completed == 6
    assert "HTTP 500" in lv.error_samples[0] and "injected failure" in lv.error_samples[0]


def test_time_bound_stops_a_level_and_cancels_what_is_in_flight(fake):
    fake.token_s = 0.5  # 10 tokens -> at least 4.5 s per request, 45 s for the level unbounded
    lv = benchmark(fake.base_url, small(concurrency=[2], requests=20, max_duration_s=1.0, warmup=False)).levels[0]
    assert lv.completed < 20
    assert lv.completed + lv.errors + lv.cancelled == lv.requests_sent
    assert lv.cancelled >= 1
    assert lv.duration_s < 30.0  # the bound and the cancelling, with room for a slow machine


def test_request_rate_spreads_arrivals(fake):
    fake.ttft_s = 0.0
    fake.token_s = 0.0
    lv = benchmark(fake.base_url, small(concurrency=[8], requests=6, request_rate=10.0)).levels[0]
    assert lv.request_rate == 10.0
    # the last request is sent at n / rate = 0.6 s
    assert lv.duration_s >= 0.6


def test_a_failing_first_request_stops_the_benchmark_with_the_reason(fake):
    fake.fail_every = 1
    with pytest.raises(BenchmarkError, match="first test request.*HTTP 500"):
        benchmark(fake.base_url, small())


def test_unreachable_endpoint_says_so():
    with pytest.raises(BenchmarkError, match="cannot reach"):
        benchmark("http://127.0.0.1:9", small())


# --------------------------------------------------------------------------- metric formulas


def rec(ttft, latency, out, itl=None, success=True, prompt=10):
    return RequestRecord(
        success=success,
        ttft=ttft,
        latency=latency,
        output_tokens=out,
        itl=itl or [],
        prompt_tokens=prompt,
        output_tokens_from_usage=True,
    )


def test_metrics_follow_vllms_definitions():
    records = [
        rec(0.1, 1.1, 11, itl=[0.1] * 10),  # TPOT (1.1-0.1)/10 = 0.1
        rec(0.2, 0.6, 5, itl=[0.1] * 4),  # TPOT 0.4/4 = 0.1
        rec(0.3, 0.3, 1),  # one token: no TPOT sample
        rec(0, 0, 0, success=False),
    ]
    s = BenchmarkSettings(goodput_slo=GoodputSLO(ttft_ms=250))
    lv = compute_level_metrics(records, 2.0, concurrency=2, settings=s)
    assert lv.completed == 3 and lv.errors == 1
    assert lv.total_output_tokens == 17 and lv.total_input_tokens == 30
    assert lv.output_tokens_per_s == pytest.approx(8.5)
    assert lv.total_tokens_per_s == pytest.approx(23.5)
    assert lv.requests_per_s == pytest.approx(1.5)
    assert lv.ttft_ms.mean == pytest.approx(200.0)
    assert lv.ttft_ms.p50 == pytest.approx(200.0)
    assert lv.ttft_ms.p99 == pytest.approx(float(np.percentile([100, 200, 300], 99)))
    assert lv.tpot_ms.n == 2 and lv.tpot_ms.mean == pytest.approx(100.0)
    assert lv.itl_ms.n == 14
    assert lv.e2el_ms.p50 == pytest.approx(600.0)
    # TTFT <= 250 ms: the first two requests are good
    assert lv.goodput_per_s == pytest.approx(1.0)


def test_goodput_counts_a_one_token_answer_as_tpot_zero():
    records = [rec(0.1, 0.1, 1), rec(0.1, 2.1, 3)]  # second TPOT = 1.0 s
    s = BenchmarkSettings(goodput_slo=GoodputSLO(tpot_ms=50))
    lv = compute_level_metrics(records, 1.0, concurrency=1, settings=s)
    assert lv.goodput_per_s == pytest.approx(1.0)
    assert compute_level_metrics(records, 1.0, concurrency=1, settings=BenchmarkSettings()).goodput_per_s is None


def test_no_successful_request_leaves_latency_empty():
    lv = compute_level_metrics([rec(0, 0, 0, success=False)], 1.0, concurrency=1, settings=BenchmarkSettings())
    assert lv.ttft_ms.p99 is None and lv.ttft_ms.n == 0 and lv.output_tokens_per_s == 0


def test_cost_per_million_output_tokens():
    # 2 GPUs at 3.6 USD/h = 0.002 USD/s; at 100 tok/s -> 20 USD per 1M tokens
    assert cost_per_1m_output_tokens(100.0, 3.6, 2) == pytest.approx(20.0)
    assert cost_per_1m_output_tokens(100.0, None, 2) is None
    assert cost_per_1m_output_tokens(0.0, 3.6, 1) is None
    s = BenchmarkSettings(gpu_hour_price_usd=3.6, gpus=1)
    lv = compute_level_metrics([rec(0.1, 1.0, 100)], 1.0, concurrency=1, settings=s)
    assert lv.cost_per_1m_output_tokens_usd == pytest.approx(10.0)


def test_arrivals_closed_loop_poisson_and_gamma():
    assert arrival_offsets(4, None) == [0.0] * 4
    poisson = arrival_offsets(50, 5.0, 1.0, rng=np.random.default_rng(1))
    assert poisson[-1] == pytest.approx(10.0)  # rescaled to n / rate, as vLLM does
    assert all(b >= a for a, b in zip(poisson, poisson[1:]))
    assert arrival_offsets(50, 5.0, 1.0, rng=np.random.default_rng(1)) == poisson
    even = arrival_offsets(4, 2.0, float("inf"))
    assert even == pytest.approx([0.5, 1.0, 1.5, 2.0])

    # lower burstiness -> burstier: larger spread of gaps
    def spread(b):
        o = np.diff([0.0] + arrival_offsets(2000, 10.0, b, rng=np.random.default_rng(3)))
        return float(np.std(o))

    assert spread(0.25) > spread(1.0) > spread(8.0)


def test_random_prompts_are_exact_length_and_seeded():
    s = BenchmarkSettings(input_len=33)
    a, b = make_prompts(s, 3, seed=5), make_prompts(s, 3, seed=5)
    assert a == b and all(len(p.prompt) == 33 for p in a)
    assert make_prompts(s, 3, seed=6) != a
    bundled = make_prompts(BenchmarkSettings(prompts="bundled"), 40, seed=0)
    assert all(isinstance(p.prompt, str) and p.prompt for p in bundled)


def test_settings_from_the_spec_section():
    from cortex.spec import BenchmarkSpec

    spec = BenchmarkSpec(concurrency=[2, 8], requests=5, goodput_slo={"ttft_ms": 300}, gpu_hour_price_usd=2.0)
    s = BenchmarkSettings.from_spec(spec, gpus=4)
    assert s.concurrency == [2, 8] and s.requests == 5 and s.gpus == 4
    assert s.goodput_slo.ttft_ms == 300 and s.gpu_hour_price_usd == 2.0
    assert BenchmarkSettings.from_spec(BenchmarkSpec()).concurrency == [1, 4, 16]


# --------------------------------------------------------------------------- gates and reports


def two_level_result() -> BenchmarkResult:
    s = BenchmarkSettings(concurrency=[1, 4])
    lv1 = compute_level_metrics([rec(0.05, 0.5, 10), rec(0.07, 0.5, 10)], 1.0, concurrency=1, settings=s)
    lv4 = compute_level_metrics([rec(0.4, 2.0, 10)] * 4, 2.0, concurrency=4, settings=s)
    return BenchmarkResult(target="t", base_url="http://x", model="m", started_at="now", settings=s, levels=[lv1, lv4])


def test_gates_pass_and_fail_with_the_measured_numbers():
    result = two_level_result()
    gates = [
        {"metric": "ttft_ms", "stat": "p99", "max": 100.0, "concurrency": 1},
        {"metric": "ttft_ms", "stat": "p50", "max": 100.0},  # every level: fails at 4
        {"metric": "output_tokens_per_s", "min": 15.0, "concurrency": 4},
    ]
    checked = evaluate_gates(result, gates)
    assert [g.passed for g in checked] == [True, True, False, True]
    failed = checked[2]
    assert failed.concurrency == 4 and failed.value == pytest.approx(400.0)
    assert "ttft_ms.p50 at concurrency 4 = 400.00" in failed.message
    with pytest.raises(GatesFailed, match=r"ttft_ms.p50 at concurrency 4 = 400.00; must be <= 100"):
        enforce_gates(result, gates)


def test_gates_from_the_spec_model():
    from cortex.spec import Gate

    result = two_level_result()
    impossible = [Gate(metric="e2el_ms", stat="p99", max=1.0)]
    with pytest.raises(GatesFailed) as err:
        enforce_gates(result, impossible)
    assert len(err.value.failed) == 2


def test_a_gate_never_passes_for_lack_of_data():
    result = two_level_result()
    checked = evaluate_gates(result, [{"metric": "requests_per_s", "min": 0.1, "concurrency": 16}])
    assert not checked[0].passed and "not measured" in checked[0].message
    result.levels[0] = compute_level_metrics(
        [rec(0, 0, 0, success=False)], 1.0, concurrency=1, settings=result.settings
    )
    checked = evaluate_gates(result, [{"metric": "tpot_ms", "max": 1e9, "concurrency": 1}])
    assert not checked[0].passed and "no value" in checked[0].message
    with pytest.raises(ValueError, match="not one of"):
        evaluate_gates(result, [{"metric": "tokens", "max": 1}])


def test_results_round_trip_and_reports():
    result = two_level_result()
    again = BenchmarkResult.from_json(result.to_json())
    assert again == result
    summary = result.summary()
    assert summary["levels"][1]["ttft_ms"]["p50"] == pytest.approx(400.0)
    assert set(summary["levels"][0]["tpot_ms"]) == {"mean", "p50", "p90", "p99"}
    rows = results_table(result)
    assert rows[1]["concurrency"] == 4
    md = results_markdown(result, evaluate_gates(result, [{"metric": "ttft_ms", "max": 100.0}]))
    assert "| concurrency |" in md and "Gates: FAILED" in md and "❌" in md
    json.loads(result.to_json())


def test_a_connection_closed_before_any_response_is_sent_again():
    """The server drops the first connection without answering (as llama-server does with a
    stale keep-alive connection); the request goes out once more and is measured."""

    seen = {"connections": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            [h for h in head.decode().split("\r\n") if h.lower().startswith("content-length")][0].split(":")[1]
        )
        await reader.readexactly(length)
        if seen["connections"] == 1:
            writer.close()
            return
        msg = {"choices": [{"text": "hi", "index": 0}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        body = f"data: {json.dumps(msg)}\n\ndata: [DONE]\n\n".encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    rec = _stream_from(handle)
    assert seen["connections"] == 2
    assert rec.success and rec.output_tokens == 1 and rec.text == "hi"


def _stream_from(handle):
    """One benchmark streaming request against a raw asyncio server whose connections `handle` answers."""
    from cortex.bench import send_streaming_request
    import httpx

    async def scenario():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, httpx.AsyncClient() as client:
            return await send_streaming_request(
                client, f"http://127.0.0.1:{port}/v1/completions", {"prompt": [1, 2, 3]}, {}
            )

    return asyncio.run(scenario())


def test_sse_comments_and_event_lines_are_not_token_events():
    """Pings (`: ping`), `event:` lines and blank separators carry no data: only the two
    `data:` messages are token events, and the stream is read past `[DONE]`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            [h for h in head.decode().split("\r\n") if h.lower().startswith("content-length")][0].split(":")[1]
        )
        await reader.readexactly(length)
        first = {"choices": [{"text": "a", "index": 0}]}
        last = {"choices": [{"text": "b", "index": 0}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        body = (
            f": ping\n\nevent: message\ndata: {json.dumps(first)}\n\n: ping\n\n"
            f"data:{json.dumps(last)}\n\ndata: [DONE]\n\n"
        ).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    rec = _stream_from(handle)
    assert rec.success and rec.text == "ab" and rec.output_tokens == 2
    assert len(rec.itl) == 1 and rec.latency >= rec.ttft
