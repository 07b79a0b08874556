"""Runtimes: where an engine runs. `docker` (containers, the production way) and `process`
(local subprocesses, the embedded default without Docker)."""

from __future__ import annotations

from typing import Literal, get_args

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

RuntimeKind = Literal["process", "docker"]
RUNTIMES: tuple[str, ...] = get_args(RuntimeKind)


def runtime_class(kind: str) -> type[Runtime]:
    """The class of the runtime of that kind ("process" or "docker"), imported on demand."""
    if kind == "process":
        from cortex.runtime.process import ProcessRuntime

        return ProcessRuntime
    if kind == "docker":
        from cortex.runtime.docker import DockerRuntime

        return DockerRuntime
    raise ValueError(f"unknown runtime {kind!r}; choose one of {', '.join(RUNTIMES)}")


def get_runtime(kind: str) -> Runtime:
    """The runtime of that kind ("process" or "docker")."""
    return runtime_class(kind)()


def reachable_runtimes(required: str | None = None) -> tuple[dict[str, Runtime], dict[str, ReplicaError]]:
    """(runtimes, unreachable): `required` (whose errors propagate), then every other kind,
    each made once; a kind that cannot be reached (no Docker daemon) is in `unreachable`, with why."""
    runtimes = {required: get_runtime(required)} if required else {}
    unreachable: dict[str, ReplicaError] = {}
    for kind in RUNTIMES:
        if kind not in runtimes:
            try:
                runtimes[kind] = get_runtime(kind)
            except ReplicaError as exc:
                unreachable[kind] = exc
    return runtimes, unreachable


__all__ = [
    "EngineNotReady",
    "LaunchError",
    "Replica",
    "ReplicaError",
    "ReplicaNotFound",
    "Runtime",
    "RuntimeKind",
    "RUNTIMES",
    "failure_hint",
    "get_runtime",
    "reachable_runtimes",
    "ready_timeout_s",
    "runtime_class",
]
