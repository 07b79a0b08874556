"""`./dev demo`'s main job, `cortex demo`, as a new user runs it: every example validated and
planned, the gateway started, SmolLM2's HF checkpoint converted, quantized, deployed with the
process runtime under Cortex's local Prefect server, smoke-tested, benchmarked, and asked a
question through the gateway. A regression here once shipped past every other test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from cortex.net import free_port


def _cortex(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_demo_answers_through_the_gateway(tmp_path: Path, toolchain, test_model) -> None:
    port = free_port()
    env = dict(os.environ)
    env.update(
        CORTEX_HOME=str(tmp_path / "home"),
        PREFECT_HOME=str(tmp_path / "prefect"),
        CORTEX_GATEWAY_URL=f"http://127.0.0.1:{port}",
        CORTEX_GATEWAY_PORT=str(port),
    )
    for name in ("PREFECT_API_URL", "CORTEX_ADMIN_TOKEN"):
        env.pop(name, None)
    done = None
    try:
        done = _cortex("demo", env=env, timeout=1500)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
        out = done.stdout
        for step in (
            "==> validate",
            "==> plan every example",
            "==> gateway at",
            "==> Prefect at",
            "==> prepare",
            "==> deploy",
            "==> ask smollm2-135m-instruct through the gateway",
        ):
            assert step in out, f"missing {step!r} in:\n{out}"
        assert "smoke tests passed" in out
        assert re.search(r"benchmark c=\d+ .* errors 0", out), out
        answer = re.search(r"^  A: (.+)$", out, re.M)
        assert answer and answer.group(1).strip(), out
        assert "Traceback" not in done.stderr
    finally:
        _cortex("retire", "smollm2-135m-instruct", env=env)
        started = re.search(r"started \(pid (\d+)", done.stdout if done else "")
        if started:
            try:
                os.killpg(int(started.group(1)), signal.SIGTERM)
            except ProcessLookupError:  # it already exited: nothing left to stop
                started = None
        stopped = _cortex("prefect", "stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
