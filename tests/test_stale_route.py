"""A dead engine's route: its engine is killed (-9), a deploy of another model cleans up its
replica, and another process starts listening on the freed port. That process must get no
request and never the engine's key, and `cortex retire` removes whatever route is left.
Real llama-server, real gateway process, process runtime, Prefect's test harness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prefect.testing.utilities import prefect_test_harness

from cortex.gateway.registry import Registry
from cortex.testing.gateway import GatewayProcess
from cortex.runtime import get_runtime
from cortex.runtime.rollout import RolloutRequest, SmokeRequest
from flows.deploy import retire_model, roll_out
from runtime_helpers import llamacpp_launch

REPO = Path(__file__).resolve().parent.parent
HEALTH_INTERVAL = 0.3


class Impostor:
    """Any HTTP server on a port: answers 200 to everything (its /v1/models lists `model`, as an
    imitation would) and records every request with its headers."""

    def __init__(self, port: int, model: str) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        impostor = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                impostor.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps(
                    {"object": "list", "data": [{"id": model, "object": "model"}]}
                    if "models" in self.path
                    else {"status": "ok"}
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toolchain):
    home = tmp_path / "home"
    gw = GatewayProcess(home, no_auth=True, env={"CORTEX_GATEWAY_HEALTH_INTERVAL": str(HEALTH_INTERVAL)}).start()
    monkeypatch.setenv("CORTEX_HOME", str(home))
    monkeypatch.setenv("CORTEX_GATEWAY_URL", gw.url)
    with prefect_test_harness(server_startup_timeout=120):
        yield gw
    runtime = get_runtime("process")
    for replica in runtime.list():
        runtime.stop(replica)
    gw.stop()


def _deploy(gguf: Path, model: str):
    return roll_out(RolloutRequest(launch=llamacpp_launch(gguf, model), smoke=SmokeRequest(max_tokens=4)))


def _routes(gw: GatewayProcess) -> dict[str, dict]:
    with gw.client() as client:
        return {r["id"]: r for r in client.list()["replicas"]}


def _health_passes(n: int) -> None:
    """Let the gateway run about `n` health passes. Only ever makes the test stricter: on a slow
    machine fewer passes happen, and fewer chances for a request to the impostor."""
    time.sleep(n * HEALTH_INTERVAL)


def _chat(gw: GatewayProcess, model: str) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        timeout=30,
        json={"model": model, "messages": [{"role": "user", "content": "a secret prompt"}], "max_tokens": 4},
    )


def test_a_killed_engines_port_taken_by_another_process_gets_no_request_and_no_key(
    gateway: GatewayProcess, test_model
) -> None:
    victim = _deploy(test_model.gguf, "victim")
    assert victim.gateway == "registered"
    [replica] = get_runtime("process").replicas_of("victim")
    engine_key = replica.api_key
    assert engine_key
    port = int(replica.endpoint.rsplit(":", 1)[1])
    os.kill(int(replica.ref), signal.SIGKILL)

    # A deploy of another model cleans up the dead replica: its route goes with it.
    other = _deploy(test_model.gguf, "other")
    assert [r.name for r in get_runtime("process").list()] == [other.replica]
    assert victim.replica not in _routes(gateway)

    impostor = Impostor(port, "victim")
    try:
        _health_passes(10)
        assert _chat(gateway, "victim").status_code == 404  # no route: the gateway knows no such model
        assert impostor.requests == []

        # A route the cleanup could not remove (the gateway was down then, or it restarted from
        # its registry): the gateway health-checks the port, but tells the impostor from the engine.
        Registry(gateway.settings.gateway_db).register(
            "victim",
            replica.endpoint,
            engine_key,
            replica_id=victim.replica,
            labels={"engine": "llamacpp", "runtime": "process"},
        )
        deadline = time.monotonic() + 60
        while not any(path == "/v1/models" for _, path, _ in impostor.requests):
            assert time.monotonic() < deadline, "the gateway never checked the stale route"
            time.sleep(0.1)
        _health_passes(5)
        route = _routes(gateway)[victim.replica]
        assert route["healthy"] is False and "not the registered engine" in route["reason"], route
        refused = _chat(gateway, "victim")
        assert refused.status_code == 503, refused.text
        assert _chat(gateway, "other").status_code == 200  # the real one still serves

        assert [
            path for method, path, _ in impostor.requests if method != "GET" or path not in ("/health", "/v1/models")
        ] == []
        for _, path, headers in impostor.requests:
            assert engine_key not in json.dumps(headers), f"the engine key reached the impostor on {path}"
            if path == "/health":
                assert "authorization" not in headers

        # `cortex retire` removes the stale route; `cortex gateway replicas` lists it no more.
        assert retire_model("victim") == [victim.replica]
        env = {**os.environ, "CORTEX_HOME": str(gateway.home), "CORTEX_GATEWAY_URL": gateway.url}
        listed = subprocess.run(
            [sys.executable, "-m", "cli", "gateway", "replicas", "--json"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listed.returncode == 0, listed.stderr
        assert [r["model"] for r in json.loads(listed.stdout)["replicas"]] == ["other"]
        seen = len(impostor.requests)
        _health_passes(5)
        assert len(impostor.requests) == seen  # no more health checks of that port
    finally:
        impostor.stop()
