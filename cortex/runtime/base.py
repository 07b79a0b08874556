"""What every runtime does with a launch spec: start it, wait until it serves, read its logs,
stop it, and list the replicas Cortex owns.

A runtime turns a `LaunchSpec` (cortex.launch) into a running engine, a `Replica`. The
launch spec is written as it runs inside the engine's image; the docker runtime uses it as is,
the process runtime translates it to the local machine. Readiness, failure hints and the
choice of timeout are the same for both, so they live here, with the secrets an engine gets.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import dataclasses
import re
import secrets as _secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import httpx

from cortex.engines import startup_phase
from cortex.progress import SILENT, Bar, Reporter

if TYPE_CHECKING:
    from cortex.launch import LaunchSpec

# Label / state key that marks what Cortex started, on containers and in state files.
MANAGED_LABEL = "ai.cortex.managed"


class ReplicaError(Exception):
    """Base of the errors a runtime raises."""


class LaunchError(ReplicaError):
    """The engine could not be started at all (missing binary, image, port)."""


class EngineNotReady(ReplicaError):
    """The engine died or did not become healthy in time. Its replica has been removed.

    `logs` holds the engine's last log lines and `hint` what they suggest, if anything."""

    def __init__(self, message: str, *, replica: "Replica", logs: str, hint: str | None):
        self.replica = replica
        self.logs = logs
        self.hint = hint
        text = message
        if hint:
            text += f"\nhint: {hint}"
        if logs.strip():
            text += f"\nlast log lines of {replica.name}:\n{_indent(logs)}"
        super().__init__(text)


class ReplicaNotFound(ReplicaError):
    """No replica of that name is owned by this runtime."""


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())


@dataclass(frozen=True)
class Replica:
    """One running (or once running) engine that Cortex started."""

    name: str  # container name / process name: vllm-model-{id}, llamacpp-model-{id}
    model: str  # the served model name
    engine: str  # "vllm" | "llamacpp"
    runtime: str  # "docker" | "process"
    endpoint: str  # base URL of the engine, e.g. http://127.0.0.1:41234
    since: str  # ISO 8601 UTC start time
    ref: str  # container id, or process id
    health_path: str = "/health"
    stop_timeout_s: float = 10.0
    api_key: str | None = field(default=None, repr=False)
    log_path: str | None = None
    launch: LaunchSpec | None = field(default=None, repr=False, compare=False)  # what it was started from

    def to_json(self, *, secrets: bool = False) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not secrets:
            data.pop("api_key")
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Replica":
        from cortex.launch import LaunchSpec  # here: `cortex status` need not import the planner

        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        launch = values.get("launch")
        values["launch"] = LaunchSpec.from_json(launch) if launch else None
        return cls(**values)


@dataclass(frozen=True)
class EngineIdentity:
    """Exactly what runs a replica's engine, beyond the launch's image tag and version: the
    image's id on the Docker host (a tag can be moved to another build), or the program the
    process runtime ran and its sha256 (the toolchain's llama-server, vLLM's Python)."""

    image_id: str | None = None
    program: str | None = None
    program_sha256: str | None = None


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def require_mount_sources(launch: LaunchSpec) -> None:
    """A launch built before its artifact was prepared has mounts without a source."""
    missing = [m.target for m in launch.mounts if not m.source]
    if missing:
        raise LaunchError(
            f"launch {launch.name} mounts {', '.join(missing)} from no host path: "
            "prepare the model first (`cortex prepare SPEC`), then build the launch from its artifact"
        )


def engine_secrets() -> dict[str, str]:
    """The secrets a launch may reference (cortex.launch.ENGINE_API_KEY_SECRET). The engine API
    key comes from the `engine_api_key` setting (CORTEX_ENGINE_API_KEY), else a fresh random one
    per replica (the gateway gets it when the replica registers, and the runtime keeps it with
    the replica's state, readable only by its owner)."""
    from cortex.launch import ENGINE_API_KEY_SECRET
    from cortex.settings import Settings

    return {ENGINE_API_KEY_SECRET: Settings.load().engine_api_key or _secrets.token_urlsafe(24)}


def resolve_env(env: Mapping[str, Any], secrets: Mapping[str, str]) -> dict[str, str]:
    """Environment for the engine: plain values as they are, `{"secret": NAME}` from `secrets`."""
    resolved: dict[str, str] = {}
    for key, value in env.items():
        if isinstance(value, Mapping):
            name = value.get("secret")
            if name is None or name not in secrets:
                raise LaunchError(
                    f"environment variable {key} refers to secret {name!r}, which was not given; "
                    f"known secrets: {sorted(secrets) or 'none'}"
                )
            resolved[key] = secrets[name]
        else:
            resolved[key] = str(value)
    return resolved


# What an engine started on this machine keeps of the environment of the process that starts
# it: where programs and libraries are, whose home, the locale, the temp folder and the GPUs the
# operator made visible. Nothing else: not the Hub token, not cloud or Cortex credentials, not
# llama.cpp's LLAMA_ARG_* (flags that would bypass the extra_args allow-list).
INHERITED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "XDG_CACHE_HOME",
)
INHERITED_ENV_PREFIXES = ("LC_",)


def engine_environment(
    launch: LaunchSpec, secrets: Mapping[str, str], parent: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The whole environment an engine starts with: from `parent` (the starting process's
    environment; None for a container, whose image supplies PATH and HOME) only INHERITED_ENV,
    then the GPUs the launch asks for, then the launch's own env: its API key (LLAMA_API_KEY /
    VLLM_API_KEY, resolved from `secrets`), what the plan sets, and the spec's engine `env`."""
    env = {k: v for k, v in (parent or {}).items() if k in INHERITED_ENV or k.startswith(INHERITED_ENV_PREFIXES)}
    if parent is not None:
        env.update(gpu_env(launch.gpus))
    env.update(resolve_env(launch.env, secrets))
    return env


def gpu_env(gpus: Any) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for the launch's GPUs (a list of ids or a count); none for a CPU launch."""
    if isinstance(gpus, list) and gpus:
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}
    if isinstance(gpus, int) and gpus > 0:
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(gpus))}
    return {}


def api_key_from_env(env: Mapping[str, Any], secrets: Mapping[str, str]) -> str | None:
    """The engine's API key, if the launch sets one (LLAMA_API_KEY / VLLM_API_KEY)."""
    resolved = resolve_env(env, secrets)
    return resolved.get("LLAMA_API_KEY") or resolved.get("VLLM_API_KEY")


# ----------------------------------------------------------------------------- failure hints

# (pattern in the engine's log, what to tell the operator). First match wins, so the most
# specific patterns come first. Checked against real llama-server and vLLM output.
FAILURE_HINTS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(
            r"out of memory|OutOfMemoryError|cudaMalloc failed|failed to allocate|"
            r"unable to allocate|insufficient memory|std::bad_alloc|Cannot allocate memory|OOMKilled",
            re.I,
        ),
        "out of memory: lower the context length or parallel slots, pick a smaller "
        "quantization, or give the model more (or larger) GPUs",
    ),
    (
        re.compile(
            r"address already in use|couldn't bind|could not bind|failed to bind|"
            r"errno 98",
            re.I,
        ),
        "port in use: another process listens on the engine's port; stop it or let Cortex pick a free port",
    ),
    (
        re.compile(
            r"error: invalid argument|unrecognized arguments?|unknown argument|"
            r"invalid choice|error: unknown option|unknown value for|"
            r"error while handling argument",
            re.I,
        ),
        "unknown flag or value: the engine version in the image rejects a flag (or its value) "
        "in the launch command; check the spec's engine settings and extra_args against this "
        "engine version (`cortex engines`)",
    ),
    (
        re.compile(
            r"no such file or directory|failed to load model|failed to open|"
            r"does not exist|not a valid model|can't find|cannot find|"
            r"is not a local folder|gguf_init_from_file",
            re.I,
        ),
        "missing file: the model path inside the engine does not exist or is not readable; "
        "check the prepared artifact and the mount (models are mounted read-only)",
    ),
]


def failure_hint(logs: str, exit_code: int | None = None) -> str | None:
    for pattern, hint in FAILURE_HINTS:
        if pattern.search(logs):
            return hint
    if exit_code in (137, -9):
        return (
            "the engine was killed (SIGKILL, exit 137): often the kernel's OOM killer; "
            "check memory, or whether someone stopped it"
        )
    return None


def ready_timeout_s(engine: str, model_bytes: int = 0) -> float:
    """How long to wait for health: a base per engine plus time to read the weights
    (assume 100 MB/s, a slow disk or network volume), so a 140 GB model gets ~25 min."""
    base = 300.0 if engine == "vllm" else 60.0
    return base + model_bytes / 100e6


def path_size(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


# ----------------------------------------------------------------------------- the interface


class Runtime(abc.ABC):
    """Starts launch specs and manages the replicas it started."""

    kind: str

    def __deepcopy__(self, memo: dict[int, Any]) -> "Runtime":
        # A runtime is a handle on engines outside this process (and may hold a Docker client,
        # which cannot be copied): a copy, e.g. of a Prefect transaction value, is the same handle.
        return self

    @classmethod
    def host(cls) -> str:
        """The machine whose engines (and GPUs) this runtime starts: this one, by its fleet name
        (CORTEX_HOST_NAME, set by `cortex host join`) or else its system host name."""
        from cortex.settings import Settings

        return Settings.load().host_name or socket.gethostname()

    @abc.abstractmethod
    def start(self, launch: LaunchSpec, secrets: Mapping[str, str] | None = None) -> Replica:
        """Start the engine; returns at once (see wait_ready). LaunchError if it cannot."""

    @abc.abstractmethod
    def exit_code(self, replica: Replica) -> int | None:
        """None while the engine runs, its exit code once it has stopped.
        ReplicaNotFound if it is gone altogether."""

    @abc.abstractmethod
    def logs(self, replica: Replica, lines: int = 50) -> str:
        """The last `lines` lines of the engine's output (stdout and stderr)."""

    @abc.abstractmethod
    def stop(self, replica: Replica) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after the launch's stop timeout) and remove
        the replica. Stopping a replica that is already gone is not an error."""

    @abc.abstractmethod
    def list(self) -> list[Replica]:
        """Every replica this runtime started that still exists (running or exited)."""

    @abc.abstractmethod
    def engine_identity(self, replica: Replica) -> EngineIdentity:
        """What exactly runs the replica's engine (its image id, or its program and sha256).
        ReplicaNotFound if it is gone."""

    def replicas_of(self, model: str) -> builtins.list[Replica]:
        """The replicas serving `model` (its served name)."""
        return [r for r in self.list() if r.model == model]

    def get(self, name: str) -> Replica:
        for replica in self.list():
            if replica.name == name:
                return replica
        raise ReplicaNotFound(f"no {self.kind} replica named {name!r}")

    def is_running(self, replica: Replica) -> bool:
        try:
            return self.exit_code(replica) is None
        except ReplicaNotFound:
            return False

    def cleanup_orphans(self) -> builtins.list[Replica]:
        """Remove replicas whose engine is no longer running (crashed, killed, host restart).
        Returns what was removed."""
        removed = []
        for replica in self.list():
            if not self.is_running(replica):
                self.stop(replica)
                removed.append(replica)
        return removed

    def health(self, replica: Replica, timeout: float = 2.0) -> str:
        """ "ok", "loading" (503) or "down" (no answer, or the engine is not running)."""
        return probe_health(replica, timeout=timeout)

    def wait_ready(
        self,
        replica: Replica,
        timeout_s: float,
        *,
        poll_s: float = 0.5,
        on_wait: Callable[[float], None] | None = None,
        progress: Reporter | None = None,
    ) -> Replica:
        """Wait until the engine's health endpoint answers 200.

        If the engine exits or the time runs out, the replica is stopped and removed, and
        EngineNotReady carries its last log lines and a hint. Returns the replica when ready.
        `progress` shows the phases of the start (from the engine's log) and the time taken."""
        with (progress or SILENT).task(f"engine {replica.name}", done_word="ready") as bar:
            return self._wait_healthy(replica, timeout_s, poll_s, on_wait, bar if progress else None)

    def _wait_healthy(
        self,
        replica: Replica,
        timeout_s: float,
        poll_s: float,
        on_wait: Callable[[float], None] | None,
        bar: Bar | None,
    ) -> Replica:
        deadline = time.monotonic() + timeout_s
        next_look = time.monotonic()
        started = time.monotonic()
        while True:
            try:
                code = self.exit_code(replica)
            except ReplicaNotFound:
                raise EngineNotReady(
                    f"{replica.engine} replica {replica.name} disappeared while starting (removed by someone else?)",
                    replica=replica,
                    logs="",
                    hint=None,
                ) from None
            if code is not None:
                logs = self.logs(replica, lines=40)
                self.stop(replica)
                raise EngineNotReady(
                    f"{replica.engine} replica {replica.name} exited with code {code} before it "
                    f"became ready ({time.monotonic() - started:.0f} s after start)",
                    replica=replica,
                    logs=logs,
                    hint=failure_hint(logs, code),
                )
            if probe_health(replica, timeout=2.0) == "ok":
                return replica
            if time.monotonic() >= deadline:
                logs = self.logs(replica, lines=40)
                self.stop(replica)
                raise EngineNotReady(
                    f"{replica.engine} replica {replica.name} was not healthy at "
                    f"{replica.endpoint}{replica.health_path} after {timeout_s:.0f} s; it was stopped",
                    replica=replica,
                    logs=logs,
                    hint=failure_hint(logs),
                )
            if on_wait:
                on_wait(time.monotonic() - started)
            if bar is not None and time.monotonic() >= next_look:  # the engine's log, every 2 s
                next_look = time.monotonic() + 2.0
                with contextlib.suppress(ReplicaNotFound):  # gone: the next turn says so
                    bar.phase(startup_phase(replica.engine, self.logs(replica, lines=30)) or "starting")
            time.sleep(poll_s)


def probe_health(replica: Replica, timeout: float = 2.0) -> str:
    # Never with the engine's key: /health is public on both engines, and whatever listens on
    # the port (the engine, or another process once it died) must not be handed the key.
    try:
        response = httpx.get(replica.endpoint + replica.health_path, timeout=timeout)
    except httpx.HTTPError:
        return "down"
    if response.status_code == 200:
        return "ok"
    if response.status_code == 503:
        return "loading"
    return "down"
