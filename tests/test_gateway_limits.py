"""Per-key rate limits, token budgets and usage: the limiter on an injected clock, then a real
gateway process (`python -m cortex.gateway`) in front of the instant fake engine, driven by the
official `openai` client where a client's view matters."""

from __future__ import annotations

import json
import math
import signal
import time

import httpx
import openai
import orjson
import pytest

from cortex.gateway.limits import DAY, KeyLimits, Limiter, ask_for_usage, format_reset, strip_usage_event
from cortex.gateway.registry import Registry, open_registry
from cortex.testing.fake_engine import FakeEngine
from cortex.testing.gateway import Gateways, GatewayProcess

ENGINE_KEY = "engine-secret"
FAST = {
    "CORTEX_GATEWAY_HEALTH_INTERVAL": "0.3",
    "CORTEX_GATEWAY_HEALTH_TIMEOUT": "30",
    "CORTEX_GATEWAY_CONNECT_TIMEOUT": "30",
}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limited(limiter: Limiter, registry: Registry, **limits: int):
    _, record = registry.create_key("k", limits=KeyLimits(**limits))
    limiter.sync(registry.keys(), registry)
    return limiter.states[record.id], record


# --- the limiter, on an injected clock ----------------------------------------------------------------


def test_requests_per_minute_is_a_token_bucket(tmp_path):
    clock = Clock(1_800_000_000.0)
    limiter, registry = Limiter(clock), Registry(tmp_path / "r.db")
    state, _ = limited(limiter, registry, rpm=3)
    for remaining in (2, 1, 0):
        refusal, headers = limiter.admit(state)
        assert refusal is None and dict(headers)[b"x-ratelimit-remaining-requests"] == b"%d" % remaining
    refusal, headers = limiter.admit(state)
    assert refusal is not None and refusal.code == "rate_limit_exceeded"
    assert refusal.retry_after == pytest.approx(20.0)  # one request back every 60/3 s
    assert dict(limiter.refusal_headers(refusal))[b"retry-after"] == b"20"
    assert dict(headers)[b"x-ratelimit-reset-requests"] == b"1m0s"  # until the bucket is full
    clock.now += 19.9
    assert limiter.admit(state)[0] is not None
    clock.now += 0.1
    assert limiter.admit(state)[0] is None


def test_tokens_per_minute_are_charged_from_usage_and_may_overshoot_once(tmp_path):
    clock = Clock(1_800_000_000.0)
    limiter, registry = Limiter(clock), Registry(tmp_path / "r.db")
    state, _ = limited(limiter, registry, tpm=60)
    assert limiter.admit(state)[0] is None
    limiter.charge(state, 90)  # the answer was larger than what was left: the bucket owes 30
    refusal, headers = limiter.admit(state)
    assert refusal is not None and refusal.retry_after == pytest.approx(30.001)
    assert dict(headers)[b"x-ratelimit-remaining-tokens"] == b"0"
    clock.now += 30.01
    assert limiter.admit(state)[0] is None


def test_daily_budget_is_used_up_and_resets_at_utc_midnight(tmp_path):
    midnight = 20_000 * DAY
    clock = Clock(midnight + 23 * 3600)  # 23:00 UTC
    limiter, registry = Limiter(clock), Registry(tmp_path / "r.db")
    state, _ = limited(limiter, registry, budget_tokens_per_day=100)
    assert limiter.admit(state)[0] is None
    limiter.charge(state, 100)
    refusal, headers = limiter.admit(state)
    assert refusal is not None and refusal.code == "token_budget_exceeded"
    assert refusal.retry_after == pytest.approx(3600.0)
    assert dict(headers)[b"x-cortex-budget-remaining-tokens"] == b"0"
    assert dict(headers)[b"x-cortex-budget-reset"] == b"1h0m0s"
    clock.now = midnight + DAY - 0.001
    assert limiter.admit(state)[0] is not None
    clock.now = midnight + DAY  # 00:00 UTC: a new day, a new budget
    refusal, headers = limiter.admit(state)
    assert refusal is None and dict(headers)[b"x-cortex-budget-remaining-tokens"] == b"100"


def test_state_survives_in_the_registry_and_other_gateways_consumption_is_taken_out(registry_location):
    clock = Clock(1_800_000_000.0)
    registry = open_registry(registry_location)
    one, two = Limiter(clock), Limiter(clock)
    state1, record = limited(one, registry, rpm=10, budget_tokens_per_day=1000)
    two.sync(registry.keys(), registry)
    state2 = two.states[record.id]

    def flush(limiter: Limiter, usage: list) -> None:
        now = clock()
        totals, today = registry.flush_usage(int(now // 3600), usage, limiter.snapshot(), now - now % DAY)
        limiter.exchange(totals, today)

    for _ in range(4):
        assert one.admit(state1)[0] is None
    one.charge(state1, 400)
    flush(one, [(record.id, "m", [4, 300, 100, 0, 0])])
    flush(two, [])
    assert state2.requests is not None and state2.requests.level == pytest.approx(6)  # 10 - the other's 4
    assert state2.day_tokens == 400
    # a third limiter (a restarted gateway) resumes from the saved state
    three = Limiter(clock)
    three.sync(registry.keys(), registry)
    state3 = three.states[record.id]
    assert state3.requests is not None and state3.requests.level == pytest.approx(6)
    assert state3.day_tokens == 400 and state3.seen == [4, 400]


def test_reset_format_and_usage_event_stripping():
    assert [format_reset(s) for s in (0.02, 1, 1.5, 360, 3723)] == ["20ms", "1s", "1.5s", "6m0s", "1h2m3s"]
    usage = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}'
    token = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"usage"}}]}'
    assert strip_usage_event(token + b"\n\n" + usage + b"\n\ndata: [DONE]\n\n") == token + b"\n\ndata: [DONE]\n\n"
    assert strip_usage_event(usage + b"\n\n") == b""
    assert strip_usage_event(token + b"\n\n") == token + b"\n\n"  # "usage" as a token's text stays
    assert strip_usage_event(usage) == usage  # split across reads: passes unchanged
    # the client's own stream_options are kept; without any, the option is spliced into the bytes
    body = b' {"model":"smol","stream":true,"messages":[{"role":"user","content":"{hi}"}]}'
    payload = orjson.loads(body)
    asked = ask_for_usage(payload, body)
    assert asked is not None and orjson.loads(asked) == {
        **orjson.loads(body),
        "stream_options": {"include_usage": True},
    }
    assert payload["stream_options"] == {"include_usage": True}  # what a fallback's re-serialised body carries
    for options, expected in (
        (None, {"include_usage": True}),
        ({"continuous_usage_stats": True}, {"continuous_usage_stats": True, "include_usage": True}),
    ):
        payload = {"model": "smol", "stream": True, "stream_options": options}
        asked = ask_for_usage(payload, orjson.dumps(payload))
        assert asked is not None and orjson.loads(asked)["stream_options"] == expected
    assert ask_for_usage({"stream_options": {"include_usage": True}}, b"{}") is None  # asked already
    assert ask_for_usage({"stream_options": "yes"}, b"{}") is None  # not an object: the engine answers


# --- a real gateway process -------------------------------------------------------------------------------


@pytest.fixture
def engine():
    e = FakeEngine(api_key=ENGINE_KEY, models=("smol", "alpha")).start()
    yield e
    e.stop()


@pytest.fixture
def gateway(tmp_path):
    gateways = Gateways(tmp_path, FAST)
    yield gateways
    gateways.stop_all()


def routed(gw: GatewayProcess, engine: FakeEngine, **limits) -> dict:
    with gw.client() as c:
        for model in ("smol", "alpha"):
            c.register(model, engine.base_url, engine_api_key=ENGINE_KEY)
        return c.create_key(name="limited", **limits)


def client(gw: GatewayProcess, key: str, statuses: list | None = None, retries: int = 0) -> openai.OpenAI:
    hooks = {"response": [lambda r: statuses.append((r.status_code, dict(r.headers)))]} if statuses is not None else {}
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key=key, max_retries=retries, http_client=httpx.Client(event_hooks=hooks)
    )


def ask(c: openai.OpenAI, model: str = "smol"):
    return c.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "hi"}])


def test_openai_client_reads_the_headers_and_gets_429_in_openai_shape(gateway, engine):
    gw = gateway()
    key = routed(gw, engine, rpm=2, tpm=1000)
    c = client(gw, key["key"])
    started = time.monotonic()
    raw = ask(c)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
    assert raw.headers["x-ratelimit-remaining-tokens"] == "1000"  # its own tokens are counted when it ends
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert raw.parse().usage.total_tokens == 13
    remaining = int(ask(c).headers["x-ratelimit-remaining-tokens"])
    # 13 tokens charged; the bucket refills 1000/60 a second, for at most the time both requests took
    refilled = math.ceil(1000 / 60 * (time.monotonic() - started))
    assert 987 <= remaining <= min(1000, 987 + refilled), (remaining, refilled)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(c)
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.body["type"] == "rate_limit_error" and "2 requests per minute" in error.message
    assert 1 <= int(error.response.headers["retry-after"]) <= 30
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    # an unlimited key pays nothing and gets no rate-limit headers
    with gw.client() as admin:
        free = admin.create_key(name="free")["key"]
    assert not any(h.startswith("x-ratelimit") for h in ask(client(gw, free)).headers)


def test_openai_client_retries_a_429_after_retry_after_and_succeeds(gateway, engine):
    gw = gateway()
    key = routed(gw, engine, rpm=60)  # one request back every second
    for _ in range(200):  # spend the bucket; the call that meets the 429 waits Retry-After, then gets in
        statuses: list = []
        ask(client(gw, key["key"], statuses, retries=2))
        if statuses[0][0] == 429:
            break
    else:
        raise AssertionError("60 requests per minute never answered 429 in 200 requests")
    assert [s for s, _ in statuses] == [429, 200]
    refused = statuses[0][1]
    assert refused["retry-after"] == "1" and 0 < int(refused["retry-after-ms"]) <= 1000
    assert refused["x-ratelimit-limit-requests"] == "60"


def test_streamed_usage_is_counted_and_the_event_the_client_did_not_ask_for_is_removed(gateway, engine):
    gw = gateway()
    key = routed(gw, engine, tpm=100_000)
    c = client(gw, key["key"])
    chunks = list(c.chat.completions.create(model="smol", messages=[], stream=True))
    assert chunks and all(ch.choices for ch in chunks) and all(ch.usage is None for ch in chunks)
    asked = list(
        c.chat.completions.create(model="smol", messages=[], stream=True, stream_options={"include_usage": True})
    )
    assert asked[-1].usage is not None and asked[-1].usage.total_tokens == 25
    with gw.client() as admin:
        rows = admin.usage()["usage"]
    assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(2, 10, 40)]


def test_usage_totals_equal_the_sum_of_the_responses_usage(gateway, engine, capsys, monkeypatch):
    from cli.main import main as cortex

    gw = gateway()
    first = routed(gw, engine)
    with gw.client() as admin:
        second = admin.create_key(name="second", budget_tokens_per_day=10_000_000)
    seen: dict[tuple, list[int]] = {}
    for key, model, n in ((first, "smol", 3), (first, "alpha", 2), (second, "smol", 4)):
        c = client(gw, key["key"])
        for i in range(n):
            if i % 2:
                stream = c.chat.completions.create(
                    model=model, messages=[], stream=True, stream_options={"include_usage": True}
                )
                usage = [ch.usage for ch in stream if ch.usage is not None][0]
            else:
                usage = c.chat.completions.create(model=model, messages=[]).usage
            row = seen.setdefault((key["id"], model), [0, 0, 0, 0])
            row[0] += 1
            row[1] += usage.prompt_tokens
            row[2] += usage.completion_tokens
    failed = httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {second['key']}"},
        json={"model": "smol", "messages": [], "fake_status": 500},
    )
    assert failed.status_code == 500
    seen[(second["id"], "smol")][0] += 1
    seen[(second["id"], "smol")][3] += 1
    for name, value in gw.env.items():
        if name.startswith("CORTEX_"):
            monkeypatch.setenv(name, value)
    assert cortex(["keys", "usage", "--since", "1d", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    got = {
        (r["key_id"], r["model"]): [r["requests"], r["prompt_tokens"], r["completion_tokens"], r["errors"]]
        for r in rows
    }
    assert got == seen
    assert cortex(["keys", "usage"]) == 0
    table = capsys.readouterr().out
    assert "COMPLETION" in table and first["id"] in table and "second" in table
    metrics = httpx.get(gw.url + "/metrics").text
    total_prompt = sum(v[1] for k, v in seen.items() if k[0] == first["id"])
    assert f'cortex_gateway_key_tokens_total{{key="{first["id"]}",type="prompt"}} {total_prompt}' in metrics
    assert f'cortex_gateway_key_errors_total{{key="{second["id"]}"}} 1' in metrics
    assert first["key"] not in metrics and second["key"] not in metrics
    admin = {"Authorization": f"Bearer {gw.admin_token()}"}
    bad = httpx.get(gw.url + "/admin/usage?since=yesterday", headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    future = httpx.get(gw.url + f"/admin/usage?since={time.time() + 7200}", headers=admin)
    assert future.status_code == 200 and future.json()["usage"] == []


def test_per_key_metrics_are_capped(gateway, engine):
    gw = gateway(CORTEX_GATEWAY_METRICS_MAX_KEYS="2")
    keys = [routed(gw, engine)["key"]]
    with gw.client() as admin:
        keys += [admin.create_key(name=f"k{i}")["key"] for i in range(4)]
    for key in keys:
        ask(client(gw, key))
    with gw.client() as admin:
        admin.usage()  # flushes, so the series come from the folded totals too
    lines = [
        ln
        for ln in httpx.get(gw.url + "/metrics").text.splitlines()
        if ln.startswith("cortex_gateway_key_requests_total")
    ]
    assert len(lines) == 3 and lines[-1] == 'cortex_gateway_key_requests_total{key="other"} 3'


def test_limits_and_usage_survive_a_restart_and_a_crash_loses_at_most_one_flush(gateway, engine, tmp_path):
    home = tmp_path / "home"
    gw = gateway(home)
    key = routed(gw, engine, budget_tokens_per_day=20)
    c = client(gw, key["key"])
    day = time.time() // DAY
    ask(c)
    ask(c)  # 26 tokens of 20: the budget is used up
    with pytest.raises(openai.RateLimitError):
        ask(c)
    gw.stop()  # a clean stop writes what is pending
    gw = gateway(home)
    c = client(gw, key["key"])
    if time.time() // DAY == day:
        with pytest.raises(openai.RateLimitError) as caught:
            ask(c)
        assert caught.value.code == "token_budget_exceeded"
    else:  # 00:00 UTC passed during the test: a new day's budget
        ask(c)
    with gw.client() as admin:
        admin.update_key(key["id"], budget_tokens_per_day=None)
        rows = admin.usage()["usage"]
    assert (rows[0]["requests"], rows[0]["rate_limited"]) == (2, 1 + int(time.time() // DAY == day))
    # a crash: what was flushed (every 0.2 s here) is kept
    gw.stop()
    gw = gateway(home, CORTEX_GATEWAY_USAGE_FLUSH_INTERVAL="0.2")
    ask(client(gw, key["key"]))
    registry = Registry(home / "gateway" / "registry.db")
    deadline = time.monotonic() + 60
    while sum(r[2] for r in registry.usage()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait()
    assert sum(r[2] for r in registry.usage()) == 3


def test_two_gateways_on_one_registry_share_a_budget(gateway, engine, tmp_path, registry_location):
    home = tmp_path / "home"  # one home: the same admin token; the registry a file or a database
    one = gateway(home, CORTEX_GATEWAY_USAGE_FLUSH_INTERVAL="0.2", CORTEX_GATEWAY_DB=registry_location)
    two = gateway(home, CORTEX_GATEWAY_USAGE_FLUSH_INTERVAL="0.2", CORTEX_GATEWAY_DB=registry_location)
    key = routed(one, engine, budget_tokens_per_day=20)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the second gateway picks up the key from the registry
        if httpx.get(two.url + "/v1/models", headers={"Authorization": f"Bearer {key['key']}"}).status_code == 200:
            break
        time.sleep(0.05)
    ask(client(one, key["key"]))
    ask(client(one, key["key"]))  # 26 tokens through the first gateway
    on_two = client(two, key["key"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # within about two flush intervals the second one refuses too
        try:
            ask(on_two)
        except openai.RateLimitError as exc:
            assert exc.code == "token_budget_exceeded"
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the second gateway never saw the budget used through the first")


def test_keys_create_update_with_limits_on_the_command_line(gateway, engine, capsys, monkeypatch):
    from cli.main import main as cortex

    gw = gateway()
    routed(gw, engine)
    for name, value in gw.env.items():
        if name.startswith("CORTEX_"):
            monkeypatch.setenv(name, value)
    assert (
        cortex(["keys", "create", "--name", "ci", "--rpm", "5", "--tpm", "1000", "--budget-tokens", "50000/day"]) == 0
    )
    out = capsys.readouterr()
    key = out.out.strip()
    assert "5 req/min, 1000 tok/min, 50000 tok/day" in out.err
    assert ask(client(gw, key)).headers["x-ratelimit-limit-requests"] == "5"
    assert cortex(["keys", "list", "--json"]) == 0
    listed = [k for k in json.loads(capsys.readouterr().out) if k["name"] == "ci"][0]
    assert (listed["rpm"], listed["tpm"], listed["budget_tokens_per_day"]) == (5, 1000, 50000)
    assert cortex(["keys", "update", listed["id"], "--rpm", "none", "--budget-tokens", "100/day"]) == 0
    assert "1000 tok/min, 100 tok/day" in capsys.readouterr().out
    headers = ask(client(gw, key)).headers
    assert "x-ratelimit-limit-requests" not in headers and headers["x-cortex-budget-limit-tokens"] == "100"
    assert cortex(["keys", "create", "--budget-tokens", "5/week"]) == 2
    assert "N/day" in capsys.readouterr().err
    assert cortex(["keys", "update", listed["id"], "--tpm", "0"]) == 2
    assert cortex(["keys", "update", listed["id"]]) == 2
