"""Runtimes: where an engine runs. `docker` (containers, the production way) and `process`
(local subprocesses, the embedded default without Docker)."""

from __future__ import annotations

from cortex.runtime.base import (
    EngineNotReady,
    LaunchError,
    Replica,
    ReplicaError,
    ReplicaNotFound,
    Runtime,
    failure_hint,
    ready_timeout_s,
)

RUNTIMES = ("process", "docker")


def get_runtime(kind: str) -> Runtime:
    """The runtime of that kind ("process" or "docker")."""
    if kind == "process":
        from cortex.runtime.process import ProcessRuntime

        return ProcessRuntime()
    if kind == "docker":
        from cortex.runtime.docker import DockerRuntime

        return DockerRuntime()
    raise ValueError(f"unknown runtime {kind!r}; choose one of {', '.join(RUNTIMES)}")


__all__ = [
    "EngineNotReady", "LaunchError", "Replica", "ReplicaError", "ReplicaNotFound", "Runtime",
    "RUNTIMES", "failure_hint", "get_runtime", "ready_timeout_s",
]
