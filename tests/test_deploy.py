"""The deploy flow on the process runtime with the real llama-server and Prefect: a new replica
replaces the old one only once it is healthy and tested; a replica that cannot start or fails
its smoke tests is removed by the transaction's rollback and the old one keeps serving."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prefect.testing.utilities import prefect_test_harness

from cortex.probe import SmokeTestFailed, smoke_test
from cortex.runtime import EngineNotReady, get_runtime
from cortex.runtime.rollout import RolloutRequest, SmokeRequest
from flows.deploy import DeployBusy, host_deploy_slot, retire_model, roll_out
from runtime_helpers import llamacpp_launch, process_group_alive


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def cortex_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api, toolchain) -> Path:
    home = tmp_path / "cortex-home"
    monkeypatch.setenv("CORTEX_HOME", str(home))
    monkeypatch.setenv("CORTEX_GATEWAY_URL", "http://127.0.0.1:9")  # no gateway in these tests
    yield home
    runtime = get_runtime("process")
    for replica in runtime.list():
        runtime.stop(replica)


def _roll_out(launch, **smoke):
    return roll_out(RolloutRequest(launch=launch, smoke=SmokeRequest(**smoke)))


def _serving(replica_name: str) -> dict:
    [replica] = [r for r in get_runtime("process").list() if r.name == replica_name]
    result = smoke_test(replica.endpoint, replica.model, api_key=replica.api_key, max_tokens=4)
    assert result.passed, result.summary()
    return replica


def test_redeploys_replace_the_replica_and_failed_ones_roll_back(cortex_home: Path, test_model) -> None:
    first = _roll_out(llamacpp_launch(test_model.gguf, "smollm2"), max_tokens=8)
    assert first.smoke.passed and first.gateway == "not running"
    assert first.endpoint.startswith("http://127.0.0.1:") and first.stopped == []
    assert list(first.to_json()) == ["name", "engine", "runtime", "endpoint", "replica", "smoke", "gateway",
                                     "reused", "stopped", "since", "benchmark"]  # `cortex deploy --json`
    old = _serving(first.replica)

    # The same launch again: nothing restarts.
    again = _roll_out(llamacpp_launch(test_model.gguf, "smollm2"), max_tokens=8)
    assert again.reused and again.replica == first.replica and again.stopped == []

    # A changed spec: a new replica, then the old one is stopped.
    second = _roll_out(llamacpp_launch(test_model.gguf, "smollm2", "-b", "256"), max_tokens=8)
    assert second.replica != first.replica and second.stopped == [first.replica]
    assert not process_group_alive(int(old.ref))
    _serving(second.replica)

    # A flag the engine rejects: clear failure, the new replica is gone, the old one serves.
    with pytest.raises(EngineNotReady) as failure:
        _roll_out(llamacpp_launch(test_model.gguf, "smollm2", "--no-such-flag"))
    assert failure.value.hint.startswith("unknown flag") and "--no-such-flag" in str(failure.value)
    assert [r.name for r in get_runtime("process").list()] == [second.replica]
    _serving(second.replica)

    # A missing model file: the same.
    with pytest.raises(EngineNotReady, match="missing file"):
        _roll_out(llamacpp_launch(Path("/nonexistent/model.gguf"), "smollm2"))
    _serving(second.replica)

    # Healthy but failing the smoke tests (extra args rename the served model, so /v1/models
    # does not list the name clients will ask for): the transaction's rollback hook removes
    # the replica that had already started and become ready.
    with pytest.raises(SmokeTestFailed) as smoke_failure:
        _roll_out(llamacpp_launch(test_model.gguf, "smollm2", "--alias", "renamed"))
    result = smoke_failure.value.result
    assert not result.passed and "not 'smollm2'" in result.failures()[0].detail
    assert [r.name for r in get_runtime("process").list()] == [second.replica]
    _serving(second.replica)
    with pytest.raises(httpx.ConnectError):  # the rejected engine no longer listens
        httpx.get(result.endpoint + "/health", timeout=2)

    # Retire: stopped and removed; retiring again says there is nothing.
    assert retire_model("smollm2") == [second.replica]
    assert get_runtime("process").list() == []
    with pytest.raises(LookupError, match="no replica of model 'smollm2'"):
        retire_model("smollm2")


def test_embeddings_deploy_checks_the_vector_dimension(cortex_home: Path, test_model) -> None:
    launch = llamacpp_launch(test_model.gguf, "smollm2-embed", "--embeddings", "--pooling", "mean")
    result = _roll_out(launch, task="embed", embedding_dim=576)
    assert result.smoke.passed
    assert [c.name for c in result.smoke.checks] == ["models", "embeddings"]
    assert "dimension 576" in result.smoke.checks[1].detail
    retire_model("smollm2-embed")


def test_a_second_deploy_on_the_same_host_waits_for_the_slot(prefect_api) -> None:
    with host_deploy_slot("process"):
        with pytest.raises(DeployBusy, match="another deploy holds cortex-deploy-"):
            with host_deploy_slot("process", timeout_s=1):
                pass
    with host_deploy_slot("process", timeout_s=5):  # released again
        pass
