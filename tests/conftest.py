"""Shared fixtures on the real parts: the llama.cpp toolchain, vLLM (CPU), the SmolLM2 test
model, a running llama-server, and GGUF files made from the test model.

A missing part fails the test that needs it with the command that installs it; nothing is
skipped. Everything slow is cached in ``$CORTEX_CACHE`` (default ``~/.cache/cortex``) and
reused across sessions.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cortex import toolchain as tc
from cache_helpers import smollm2_gguf_files
from cortex.net import free_port
from pg_cluster import PostgresCluster, PostgresMissing

# The tests' Prefect servers (prefect_test_harness, `prefect server start`) send no telemetry:
# there is no network here, and each attempt would only log "Failed to send telemetry".
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# The fast tier (`./dev test --fast`, i.e. `-m "not parts"`) is every test that needs no engine,
# no test model, no Docker and no Prefect server. A test needs a part when it asks for one of
# these fixtures (directly or through another fixture), or when its module says so with
# `pytestmark = pytest.mark.parts` (a part used without a fixture, e.g. a flow run or the CLI).
PART_FIXTURES = frozenset(
    {
        "toolchain",
        "vllm_install",
        "test_model",
        "llama_server",
        "start_llama_server",
        "start_vllm_server",
        "smollm2_ggufs",
        "prefect_api",
        "prefect_server",
        "docker_runtime",
        "postgres",
        "pg_url",
    }
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "parts: needs an engine, the test model, Docker, a Prefect server or PostgreSQL (not in the fast tier)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PART_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.parts)


@pytest.fixture(scope="module", autouse=True)
def _fresh_prefect_slot_clients() -> None:
    """Prefect keeps one slot-acquisition service per concurrency-limit name per process, with a
    client to the API it first talked to. A module that starts its own Prefect server (a test
    harness) would otherwise take `cortex-deploy-<host>` slots on an earlier module's server,
    where a replica killed mid-test left its lease held: stop those services between modules."""
    import sys

    if "prefect.concurrency.services" not in sys.modules:
        return  # nothing of Prefect's concurrency was used in this process yet
    from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService

    ConcurrencySlotAcquisitionWithLeaseService.drain_all(timeout=30)


@pytest.fixture
def engine():
    """The fake OpenAI engine (cortex.testing.fake_engine) serving "smol" behind the key
    "engine-secret": the upstream of the gateway tests that need one plain replica."""
    from cortex.testing.fake_engine import FakeEngine

    e = FakeEngine(api_key="engine-secret", models=("smol",)).start()
    yield e
    e.stop()


def _require(find: Callable):
    try:
        return find()
    except tc.ToolchainMissing as missing:
        pytest.fail(f"{missing}", pytrace=False)


@pytest.fixture(scope="session")
def toolchain() -> tc.Toolchain:
    """The pinned llama.cpp toolchain (llama-server, llama-quantize, llama-perplexity,
    convert_hf_to_gguf.py)."""
    return _require(tc.find_toolchain)


@pytest.fixture(scope="session")
def vllm_install() -> tc.VllmInstall:
    """vLLM for CPU in its own virtualenv (its Python also runs the converter)."""
    return _require(tc.find_vllm)


@pytest.fixture(scope="session")
def test_model() -> tc.TestModel:
    """SmolLM2-135M-Instruct: ``.gguf`` (Q4_1, 98 MB) and ``.hf_dir`` (bf16 safetensors)."""
    return _require(tc.find_test_model)


@pytest.fixture
def port() -> int:
    return free_port()


# --- PostgreSQL (the gateway registry's shared backend) --------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster (Debian's binaries) on loopback for the whole session."""
    try:
        cluster = PostgresCluster()
    except PostgresMissing as missing:
        pytest.fail(str(missing), pytrace=False)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> str:
    """The URL of a fresh, empty database on the session's cluster."""
    return postgres.new_database()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.parts)])
def registry_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a gateway registry lives, once per backend: a SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.db")
    return request.getfixturevalue("pg_url")


# --- llama-server ----------------------------------------------------------------------


@dataclass
class EngineServer:
    """An engine's OpenAI-compatible server process on loopback, ready when handed out."""

    base_url: str  # http://127.0.0.1:PORT (the OpenAI API is under /v1)
    api_key: str
    port: int
    model_path: Path
    process: subprocess.Popen
    log_path: Path
    startup_seconds: float = 0.0
    stop_timeout_s: float = 10.0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class LlamaServer(EngineServer):
    """llama-server (graceful stop 10 s)."""


@dataclass
class VllmServer(EngineServer):
    """vLLM's API server (graceful stop 5 s)."""

    stop_timeout_s: float = 5.0


def launch_llama_server(
    toolchain: tc.Toolchain,
    model_path: Path,
    *extra_args: str,
    log_dir: Path,
    ready_timeout: float = 180.0,
) -> LlamaServer:
    """Start llama-server on ``model_path`` with a fresh API key; return once it is healthy."""
    port = free_port()
    api_key = secrets.token_hex(16)
    log_path = log_dir / f"llama-server-{port}.log"
    cmd = [
        str(toolchain.llama_server),
        "--model",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        api_key,
        *extra_args,
    ]
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd).replace(api_key, '***')}\n")
        log.flush()
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = LlamaServer(
        base_url=f"http://127.0.0.1:{port}",
        api_key=api_key,
        port=port,
        model_path=Path(model_path),
        process=process,
        log_path=log_path,
    )
    _wait_healthy(server, ready_timeout, "llama-server")
    server.startup_seconds = time.monotonic() - started
    return server


def _wait_healthy(server, ready_timeout: float, what: str) -> None:
    """Poll ``/health`` until 200 (503 or no answer while loading); stop the server and
    raise with its log if it exits or is not ready in time."""
    deadline = time.monotonic() + ready_timeout
    status = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{what} exited {server.process.returncode} before it was ready:\n{server.log()[-4000:]}"
            )
        try:
            status = httpx.get(f"{server.base_url}/health", timeout=2.0).status_code
        except httpx.TransportError:
            status = None  # not listening yet
        if status == 200:
            return
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(
        f"{what} was not healthy after {ready_timeout:.0f} s (last /health: {status}):\n{server.log()[-4000:]}"
    )


@pytest.fixture(scope="session")
def llama_server(
    toolchain: tc.Toolchain, test_model: tc.TestModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """llama-server on the SmolLM2 Q4_1 GGUF, served as `smollm2`, for the whole session."""
    server = launch_llama_server(
        toolchain, test_model.gguf, "--alias", "smollm2", log_dir=tmp_path_factory.mktemp("llama-server")
    )
    yield server
    server.stop()


@pytest.fixture
def start_llama_server(
    toolchain: tc.Toolchain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LlamaServer]]:
    """Factory: ``start_llama_server(model_path, *extra_args)`` starts a server of the test's
    own (ready when returned); every one is stopped after the test."""
    started: list[LlamaServer] = []
    log_dir = tmp_path_factory.mktemp("llama-server")

    def start(model_path: Path, *extra_args: str, ready_timeout: float = 180.0) -> LlamaServer:
        server = launch_llama_server(toolchain, model_path, *extra_args, log_dir=log_dir, ready_timeout=ready_timeout)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --- vLLM -------------------------------------------------------------------------------


def launch_vllm_server(
    vllm: tc.VllmInstall,
    model_path: Path,
    *extra_args: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    ready_timeout: float = 600.0,
) -> VllmServer:
    """Start vLLM (CPU) on an HF checkpoint folder; return once ``/health`` answers 200."""
    port = free_port()
    api_key = secrets.token_hex(16)
    log_path = log_dir / f"vllm-{port}.log"
    cmd = [
        *vllm.api_server_command(),
        "--model",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        api_key,
        *extra_args,
    ]
    # A small KV cache (GiB) unless the caller says otherwise: the default takes 4 GiB.
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd).replace(api_key, '***')}\n")
        log.flush()
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environment)
    server = VllmServer(
        base_url=f"http://127.0.0.1:{port}",
        api_key=api_key,
        port=port,
        model_path=Path(model_path),
        process=process,
        log_path=log_path,
    )
    _wait_healthy(server, ready_timeout, "vLLM")
    server.startup_seconds = time.monotonic() - started
    return server


@pytest.fixture
def start_vllm_server(
    vllm_install: tc.VllmInstall, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., VllmServer]]:
    """Factory: ``start_vllm_server(model_dir, *extra_args, env=None)`` starts vLLM (about
    2 minutes on CPU, ready when returned); every one is stopped after the test."""
    started: list[VllmServer] = []
    log_dir = tmp_path_factory.mktemp("vllm")

    def start(
        model_path: Path, *extra_args: str, env: dict[str, str] | None = None, ready_timeout: float = 600.0
    ) -> VllmServer:
        server = launch_vllm_server(
            vllm_install, model_path, *extra_args, log_dir=log_dir, env=env, ready_timeout=ready_timeout
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --- GGUF files made from the test model -----------------------------------------------

SMOLLM2_GGUF_TYPES = ("F16", "Q8_0", "Q4_K_M")


@pytest.fixture(scope="session")
def smollm2_ggufs(toolchain: tc.Toolchain, vllm_install: tc.VllmInstall, test_model: tc.TestModel) -> dict[str, Path]:
    """SmolLM2 from its HF checkpoint as GGUF: {"F16": path, "Q8_0": path, "Q4_K_M": path}.

    F16 by convert_hf_to_gguf.py, the others by llama-quantize from it. Built once per
    toolchain version in ``$CORTEX_CACHE/test-artifacts/`` and reused across sessions
    (cache_helpers.smollm2_gguf_files, which makes other types on request too).
    """
    return smollm2_gguf_files(SMOLLM2_GGUF_TYPES, toolchain, vllm_install, test_model)
