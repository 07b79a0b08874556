"""The benchmark against a real llama-server serving SmolLM2 (the session fixture)."""

from __future__ import annotations

import pytest

from cortex.bench import BenchmarkSettings, GatesFailed, benchmark, enforce_gates, evaluate_gates


def test_benchmark_a_real_llama_server(llama_server):
    settings = BenchmarkSettings(concurrency=[1, 2], requests=3, input_len=32, output_len=8)
    result = benchmark(llama_server.base_url, settings, api_key=llama_server.api_key)
    for lv in result.levels:
        assert lv.errors == 0 and lv.completed == 3, lv.error_samples
        # llama-server reports usage in its last streamed message; ignore_eos makes it exact
        assert lv.output_tokens_counted_by == "usage"
        assert lv.total_output_tokens == 3 * 8
        assert lv.total_input_tokens == 3 * 32
        assert lv.ttft_ms.p50 > 0 and lv.tpot_ms.p50 > 0
        assert lv.e2el_ms.p50 > lv.ttft_ms.p50
        # Every streamed message with choices is a token event, as vLLM counts them: at most one
        # per token (llama-server holds back a token that ends mid-character and sends it with
        # the next) and the closing message with finish_reason, so 1 to 8 gaps per request ...
        assert 3 <= lv.itl_ms.n <= 3 * 8
        # ... which add up to each request's time after its first token.
        assert lv.itl_ms.mean * lv.itl_ms.n == pytest.approx(3 * (lv.e2el_ms.mean - lv.ttft_ms.mean))
        assert lv.output_tokens_per_s > 0
    # an SLO no engine can meet fails with the measured value in the message
    impossible = [{"metric": "ttft_ms", "stat": "p99", "max": 0.001}]
    assert not any(g.passed for g in evaluate_gates(result, impossible))
    with pytest.raises(GatesFailed, match=r"ttft_ms.p99 at concurrency 1 = \d+\.\d\d; must be <= 0.001"):
        enforce_gates(result, impossible)


def test_bundled_prompts_on_a_real_llama_server(llama_server):
    settings = BenchmarkSettings(concurrency=[2], requests=3, output_len=8, prompts="bundled")
    lv = benchmark(llama_server.base_url, settings, api_key=llama_server.api_key).levels[0]
    assert lv.completed == 3 and lv.total_output_tokens == 24
    assert lv.total_input_tokens > 3  # counted by the server from the text prompts


def test_a_wrong_api_key_is_reported_by_the_first_request(llama_server):
    from cortex.bench import BenchmarkError

    with pytest.raises(BenchmarkError, match="401"):
        benchmark(
            llama_server.base_url, BenchmarkSettings(concurrency=[1], requests=1), api_key="wrong", model="smollm2"
        )
