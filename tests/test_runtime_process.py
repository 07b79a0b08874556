"""The process runtime on the real llama-server with the SmolLM2 GGUF: start, readiness,
smoke tests, state another process can read, stop; and the failures an operator meets
(engine killed while loading, a flag it rejects, a missing model file) end with a clear
error and nothing left running."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cortex.launch import Mount
from cortex.probe import smoke_test
from cortex.runtime import EngineNotReady, LaunchError, failure_hint
from cortex.runtime import process as process_module
from cortex.runtime.process import ProcessRuntime, host_path, translate_command
from runtime_helpers import SECRETS, kill_now, llamacpp_launch, process_group_alive


@pytest.fixture
def runtime(tmp_path: Path, toolchain) -> ProcessRuntime:
    rt = ProcessRuntime(state_dir=tmp_path / "state")
    yield rt
    for replica in rt.list():  # a failed test must not leave engines behind
        rt.stop(replica)


# --- translation of the container command to this machine (pure) ------------------------


def test_command_is_translated_to_local_paths_program_and_loopback_port(tmp_path: Path) -> None:
    launch = llamacpp_launch(tmp_path / "m.gguf")
    argv = translate_command(launch, 41234, program=lambda cmd: ["/opt/llama/bin/llama-server"])
    assert argv[0] == "/opt/llama/bin/llama-server"
    assert argv[argv.index("-m") + 1] == str(tmp_path / "m.gguf")
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "41234"
    assert "0.0.0.0" not in argv and "8080" not in argv


def test_vllm_module_command_keeps_its_arguments_after_the_venv_python(tmp_path: Path) -> None:
    launch = dataclasses.replace(
        llamacpp_launch(tmp_path / "m.gguf"),
        name="vllm-model-x",
        engine="vllm",
        port=8000,
        command=[
            "python3",
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            "/models/smol",
            "--served-model-name",
            "smol",
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
        ],
        mounts=[Mount(str(tmp_path / "hf"), "/models/smol")],
    )
    argv = translate_command(launch, 5000, program=lambda cmd: ["/venv/bin/python", "-m", cmd[2]])
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(tmp_path / "hf")
    assert argv[argv.index("--port") + 1] == "5000"


def test_host_path_prefers_the_longest_mount_and_handles_flag_equals_value() -> None:
    mounts = [Mount("/data", "/models"), Mount("/cache/x", "/models/x")]
    assert host_path("/models/x/w.gguf", mounts) == "/cache/x/w.gguf"
    assert host_path("/models/y.gguf", mounts) == "/data/y.gguf"
    assert host_path("--model=/models/y", mounts) == "--model=/data/y"
    assert host_path("/modelsextra", mounts) == "/modelsextra"


def test_unknown_program_is_refused_with_what_to_do(tmp_path: Path) -> None:
    launch = llamacpp_launch(tmp_path / "m.gguf")
    launch = dataclasses.replace(launch, command=["text-generation-launcher", *launch.command[1:]])
    with pytest.raises(LaunchError, match="use --runtime docker"):
        translate_command(launch, 1)


@pytest.mark.parametrize(
    "log, expected",
    [
        ("ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 9999", "out of memory"),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "out of memory"),
        ("error: invalid argument: --no-such-flag", "unknown flag"),
        ("api_server.py: error: unrecognized arguments: --swap-space 4", "unknown flag"),
        ("gguf_init_from_file: failed to open GGUF file '/models/x.gguf' (No such file or directory)", "missing file"),
        ("couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8080", "port in use"),
        ("OSError: [Errno 98] Address already in use", "port in use"),
    ],
)
def test_failure_hints_name_the_known_patterns(log: str, expected: str) -> None:
    assert failure_hint(log).startswith(expected)


def test_sigkill_without_a_known_message_hints_at_the_oom_killer() -> None:
    assert "OOM killer" in failure_hint("loading model...", exit_code=-9)
    assert failure_hint("loading model...", exit_code=1) is None


# --- the real engine ---------------------------------------------------------------------


def test_llama_server_starts_serves_smoke_tests_and_stops(runtime: ProcessRuntime, test_model) -> None:
    launch = llamacpp_launch(test_model.gguf, "smollm2")
    replica = runtime.start(launch, SECRETS)
    assert replica.endpoint.startswith("http://127.0.0.1:")
    runtime.wait_ready(replica, timeout_s=120)

    result = smoke_test(replica.endpoint, "smollm2", api_key=replica.api_key, max_tokens=8)
    assert result.passed, result.summary()
    assert [c.name for c in result.checks] == ["models", "chat", "completion", "stream"]

    # The engine enforces the API key the launch references as a secret.
    unauthorised = smoke_test(replica.endpoint, "smollm2", api_key="wrong", max_tokens=4)
    assert not unauthorised.passed and "401" in unauthorised.failures()[0].detail

    # Another process (a fresh runtime on the same state dir) sees it, with its health.
    other = ProcessRuntime(state_dir=runtime.state_dir)
    [seen] = other.list()
    assert (seen.name, seen.endpoint, seen.engine) == (replica.name, replica.endpoint, "llamacpp")
    assert seen.launch == launch and seen.model == launch.model == "smollm2"  # the typed launch, read back
    assert other.health(seen) == "ok" and other.is_running(seen)

    other.stop(seen)  # stopping from the other process works too
    assert runtime.list() == []
    assert not process_group_alive(int(replica.ref))
    assert runtime.health(replica) == "down"


def test_engine_killed_during_readiness_fails_clearly_and_leaves_nothing(runtime: ProcessRuntime, test_model) -> None:
    replica = runtime.start(llamacpp_launch(test_model.gguf, "smollm2", "--no-warmup"), SECRETS)
    kill_now(int(replica.ref))
    with pytest.raises(EngineNotReady) as failure:
        runtime.wait_ready(replica, timeout_s=60)
    message = str(failure.value)
    assert "exited with code -9 before it became ready" in message
    assert "killed (SIGKILL" in message
    assert runtime.list() == []
    assert not process_group_alive(int(replica.ref))


def test_a_flag_the_engine_rejects_names_the_flag_and_leaves_nothing(runtime: ProcessRuntime, test_model) -> None:
    replica = runtime.start(llamacpp_launch(test_model.gguf, "smollm2", "--no-such-flag"), SECRETS)
    with pytest.raises(EngineNotReady) as failure:
        runtime.wait_ready(replica, timeout_s=60)
    assert failure.value.hint.startswith("unknown flag")
    assert "--no-such-flag" in failure.value.logs
    assert runtime.list() == []


def test_a_missing_model_file_is_reported_as_such(runtime: ProcessRuntime, test_model, tmp_path: Path) -> None:
    launch = llamacpp_launch(tmp_path / "absent.gguf", "smollm2")
    replica = runtime.start(launch, SECRETS)
    with pytest.raises(EngineNotReady) as failure:
        runtime.wait_ready(replica, timeout_s=60)
    assert failure.value.hint.startswith("missing file"), failure.value
    assert str(tmp_path / "absent.gguf") in failure.value.logs
    assert runtime.list() == []


def test_a_context_that_cannot_fit_in_memory_gets_the_out_of_memory_hint(runtime: ProcessRuntime, test_model) -> None:
    # 200M tokens of KV cache is terabytes: llama-server fails to allocate it and exits.
    launch = llamacpp_launch(test_model.gguf, "smollm2", "--fit", "off")
    command = list(launch.command)
    command[command.index("-c") + 1] = "200000000"
    launch = dataclasses.replace(launch, command=command)
    replica = runtime.start(launch, SECRETS)
    with pytest.raises(EngineNotReady) as failure:
        runtime.wait_ready(replica, timeout_s=120)
    assert failure.value.hint.startswith("out of memory"), failure.value
    assert "failed to allocate" in failure.value.logs
    assert runtime.list() == []


def test_a_port_taken_meanwhile_gets_the_port_in_use_hint(
    runtime: ProcessRuntime, test_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another program takes the port between Cortex choosing it and the engine binding it.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(process_module, "free_port", lambda host="127.0.0.1": taken.getsockname()[1])
        replica = runtime.start(llamacpp_launch(test_model.gguf, "smollm2"), SECRETS)
        with pytest.raises(EngineNotReady) as failure:
            runtime.wait_ready(replica, timeout_s=60)
    assert failure.value.hint.startswith("port in use"), failure.value
    assert runtime.list() == []


def test_timeout_stops_the_engine_and_says_where_it_waited(runtime: ProcessRuntime, test_model) -> None:
    replica = runtime.start(llamacpp_launch(test_model.gguf, "smollm2"), SECRETS)
    with pytest.raises(EngineNotReady, match=r"was not healthy at http://127\.0\.0\.1:\d+/health after 0 s"):
        runtime.wait_ready(replica, timeout_s=0)
    assert runtime.list() == []
    assert not process_group_alive(int(replica.ref))


def test_state_survives_the_process_that_started_the_engine(tmp_path: Path, test_model, toolchain) -> None:
    """Start from a separate Python process that exits; this one finds, checks and stops it."""
    state = tmp_path / "state"
    launch_file = tmp_path / "launch.json"
    launch_file.write_text(json.dumps(llamacpp_launch(test_model.gguf, "smollm2").to_json()))
    script = (
        "import json, sys; from cortex.launch import LaunchSpec; from cortex.runtime.process import ProcessRuntime;"
        f"rt = ProcessRuntime(state_dir={str(state)!r});"
        f"r = rt.start(LaunchSpec.from_json(json.load(open({str(launch_file)!r}))), {{'engine_api_key': 'k'}});"
        "rt.wait_ready(r, 120); print(r.ref)"
    )
    pid = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    runtime = ProcessRuntime(state_dir=state)
    try:
        [replica] = runtime.list()
        assert replica.ref == str(pid) and replica.api_key == "k"
        assert runtime.health(replica) == "ok"
        assert runtime.cleanup_orphans() == []  # it runs: not an orphan
    finally:
        runtime.stop(replica)
    assert not process_group_alive(pid)
    assert runtime.list() == []


def test_cleanup_orphans_removes_replicas_whose_engine_died(runtime: ProcessRuntime, test_model) -> None:
    replica = runtime.start(llamacpp_launch(test_model.gguf, "smollm2"), SECRETS)
    runtime.wait_ready(replica, 120)
    kill_now(int(replica.ref))
    deadline = time.monotonic() + 10
    while runtime.is_running(replica) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [r.name for r in runtime.cleanup_orphans()] == [replica.name]
    assert runtime.list() == []


# --- the engine's environment (issue 15 section 5) ------------------------------------------


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_a_real_llama_server_gets_a_minimal_environment_and_the_safe_extra_flag(
    runtime: ProcessRuntime,
    test_model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The deploying shell's HF_TOKEN, a canary variable and a LLAMA_ARG_* setting never reach the
    engine; its API key, PATH and what the spec's engine env names do; a safe extra flag is in
    its command line. Read from the running llama-server's /proc/PID/environ and cmdline."""
    from cortex.pipeline import plan_spec_file

    monkeypatch.setenv("HF_TOKEN", "hf_canary_token_must_not_leak")
    monkeypatch.setenv("CORTEX_TEST_CANARY", "leaked")
    monkeypatch.setenv("LLAMA_ARG_LOG_FILE", str(tmp_path / "written-by-an-inherited-flag.log"))
    spec = tmp_path / "envtest.yaml"
    spec.write_text(
        f"name: envtest\nsource:\n  gguf: {test_model.gguf}\nengine: llamacpp\nresources:\n  context_length: 512\n"
        "llamacpp:\n  threads: 2\n  extra_args: ['--temp', '0.25']\n  env: {OMP_WAIT_POLICY: PASSIVE}\n"
    )
    launch = plan_spec_file(spec).launch
    replica = runtime.wait_ready(runtime.start(launch, secrets=SECRETS), timeout_s=180)
    pid = int(replica.ref)
    env = _environ_of(pid)
    assert "HF_TOKEN" not in env and "CORTEX_TEST_CANARY" not in env and "LLAMA_ARG_LOG_FILE" not in env
    assert not (tmp_path / "written-by-an-inherited-flag.log").exists()
    assert env["LLAMA_API_KEY"] == SECRETS["engine_api_key"]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "PATH" in env
    assert set(env) <= {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "LD_LIBRARY_PATH",
        "XDG_CACHE_HOME",
        "CUDA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "LLAMA_API_KEY",
        "OMP_WAIT_POLICY",
    } | {k for k in env if k.startswith("LC_")}, sorted(env)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("--temp") + 1] == "0.25"
    result = smoke_test(replica.endpoint, "envtest", api_key=replica.api_key, max_tokens=4)
    assert result.passed, result.summary()
