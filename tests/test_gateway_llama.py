"""The official `openai` client through the gateway against real llama-server (SmolLM2): the
same answers as calling the engine directly, the right error types, a clean error when the
engine dies mid-stream, and a redeploy under load that loses no request."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from cortex.testing.gateway import GatewayProcess

GREEDY = {"temperature": 0, "seed": 7, "max_tokens": 24}
# Where answers must be equal byte for byte: llama-server evaluates the whole prompt each time
# instead of reusing a slot's cached prefix, whose numerics depend on the requests before.
NO_CACHE = {"cache_prompt": False}
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    g = GatewayProcess(
        tmp_path_factory.mktemp("gateway-home"),
        env={
            "CORTEX_GATEWAY_HEALTH_INTERVAL": "0.5",
            "CORTEX_GATEWAY_HEALTH_TIMEOUT": "30",
            "CORTEX_GATEWAY_MAX_BODY_BYTES": "200000",
        },
    ).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def routed(gateway, llama_server):
    """llama_server registered as `smollm2` (alias `smol`), and a client key."""
    with gateway.client() as c:
        replica = c.register("smollm2", llama_server.base_url, engine_api_key=llama_server.api_key, aliases=["smol"])
        key = c.create_key(name="openai-tests")["key"]
    return {"replica": replica, "key": key}


def via_gateway(gateway, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=120)


def direct(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)


def wait_until(predicate, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def test_chat_and_completions_match_the_engine(gateway, routed, llama_server):
    g, d = via_gateway(gateway, routed["key"]), direct(llama_server)
    through = g.chat.completions.create(model="smol", messages=MESSAGES, extra_body=NO_CACHE, **GREEDY)
    straight = d.chat.completions.create(model="smollm2", messages=MESSAGES, extra_body=NO_CACHE, **GREEDY)
    assert through.choices[0].message.content == straight.choices[0].message.content
    assert through.choices[0].message.content.strip()
    assert through.usage.completion_tokens == straight.usage.completion_tokens

    through = g.completions.create(model="smollm2", prompt="The capital of France is", extra_body=NO_CACHE, **GREEDY)
    straight = d.completions.create(model="smollm2", prompt="The capital of France is", extra_body=NO_CACHE, **GREEDY)
    assert through.choices[0].text == straight.choices[0].text
    # llama.cpp's own sampling parameters reach the engine through the client's extra_body.
    extra = {"top_k": 1, "repeat_penalty": 1.1, "mirostat": 0, **NO_CACHE}
    through = g.completions.create(model="smollm2", prompt="One, two,", extra_body=extra, **GREEDY)
    straight = d.completions.create(model="smollm2", prompt="One, two,", extra_body=extra, **GREEDY)
    assert through.choices[0].text == straight.choices[0].text


def test_streaming_with_usage_matches_the_engine(gateway, routed, llama_server):
    def collect(client, model):
        text, usage, chunks = "", None, 0
        for chunk in client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            stream=True,
            extra_body=NO_CACHE,
            stream_options={"include_usage": True},
            **GREEDY,
        ):
            chunks += 1
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage, chunks

    text, usage, chunks = collect(via_gateway(gateway, routed["key"]), "smollm2")
    text_direct, usage_direct, _ = collect(direct(llama_server), "smollm2")
    assert text == text_direct and text.strip()
    assert usage is not None and usage.completion_tokens == usage_direct.completion_tokens
    assert chunks > 5  # streamed token by token, not one block


def test_a_limited_keys_stream_is_counted_without_showing_the_client_a_usage_event(gateway, routed, llama_server):
    """A key with token limits streams without asking for usage: the gateway asks llama-server
    for it, counts it, and the client sees the same events as straight from the engine."""
    with gateway.client() as c:
        limited = c.create_key(name="limited", tpm=10_000_000, budget_tokens_per_day=10_000_000)

    def events(client, model, **extra):
        return [
            (ch.choices[0].delta.content if ch.choices else None, ch.usage is not None)
            for ch in client.chat.completions.create(
                model=model, messages=MESSAGES, stream=True, extra_body=NO_CACHE, **GREEDY, **extra
            )
        ]

    through = events(via_gateway(gateway, limited["key"]), "smollm2")
    plain = events(direct(llama_server), "smollm2")
    assert through == plain and len(through) > 5
    reported = [
        ch.usage
        for ch in direct(llama_server).chat.completions.create(
            model="smollm2",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_CACHE,
            **GREEDY,
        )
        if ch.usage is not None
    ][-1]
    with gateway.client() as c:
        rows = [r for r in c.usage()["usage"] if r["key_id"] == limited["id"]]
    assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (1, reported.prompt_tokens, reported.completion_tokens)
    ]


def test_models_list_and_error_types(gateway, routed):
    g = via_gateway(gateway, routed["key"])
    ids = {m.id for m in g.models.list()}
    assert {"smollm2", "smol"} <= ids
    with pytest.raises(openai.NotFoundError) as err:
        g.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        via_gateway(gateway, "sk-cortex-not-a-key").chat.completions.create(model="smol", messages=MESSAGES)
    with gateway.client() as c:
        limited = c.create_key(models=["other-model"])["key"]
    with pytest.raises(openai.PermissionDeniedError):
        via_gateway(gateway, limited).chat.completions.create(model="smol", messages=MESSAGES)
    with pytest.raises(openai.APIStatusError) as err:
        g.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x" * 300_000}])
    assert err.value.status_code == 413


def test_engine_metrics_come_through_the_admin_route(gateway, routed, llama_server, start_llama_server, test_model):
    """GET /admin/replicas/{id}/metrics is the engine's own Prometheus text (llama-server
    started with --metrics, as Cortex starts it), fetched with the engine's key: a scraper needs
    only the admin token. An engine without --metrics is a 502 that says so."""
    from cortex.engines import llamacpp

    # the flag as Cortex's own launch passes it (checked against llama-server --help elsewhere)
    assert "--metrics" in llamacpp.server_args(model_path="/m.gguf", served_name="x", port=8080, embed=False)
    server = start_llama_server(test_model.gguf, "--metrics", "--alias", "smollm2-metrics")
    with gateway.client() as c:
        replica = c.register("smollm2-metrics", server.base_url, engine_api_key=server.api_key)
        key = c.create_key(name="metrics")["key"]
    via_gateway(gateway, key).completions.create(model="smollm2-metrics", prompt="One, two,", max_tokens=4)
    admin = {"Authorization": f"Bearer {gateway.admin_token()}"}
    url = f"{gateway.url}/admin/replicas/{replica['id']}/metrics"

    r = httpx.get(url, headers=admin, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    predicted = [line for line in r.text.splitlines() if line.startswith("llamacpp:tokens_predicted_total")]
    assert predicted and float(predicted[0].split()[-1]) >= 1, r.text[:2000]
    assert "# TYPE llamacpp:requests_processing gauge" in r.text
    # the engine itself refuses a scrape without its key; the gateway refuses one without the admin token
    assert httpx.get(server.base_url + "/metrics", timeout=60).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 401

    r = httpx.get(f"{gateway.url}/admin/replicas/{routed['replica']['id']}/metrics", headers=admin, timeout=60)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "engine_metrics_unavailable"
    assert "501" in r.text and llama_server.api_key not in r.text  # the engine's answer, never its key
    r = httpx.get(f"{gateway.url}/admin/replicas/no-such-replica/metrics", headers=admin, timeout=60)
    assert r.status_code == 404 and "no replica" in r.json()["error"]["message"]

    # `cortex hosts --prometheus-targets`: file_sd groups whose __metrics_path__ is that route
    listed = subprocess.run(
        [sys.executable, "-m", "cli", "hosts", "--prometheus-targets"],
        env=gateway.env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    groups = {g["labels"]["replica"]: g for g in json.loads(listed.stdout)}
    group = groups[replica["id"]]
    assert group["targets"] == [gateway.url.removeprefix("http://")]
    assert group["labels"]["__scheme__"] == "http" and group["labels"]["model"] == "smollm2-metrics"
    scraped = httpx.get(gateway.url + group["labels"]["__metrics_path__"], headers=admin, timeout=60)
    assert scraped.status_code == 200 and "llamacpp:prompt_tokens_total" in scraped.text


def test_embeddings_match_the_engine(gateway, start_llama_server, test_model):
    embedder = start_llama_server(test_model.gguf, "--embeddings", "--pooling", "mean", "--alias", "smollm2-embed")
    with gateway.client() as c:
        c.register("smollm2-embed", embedder.base_url, engine_api_key=embedder.api_key)
        key = c.create_key()["key"]
    through = via_gateway(gateway, key).embeddings.create(model="smollm2-embed", input=["hello world", "bonjour"])
    straight = direct(embedder).embeddings.create(model="smollm2-embed", input=["hello world", "bonjour"])
    assert len(through.data) == 2
    assert through.data[0].embedding == straight.data[0].embedding
    assert len(through.data[0].embedding) == 576  # SmolLM2-135M hidden size


def test_engine_killed_mid_stream_gives_clean_error_then_503(tmp_path, start_llama_server, test_model):
    # No health check to race the stream: the failed request is what takes the replica out.
    gw = GatewayProcess(tmp_path / "home", env={"CORTEX_GATEWAY_HEALTH_INTERVAL": "3600"}).start()
    try:
        victim = start_llama_server(test_model.gguf, "--alias", "smollm2")
        with gw.client() as c:
            c.register("smollm2", victim.base_url, engine_api_key=victim.api_key)
            key = c.create_key()["key"]
        g = via_gateway(gw, key)
        received = 0
        # ignore_eos and room for thousands of tokens: the answer cannot be over by the third chunk.
        with pytest.raises(openai.APIError) as err:
            for chunk in g.chat.completions.create(
                model="smollm2",
                messages=MESSAGES,
                stream=True,
                max_tokens=4096,
                temperature=0,
                extra_body={"ignore_eos": True},
            ):
                received += 1
                if received == 3:
                    victim.process.kill()
        assert received >= 3
        # An error event, not a hang (that would end in the client's timeout, with another message).
        assert "failed mid-response" in str(err.value.message)
        with pytest.raises(openai.InternalServerError) as err:
            g.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=4)
        assert err.value.status_code == 503
        assert int(err.value.response.headers["retry-after"]) >= 1
    finally:
        gw.stop()


def test_redeploy_under_load_loses_no_request(tmp_path, start_llama_server, test_model):
    # No health checks during the test: under 20 clients a slow /health must not take a replica
    # out. Registration marks a replica healthy, and the drain is what is tested.
    gw = GatewayProcess(
        tmp_path / "home", env={"CORTEX_GATEWAY_HEALTH_INTERVAL": "3600", "CORTEX_GATEWAY_HEALTH_TIMEOUT": "5"}
    ).start()
    try:
        old = start_llama_server(test_model.gguf, "--alias", "smollm2")
        with gw.client() as c:
            r_old = c.register("smollm2", old.base_url, engine_api_key=old.api_key)
            key = c.create_key()["key"]
        stop = threading.Event()
        served: list[str] = []
        errors: list[str] = []

        def client_loop() -> None:
            g = via_gateway(gw, key)
            while not stop.is_set():
                try:
                    resp = g.chat.completions.with_raw_response.create(
                        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
                    )
                    resp.parse()
                    served.append(resp.headers["x-cortex-replica"])
                except Exception as exc:  # any failure is the test's finding
                    errors.append(repr(exc))

        threads = [threading.Thread(target=client_loop) for _ in range(20)]
        for t in threads:
            t.start()
        # Traffic on the old replica first (counted, not slept for: a slow machine serves less in 3 s).
        wait_until(lambda: len(served) >= 20 or errors, "20 requests served by the old replica")
        new = start_llama_server(
            test_model.gguf, "--alias", "smollm2"
        )  # the new replica comes up while the old one serves
        with gw.client() as c:
            r_new = c.register("smollm2", new.base_url, engine_api_key=new.api_key)
            c.drain(r_old["id"], wait=True, timeout=600)
            drained_at = len(served)
        old.stop()  # only after the gateway has removed it
        wait_until(lambda: served.count(r_new["id"]) >= 20 or errors, "20 requests served by the new replica")
        stop.set()
        for t in threads:
            t.join(120)
        assert errors == [], errors[:5]
        assert served.count(r_old["id"]) > 0 and served.count(r_new["id"]) > 0
        # Once drained, no request went to the old one (20 may still be on their way to the list).
        assert r_old["id"] not in served[drained_at + 20 :]
        print(
            f"\nredeploy under 20 clients: {len(served)} requests, 0 errors "
            f"({served.count(r_old['id'])} old, {served.count(r_new['id'])} new)"
        )
    finally:
        gw.stop()


def test_affinity_and_fallbacks_on_two_llama_servers(tmp_path, llama_server, start_llama_server, test_model):
    """Two real llama-servers: a shared prompt opening stays on one replica, whose prefix cache
    then serves it (the engine's own `timings.cache_n`); a retired model's requests are served
    by its fallback, and by the model itself again once it is back."""
    second = start_llama_server(test_model.gguf, "--alias", "smollm2,primary")
    gw = GatewayProcess(tmp_path / "home", no_auth=True, env={"CORTEX_GATEWAY_HEALTH_TIMEOUT": "30"}).start()
    try:
        with gw.client() as c:
            c.register("smollm2", llama_server.base_url, engine_api_key=llama_server.api_key, replica_id="smol-a")
            c.register("smollm2", second.base_url, engine_api_key=second.api_key, replica_id="smol-b")
            primary = c.register("primary", second.base_url, engine_api_key=second.api_key, fallbacks=["smollm2"])
        system = "You answer questions about the solar system in one short sentence. " * 20

        def ask(model: str, *turns: str):
            messages = [{"role": "system", "content": system}]
            for i, text in enumerate(turns):
                messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
            r = httpx.post(
                gw.url + "/v1/chat/completions",
                timeout=300,
                json={"model": model, "max_tokens": 2, "messages": messages},
            )
            assert r.status_code == 200, r.text
            return r

        # One conversation, turn after turn: every turn opens the same way, so it reaches the
        # replica that served the turns before, and that engine finds them in its prefix cache.
        turns = ["What is the largest planet?"]
        answers = []
        for question in ("And the smallest?", "And the hottest?", None):
            answers.append(ask("smollm2", *turns))
            if question is not None:
                turns += [answers[-1].json()["choices"][0]["message"]["content"], question]
        replicas = {r.headers["x-cortex-replica"] for r in answers}
        assert len(replicas) == 1, replicas
        assert all(r.json()["timings"]["cache_n"] > 0 for r in answers[1:]), [r.json()["timings"] for r in answers]

        r = ask("primary", "Hi")
        assert r.headers["x-cortex-model"] == "primary" and r.headers["x-cortex-replica"] == primary["id"]
        with gw.client() as c:
            c.deregister(primary["id"])
        r = ask("primary", "Hi")
        assert r.headers["x-cortex-model"] == "smollm2" and r.headers["x-cortex-replica"] in ("smol-a", "smol-b")
        # the body's `model` is the engine's own (llama-server names its first alias in sorted
        # order: "primary" on the second server even when asked for "smollm2"), not rewritten
        engine = {"smol-a": llama_server, "smol-b": second}[r.headers["x-cortex-replica"]]
        direct_answer = httpx.post(
            engine.base_url + "/v1/chat/completions",
            headers=engine.headers,
            timeout=300,
            json={"model": "smollm2", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert r.json()["model"] == direct_answer.json()["model"]
        with gw.client() as c:
            c.register("primary", second.base_url, engine_api_key=second.api_key)
        r = ask("primary", "Hi")
        assert r.headers["x-cortex-model"] == "primary"
    finally:
        gw.stop()
