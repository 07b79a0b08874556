"""Benchmark gates decide promotion: the deploy flow benchmarks a new replica inside its
transaction, so an impossible SLO fails the deploy with the measured numbers and the previous
replica keeps serving; a passing run leaves benchmark and smoke artifacts in Prefect."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from cortex.bench import GatesFailed
from cortex.probe import smoke_test
from cortex.runtime import get_runtime
from flows.deploy import retire_model, roll_out
from runtime_helpers import llamacpp_launch

SMALL = {"concurrency": [1, 2], "requests": 4, "input_len": 16, "output_len": 8}


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def cortex_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api, toolchain) -> Path:
    home = tmp_path / "cortex-home"
    monkeypatch.setenv("CORTEX_HOME", str(home))
    monkeypatch.setenv("CORTEX_GATEWAY_URL", "http://127.0.0.1:9")
    yield home
    runtime = get_runtime("process")
    for replica in runtime.list():
        runtime.stop(replica)


async def _artifact_keys() -> set[str]:
    async with get_client() as client:
        return {a.key for a in await client.read_artifacts() if a.key}


def test_impossible_slo_fails_the_deploy_and_keeps_the_old_replica(cortex_home: Path, test_model) -> None:
    first = roll_out(llamacpp_launch(test_model.gguf, "gated"), "process", max_tokens=4, benchmark=SMALL)
    assert first["benchmark"]["levels"][0]["output_tokens_per_s"] > 0
    keys = asyncio.run(_artifact_keys())
    assert any("smoke" in k for k in keys), keys
    assert any("bench" in k for k in keys), keys

    impossible = dict(SMALL, gates=[{"metric": "ttft_ms", "stat": "p99", "max": 0.001}])
    with pytest.raises(GatesFailed) as failure:
        roll_out(llamacpp_launch(test_model.gguf, "gated", "-b", "256"), "process", max_tokens=4, benchmark=impossible)
    message = str(failure.value)
    assert "ttft_ms" in message and "0.001" in message  # the measured number and the bound
    [still] = get_runtime("process").list()
    assert still.name == first["replica"]
    assert smoke_test(still.endpoint, still.model, api_key=still.api_key, max_tokens=4).passed
    retire_model("gated")


def test_quantization_quality_gates_the_deploy(cortex_home: Path, test_model, tmp_path: Path) -> None:
    """SmolLM2's HF checkpoint quantized to Q8_0, compared with its F16 reference started
    beside it: a threshold it cannot reach fails the deploy and leaves nothing running; a
    reachable one deploys and publishes the quality report."""
    from cortex.quality import QualityGateFailed
    from flows.deploy import deploy_model

    def spec(threshold: float) -> Path:
        path = tmp_path / f"q{threshold}.yaml"
        path.write_text(f"""
name: smol-q8
source: {{path: {test_model.hf_dir}}}
engine: llamacpp
quantization: Q8_0
resources: {{concurrency: 1, context_length: 512}}
tests: {{max_tokens: 4}}
benchmark:
  concurrency: [1]
  requests: 2
  input_len: 8
  output_len: 4
  quality: {{min_top1_agreement: {threshold}, prompts: 2, tokens: 8}}
""")
        return path

    with pytest.raises(QualityGateFailed):
        deploy_model(str(spec(1.0)), runtime="process", gateway=False)
    assert get_runtime("process").list() == []  # neither the candidate nor the reference is left
    result = deploy_model(str(spec(0.3)), runtime="process", gateway=False)
    assert result["smoke"]["passed"]
    assert [r.name for r in get_runtime("process").list()] == [result["replica"]]
    assert any("quality" in k for k in asyncio.run(_artifact_keys()))
    retire_model("smol-q8")
