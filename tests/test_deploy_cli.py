"""`cortex deploy`, `cortex status` and `cortex retire` as an operator runs them: a SmolLM2
spec deployed on the embedded default (process), then moved to a container (the docker
runtime replaces the process replica), then retired. Real llama-server, real dockerd with
Cortex's llama.cpp image (scripts/docker-setup), Cortex's local Prefect server (started by the
first command, reused by the next ones, stopped with `cortex prefect stop`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

SETUP = "run `scripts/docker-setup` (installs docker.io, starts dockerd, builds the image offline)"


def cortex(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    environment = dict(os.environ)
    environment.update(
        CORTEX_HOME=str(tmp_path / "home"),
        PREFECT_HOME=str(tmp_path / "prefect"),
        CORTEX_GATEWAY_URL="http://127.0.0.1:9",
    )
    environment.pop("PREFECT_API_URL", None)  # as an operator runs it: Cortex's local Prefect server
    yield environment
    stopped = cortex("prefect", "stop", env=environment)
    assert stopped.returncode == 0, stopped.stderr


def test_deploy_status_switch_runtime_and_retire(tmp_path: Path, env: dict[str, str], toolchain, test_model) -> None:
    import docker

    try:
        client = docker.from_env()
        client.images.get("cortex/llamacpp-server:0.3.36-cpu")
    except docker.errors.DockerException as exc:
        pytest.fail(f"Docker or the llama.cpp image is missing ({exc}); {SETUP}", pytrace=False)

    spec = tmp_path / "smollm2.yaml"
    spec.write_text(
        "name: smollm2-cli\n"
        "aliases: [smol-cli]\n"
        f"source:\n  gguf: {test_model.gguf}\n"
        "resources:\n  concurrency: 1\n  context_length: 1024\n"
        "runtime: process\n"
        "tests:\n  prompts: ['Say hello in one short sentence.']\n  max_tokens: 8\n"
    )
    try:
        deployed = cortex("deploy", str(spec), "--json", env=env)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        result = json.loads(deployed.stdout)
        assert (result["name"], result["engine"], result["runtime"]) == ("smollm2-cli", "llamacpp", "process")
        assert result["smoke"]["passed"] and result["gateway"] == "not running"
        server = json.loads(cortex("prefect", "status", "--json", env=env).stdout)
        assert server["running"] and server["home"] == str(tmp_path / "home" / "prefect"), server
        answer = httpx.post(
            result["endpoint"] + "/v1/chat/completions",
            json={"model": "smollm2-cli", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            headers={"Authorization": f"Bearer {_engine_key(env, result['replica'])}"},
            timeout=60,
        ).json()
        assert answer["choices"][0]["message"]["content"].strip()

        status = json.loads(cortex("status", "--json", env=env).stdout)
        [row] = [r for r in status if r["name"] == "smollm2-cli"]
        assert (row["runtime"], row["health"], row["endpoint"]) == ("process", "ok", result["endpoint"])

        # A redeploy whose engine rejects a value: clear failure, the old replica still serves.
        broken = tmp_path / "broken.yaml"
        broken.write_text(spec.read_text() + "llamacpp:\n  extra_args: ['--reasoning-format', 'bogus']\n")
        failed = cortex("deploy", str(broken), env=env)
        assert failed.returncode == 1
        assert "deploy of" in failed.stderr and "exited with code 1 before it became ready" in failed.stderr
        assert (
            "hint: unknown flag or value" in failed.stderr and 'handling argument "--reasoning-format"' in failed.stderr
        )
        status = json.loads(cortex("status", "--json", env=env).stdout)
        assert [(r["replica"], r["health"]) for r in status if r["name"] == "smollm2-cli"] == [
            (result["replica"], "ok")
        ]

        moved = cortex("deploy", str(spec), "--runtime", "docker", "--json", env=env)
        assert moved.returncode == 0, moved.stderr[-3000:]
        in_docker = json.loads(moved.stdout)
        assert in_docker["runtime"] == "docker" and in_docker["smoke"]["passed"]
        assert in_docker["stopped"] == [result["replica"]]  # the process replica was replaced
        container = client.containers.get(in_docker["replica"])
        assert container.status == "running" and container.name.startswith("llamacpp-model-smollm2-cli-")
        status = json.loads(cortex("status", "--json", env=env).stdout)
        assert [(r["runtime"], r["health"]) for r in status if r["name"] == "smollm2-cli"] == [("docker", "ok")]
    finally:
        retired = cortex("retire", "smollm2-cli", "--json", env=env)
    assert retired.returncode == 0, retired.stderr[-3000:]
    assert json.loads(retired.stdout)["stopped"] == [in_docker["replica"]]
    assert "smollm2-cli" not in cortex("status", env=env).stdout
    failed = cortex("retire", "smollm2-cli", env=env)
    assert failed.returncode == 1 and "no replica of model 'smollm2-cli'" in failed.stderr
    # every command ran its flow on the one local server the first command started
    assert json.loads(cortex("prefect", "status", "--json", env=env).stdout)["pid"] == server["pid"]


def _engine_key(env: dict[str, str], replica: str) -> str:
    """The engine API key Cortex gave the replica (kept in its 0600 state file)."""
    state = Path(env["CORTEX_HOME"]) / "runtime" / "process" / "replicas" / f"{replica}.json"
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    return json.loads(state.read_text())["api_key"]
