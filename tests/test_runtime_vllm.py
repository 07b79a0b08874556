"""vLLM (the CPU build) serving the SmolLM2 HF checkpoint, deployed by the deploy flow through
the process runtime, passes the same smoke tests as llama.cpp. Two to five minutes to healthy
on this machine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from prefect.testing.utilities import prefect_test_harness

from cortex.launch import LaunchSpec, Mount
from cortex.probe import smoke_test
from cortex.runtime import get_runtime
from cortex.runtime.process import ProcessRuntime
from cortex.runtime.rollout import RolloutRequest, SmokeRequest
from flows.deploy import retire_model, roll_out
from runtime_helpers import SECRETS, process_group_alive


def vllm_launch(hf_dir: Path, model: str = "smollm2-vllm") -> LaunchSpec:
    """Shaped as cortex.launch.build_launch makes it for vLLM: the container's argv."""
    return LaunchSpec(
        engine="vllm",
        engine_version="0.32.0",
        image="vllm/vllm-openai:v0.32.0",
        name=f"vllm-model-{model}-test",
        model=model,
        command=[
            "python3",
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            f"/models/{model}",
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--served-model-name",
            model,
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "4",
        ],
        env={"VLLM_API_KEY": {"secret": "engine_api_key"}, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
        mounts=[Mount(str(hf_dir), f"/models/{model}")],
        gpus=[],
        port=8000,
        stop_timeout_s=5,
        ipc_mode="host",
        labels={"ai.cortex.model": model},
    )


def test_vllm_cpu_deploys_through_the_flow_and_passes_the_smoke_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vllm_install, test_model
) -> None:
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CORTEX_GATEWAY_URL", "http://127.0.0.1:9")  # no gateway here
    with prefect_test_harness(server_startup_timeout=120):
        try:
            result = roll_out(
                RolloutRequest(
                    launch=vllm_launch(test_model.hf_dir), smoke=SmokeRequest(max_tokens=8), ready_timeout=900
                )
            )
            assert (result.engine, result.runtime) == ("vllm", "process")
            assert result.smoke.passed, result.smoke
            assert [c.name for c in result.smoke.checks] == ["models", "chat", "completion", "stream"]
            [replica] = get_runtime("process").list()
            unauthorised = smoke_test(replica.endpoint, "smollm2-vllm", api_key="wrong", max_tokens=4)
            assert "401" in unauthorised.failures()[0].detail
        finally:
            stopped = retire_model("smollm2-vllm")
    assert stopped == [result.replica]
    # vLLM's engine-core child process is in the same process group: all of it is gone.
    assert not process_group_alive(int(replica.ref))
    assert get_runtime("process").list() == []


def test_vllm_rejecting_a_removed_flag_fails_with_the_unknown_flag_hint(
    tmp_path: Path, vllm_install, test_model
) -> None:
    from cortex.runtime import EngineNotReady

    runtime = ProcessRuntime(state_dir=tmp_path / "state")
    launch = vllm_launch(test_model.hf_dir)
    launch = dataclasses.replace(
        launch, command=[*launch.command, "--swap-space", "4"]
    )  # the seed's flag; vLLM 0.32 removed it
    replica = runtime.start(launch, SECRETS)
    with pytest.raises(EngineNotReady) as failure:
        runtime.wait_ready(replica, timeout_s=300)
    assert failure.value.hint.startswith("unknown flag"), failure.value
    assert "--swap-space" in failure.value.logs
    assert runtime.list() == [] and not process_group_alive(int(replica.ref))
