"""The hand-over to the gateway: a deployed replica is routed by name and alias, a redeploy
routes to the new replica and drains the old one before stopping it, a failed redeploy leaves
the route untouched, and retire takes the model out of the gateway. Real gateway process,
real llama-server, Prefect's test harness."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prefect.testing.utilities import prefect_test_harness

from cortex.gateway.client import GatewayClient
from cortex.testing.gateway import GatewayProcess
from cortex.probe import SmokeTestFailed, smoke_test
from cortex.runtime import get_runtime
from cortex.runtime.rollout import RolloutRequest, SmokeRequest
from flows.deploy import retire_model, roll_out
from runtime_helpers import llamacpp_launch


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toolchain):
    home = tmp_path / "home"
    gw = GatewayProcess(home, no_auth=True, env={"CORTEX_GATEWAY_HEALTH_INTERVAL": "0.3"}).start()
    monkeypatch.setenv("CORTEX_HOME", str(home))
    monkeypatch.setenv("CORTEX_GATEWAY_URL", gw.url)
    with prefect_test_harness(server_startup_timeout=120):
        yield gw
    runtime = get_runtime("process")
    for replica in runtime.list():
        runtime.stop(replica)
    gw.stop()


def _roll_out(launch, **smoke):
    request = RolloutRequest(launch=launch, aliases=["smol"], fallbacks=["smollm2-q8"], smoke=SmokeRequest(**smoke))
    return roll_out(request)


def _routes(model: str) -> list[str]:
    with GatewayClient() as client:
        return [r["id"] for r in client.replicas_of(model)]


def test_deploys_hand_over_to_the_gateway_and_retire_takes_the_route_away(gateway: GatewayProcess, test_model) -> None:
    first = _roll_out(llamacpp_launch(test_model.gguf, "smollm2"), max_tokens=8)
    assert first.gateway == "registered"
    assert _routes("smollm2") == [first.replica]
    with GatewayClient() as client:  # the spec's fallback list reached the gateway with the route
        assert client.list()["fallbacks"] == {"smollm2": ["smollm2-q8"]}
    result = smoke_test(gateway.url, "smollm2", max_tokens=4)  # the same smoke tests, through the gateway
    assert result.passed, result.summary()
    via_alias = httpx.post(
        gateway.url + "/v1/chat/completions",
        timeout=60,
        json={"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert via_alias.status_code == 200, via_alias.text

    second = _roll_out(llamacpp_launch(test_model.gguf, "smollm2", "-b", "256"), max_tokens=8)
    assert second.stopped == [first.replica]
    assert _routes("smollm2") == [second.replica]  # the old route was drained away
    assert smoke_test(gateway.url, "smollm2", max_tokens=4).passed

    with pytest.raises(SmokeTestFailed):
        _roll_out(llamacpp_launch(test_model.gguf, "smollm2", "--alias", "renamed"))
    assert _routes("smollm2") == [second.replica]
    assert smoke_test(gateway.url, "smollm2", max_tokens=4).passed

    assert retire_model("smollm2") == [second.replica]
    assert _routes("smollm2") == []
    gone = httpx.post(
        gateway.url + "/v1/chat/completions",
        timeout=30,
        json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert gone.status_code in (404, 503), gone.text
