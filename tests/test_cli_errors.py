"""Operator errors on the command line are one line on stderr and exit 1, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys


def _cortex(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def test_gateway_commands_without_a_gateway_say_what_to_do(tmp_path):
    env = {"CORTEX_HOME": str(tmp_path)}
    for args in (["keys", "list"], ["gateway", "replicas"]):
        done = _cortex(*args, env={**env, "CORTEX_ADMIN_TOKEN": ""})
        assert done.returncode == 1, done
        assert "Traceback" not in done.stderr and "CORTEX_ADMIN_TOKEN" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    # a token but nothing listening (port 9, discard: refused on loopback)
    done = _cortex(
        "gateway", "replicas", env={**env, "CORTEX_ADMIN_TOKEN": "x", "CORTEX_GATEWAY_URL": "http://127.0.0.1:9"}
    )
    assert done.returncode == 1 and "unreachable" in done.stderr and "Traceback" not in done.stderr
