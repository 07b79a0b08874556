"""The deploy flow on the process runtime with the real llama-server and Prefect: a new replica
replaces the old one only once it is healthy and tested; a replica that cannot start or fails
its smoke tests is removed by the transaction's rollback and the old one keeps serving. Each
new replica's memory is held against the plan (artifact `memory-<model>`, `cortex status --json`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from cortex.facts import gguf_facts
from cortex.hardware import Inventory
from cortex.plan import MiB, make_plan
from cortex.probe import SmokeTestFailed, smoke_test
from cortex.runtime import EngineNotReady, get_runtime
from cortex.runtime.rollout import RolloutRequest, SmokeRequest, rollout_request
from cortex.specfile import parse_spec_text
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


def _planned_request(gguf: Path) -> RolloutRequest:
    """The request deploy_model makes for a SmolLM2 GGUF spec, planned for this CPU-only host."""
    spec = parse_spec_text(
        f"name: smollm2\nsource:\n  gguf: {gguf}\nresources:\n  concurrency: 1\n  context_length: 1024\n"
        "tests:\n  max_tokens: 8\n",
        "smollm2.yaml",
    )
    plan = make_plan(spec, gguf_facts(gguf), Inventory([], 2, 16 * 2**30))
    return rollout_request(spec, plan, gguf, runtime="process", source_revision="test")


def _memory_table(model: str) -> list[dict]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"memory-{model}"])))
    latest = max(found, key=lambda a: a.created)
    return json.loads(latest.data) if isinstance(latest.data, str) else latest.data


def _status_json(name: str) -> list[dict]:
    shown = subprocess.run(
        [sys.executable, "-m", "cli", "status", name, "--json", "--runtime", "process"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def test_redeploys_replace_the_replica_and_failed_ones_roll_back(cortex_home: Path, test_model) -> None:
    request = _planned_request(test_model.gguf)
    first = roll_out(request)
    assert first.smoke.passed and first.gateway == "not running"
    assert first.endpoint.startswith("http://127.0.0.1:") and first.stopped == []
    assert list(first.to_json()) == [
        "name",
        "engine",
        "runtime",
        "endpoint",
        "replica",
        "smoke",
        "gateway",
        "reused",
        "stopped",
        "since",
        "benchmark",
        "quality",
        "changes",
    ]  # `cortex deploy --json`
    old = _serving(first.replica)

    # Planned against actual: llama-server's own buffer sizes next to the plan's CPU device.
    [planned] = request.memory_plan
    [row] = _status_json("smollm2")
    memory = row["memory"]
    assert row["replica"] == first.replica and memory["readable"] and memory["engine"] == "llamacpp"
    terms = {(d["device"], d["term"]): d for d in memory["devices"]}
    assert set(terms) == {("cpu", "weights"), ("cpu", "kv_cache"), ("cpu", "overhead")}
    assert terms["cpu", "weights"]["planned_bytes"] == planned.weights_bytes
    assert terms["cpu", "weights"]["actual_bytes"] / MiB == pytest.approx(planned.weights_bytes / MiB, abs=0.01)
    assert terms["cpu", "kv_cache"]["actual_bytes"] == planned.kv_cache_bytes  # 22.50 MiB: 1024 cells, f16
    assert not terms["cpu", "weights"]["off"] and not terms["cpu", "kv_cache"]["off"]
    overhead = terms["cpu", "overhead"]  # llama-server's compute + output buffers
    assert overhead["planned_bytes"] == planned.overhead_bytes and 0 < overhead["actual_bytes"]
    # the plan's compute + output buffers, fitted to this llama-server's own logs: within 10%, no warning
    assert not overhead["off"] and abs(overhead["deviation"]) <= 0.10
    assert memory["warnings"] == []
    table = _memory_table("smollm2")
    assert [(r["device"], r["term"]) for r in table] == [("cpu", "weights"), ("cpu", "KV cache"), ("cpu", "overhead")]
    assert table[1]["planned"] == table[1]["actual"] == "22.50 MiB" and table[1]["status"] == "ok"

    # The same launch again: nothing restarts.
    again = roll_out(request)
    assert again.reused and again.replica == first.replica and again.stopped == []

    # A changed spec: a new replica, then the old one is stopped. This launch leaves llama-server
    # at its default verbosity, which hides the buffer sizes: as when the engine's report format
    # changes, the comparison says it could not be read and the deploy still succeeds.
    second = _roll_out(llamacpp_launch(test_model.gguf, "smollm2", "-b", "256"), max_tokens=8)
    assert second.replica != first.replica and second.stopped == [first.replica]
    assert not process_group_alive(int(old.ref))
    _serving(second.replica)
    [row] = _status_json("smollm2")
    assert row["replica"] == second.replica and not row["memory"]["readable"]
    assert row["memory"]["warnings"][0].startswith("llama-server's memory report could not be read")
    assert "no `model buffer size` line" in _memory_table("smollm2")[0]["problem"]

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
    assert not list((cortex_home / "memory").glob("*.json"))  # the records went with the replicas
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
    # released again. A hang guard, not a measure: Prefect answers a slot still marked taken with
    # 423 and a Retry-After, and its client waits that out before it asks again.
    with host_deploy_slot("process", timeout_s=120):
        pass
