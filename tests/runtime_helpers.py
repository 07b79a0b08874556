"""Launch specs for runtime, probe and deploy tests, shaped as cortex.launch.build_launch makes
them: the command as it runs inside the engine's image."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

from cortex.launch import LaunchSpec, Mount


def llamacpp_launch(
    gguf: Path,
    model: str = "smollm2",
    *extra: str,
    image: str = "cortex/llamacpp-server:0.3.36-cpu",
    model_target: str | None = None,
) -> LaunchSpec:
    """llama-server serving `gguf` (mounted read-only at /models) under the name `model`."""
    gguf = Path(gguf)
    target = model_target or f"/models/{gguf.name}"
    command = [
        "llama-server",
        "-m",
        target,
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--alias",
        model,
        "-c",
        "1024",
        "-np",
        "1",
        "-t",
        "2",
        *extra,
    ]
    digest = hashlib.sha256(json.dumps(command).encode()).hexdigest()[:8]
    return LaunchSpec(
        engine="llamacpp",
        engine_version="0.3.36",
        image=image,
        name=f"llamacpp-model-{model}-{digest}",
        model=model,
        command=command,
        env={"LLAMA_API_KEY": {"secret": "engine_api_key"}},
        mounts=[Mount(str(gguf.parent), "/models")],
        gpus=[],
        port=8080,
        labels={"ai.cortex.model": model},
    )


SECRETS = {"engine_api_key": "test-engine-key"}


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies of a process we did not wait for still count for killpg; look at their state.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def kill_now(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
