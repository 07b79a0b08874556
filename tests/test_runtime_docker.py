"""The docker runtime against a real Docker Engine and Cortex's llama.cpp image.

Needs a running dockerd and the image; `scripts/docker-setup` makes both offline (CI runs it
from .ci/run). Without them these tests fail with that instruction: they never skip.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from cortex.launch import LaunchSpec
from cortex.probe import smoke_test
from cortex.runtime import EngineNotReady, LaunchError, ReplicaError
from cortex.runtime.base import MANAGED_LABEL
from cortex.runtime.docker import DockerRuntime
from runtime_helpers import SECRETS, llamacpp_launch

IMAGE = os.environ.get("CORTEX_LLAMACPP_IMAGE", "cortex/llamacpp-server:0.3.36-cpu")
SETUP = "run `scripts/docker-setup` (installs docker.io, starts dockerd, builds the image offline)"


@pytest.fixture(scope="module")
def docker_runtime() -> DockerRuntime:
    try:
        rt = DockerRuntime()
    except ReplicaError as exc:
        pytest.fail(f"{exc}\n{SETUP}", pytrace=False)
    try:
        rt.client.images.get(IMAGE)
    except Exception as exc:  # docker.errors.ImageNotFound, with the daemon's message
        pytest.fail(f"image {IMAGE} is missing ({exc}); {SETUP}", pytrace=False)
    return rt


@pytest.fixture
def runtime(docker_runtime: DockerRuntime):
    yield docker_runtime
    for replica in docker_runtime.list():
        if replica.launch.labels.get("ai.cortex.test") == "1":
            docker_runtime.stop(replica)


def _launch(gguf: Path, *extra: str, model: str = "smollm2-docker") -> LaunchSpec:
    launch = llamacpp_launch(gguf, model, *extra, image=IMAGE)
    return dataclasses.replace(launch, labels={**launch.labels, "ai.cortex.test": "1"})


def test_device_requests_name_the_gpus_or_a_count() -> None:
    [by_id] = DockerRuntime.device_requests([0, 3])
    assert by_id["DeviceIDs"] == ["0", "3"] and by_id["Capabilities"] == [["gpu"]]
    [by_count] = DockerRuntime.device_requests(2)
    assert by_count["Count"] == 2
    assert DockerRuntime.device_requests([]) == [] and DockerRuntime.device_requests(None) == []


def test_an_unreachable_docker_host_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")
    with pytest.raises(ReplicaError, match=r"cannot reach the Docker daemon at tcp://127\.0\.0\.1:1"):
        DockerRuntime()


def test_container_serves_the_model_with_the_launch_settings(runtime: DockerRuntime, test_model) -> None:
    launch = _launch(test_model.gguf)
    replica = runtime.start(launch, SECRETS)
    try:
        runtime.wait_ready(replica, timeout_s=180)
        result = smoke_test(replica.endpoint, "smollm2-docker", api_key=replica.api_key, max_tokens=8)
        assert result.passed, result.summary()

        container = runtime.client.containers.get(launch.name)
        assert container.name == launch.name and container.name.startswith("llamacpp-model-")
        assert container.labels[MANAGED_LABEL] == "true"
        assert container.labels["ai.cortex.model"] == "smollm2-docker"
        assert "test-engine-key" not in container.labels["ai.cortex.launch"]  # secrets stay out of labels
        [mount] = container.attrs["Mounts"]
        assert (mount["Destination"], mount["RW"]) == ("/models", False)
        [binding] = container.attrs["NetworkSettings"]["Ports"]["8080/tcp"]
        assert binding["HostIp"] == "127.0.0.1"
        assert container.attrs["Config"]["Cmd"] == launch.command

        # A fresh runtime (another process) finds it by label, with its key and endpoint.
        [seen] = [r for r in DockerRuntime().list() if r.name == launch.name]
        assert (seen.endpoint, seen.api_key, seen.model) == (replica.endpoint, "test-engine-key", "smollm2-docker")
        assert seen.launch == launch  # the typed launch, read back from the container's label
    finally:
        runtime.stop(replica)
    assert launch.name not in [c.name for c in runtime.client.containers.list(all=True)]


def test_container_killed_during_readiness_fails_clearly_and_is_removed(runtime: DockerRuntime, test_model) -> None:
    launch = _launch(test_model.gguf, "--no-warmup")
    replica = runtime.start(launch, SECRETS)
    runtime.client.containers.get(replica.ref).kill()
    with pytest.raises(EngineNotReady, match="exited with code 137 before it became ready"):
        runtime.wait_ready(replica, timeout_s=60)
    assert launch.name not in [c.name for c in runtime.client.containers.list(all=True)]


def test_a_flag_the_engine_rejects_is_reported_and_the_container_removed(runtime: DockerRuntime, test_model) -> None:
    launch = _launch(test_model.gguf, "--no-such-flag")
    replica = runtime.start(launch, SECRETS)
    with pytest.raises(EngineNotReady) as failure:
        runtime.wait_ready(replica, timeout_s=60)
    assert failure.value.hint.startswith("unknown flag") and "--no-such-flag" in failure.value.logs
    assert launch.name not in [c.name for c in runtime.client.containers.list(all=True)]


def test_orphans_found_by_label_are_removed(runtime: DockerRuntime, test_model) -> None:
    launch = _launch(test_model.gguf)
    replica = runtime.start(launch, SECRETS)
    runtime.client.containers.get(replica.ref).kill()
    removed = runtime.cleanup_orphans()
    assert launch.name in [r.name for r in removed]
    assert launch.name not in [c.name for c in runtime.client.containers.list(all=True)]


def test_a_missing_image_says_how_to_get_it(runtime: DockerRuntime, test_model) -> None:
    launch = dataclasses.replace(_launch(test_model.gguf), image="cortex/no-such-image:0")
    with pytest.raises(LaunchError, match="cortex/no-such-image:0 is not on the Docker host"):
        runtime.start(launch, SECRETS)
    assert launch.name not in [c.name for c in runtime.client.containers.list(all=True)]


def test_the_container_env_is_only_what_the_launch_names(
    runtime: DockerRuntime, test_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deploying shell's HF_TOKEN and a canary never reach the container (docker inspect's
    Config.Env): only the image's own variables, the API key and the launch's env."""
    monkeypatch.setenv("HF_TOKEN", "hf_canary_token_must_not_leak")
    monkeypatch.setenv("CORTEX_TEST_CANARY", "leaked")
    launch = _launch(test_model.gguf, model="smollm2-env")
    launch = dataclasses.replace(launch, env={**launch.env, "OMP_WAIT_POLICY": "PASSIVE"})
    replica = runtime.start(launch, SECRETS)
    env = dict(item.split("=", 1) for item in runtime.client.api.inspect_container(replica.ref)["Config"]["Env"])
    image_env = dict(item.split("=", 1) for item in runtime.client.images.get(IMAGE).attrs["Config"].get("Env") or [])
    assert "HF_TOKEN" not in env and "CORTEX_TEST_CANARY" not in env
    assert env["LLAMA_API_KEY"] == SECRETS["engine_api_key"] and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert set(env) - set(image_env) == {"LLAMA_API_KEY", "OMP_WAIT_POLICY"}
    runtime.stop(replica)
