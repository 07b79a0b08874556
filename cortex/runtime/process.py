"""The process runtime: a launch spec run as a local subprocess, the embedded default for a
machine without Docker or GPUs.

The launch spec describes the engine as it runs in its image, so this runtime translates it:
`llama-server` becomes the cached toolchain's binary, `python3 -m vllm...` the vLLM
virtualenv's python, container mount targets become the host paths behind them, and the
engine binds `engine_host` (CORTEX_ENGINE_HOST, default 127.0.0.1; a fleet host's internal
address) on a free port, and its endpoint is that address. Each replica's state (pid, port, start time, log
file) is a JSON file under the Cortex home, so `cortex status` and `cortex retire` work from
another process and after a restart of the one that started it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from cortex.fileio import atomic_write_json
from cortex.net import free_port
from cortex.runtime.base import (
    MANAGED_LABEL,
    EngineIdentity,
    LaunchError,
    Replica,
    ReplicaNotFound,
    Runtime,
    api_key_from_env,
    engine_environment,
    require_mount_sources,
    utc_now,
)

if TYPE_CHECKING:
    from cortex.launch import LaunchSpec, Mount

VLLM_MODULE = "vllm.entrypoints.openai.api_server"


def default_state_dir() -> Path:
    from cortex.settings import Settings

    return Path(Settings.load().home) / "runtime" / "process"


def default_program(command: list[str]) -> list[str]:
    """The local program for the engine the image would run: argv prefix to use instead of
    the image's. Imported lazily so a machine with only one engine installed can run it."""
    from cortex import toolchain

    if command[0] == "llama-server":
        return [str(toolchain.find_toolchain().llama_server)]
    if command[0].startswith("python") and command[1:3] == ["-m", VLLM_MODULE]:
        return toolchain.find_vllm().api_server_command()
    raise LaunchError(
        f"the process runtime does not know how to run {command[0]!r} locally "
        f"(it runs llama-server and python3 -m {VLLM_MODULE}); use --runtime docker"
    )


def _program_prefix_len(command: list[str]) -> int:
    return 3 if command[0].startswith("python") and command[1:2] == ["-m"] else 1


def host_path(arg: str, mounts: Sequence[Mount]) -> str:
    """`arg` with a container mount target replaced by the host path it is mounted from."""
    for mount in sorted(mounts, key=lambda m: len(m.target), reverse=True):
        target = mount.target.rstrip("/")
        if arg == target:
            return str(mount.source)
        if arg.startswith(target + "/"):
            return str(mount.source).rstrip("/") + arg[len(target) :]
        # --flag=/models/x form
        if "=" in arg:
            flag, _, value = arg.partition("=")
            if value == target or value.startswith(target + "/"):
                return f"{flag}={host_path(value, [mount])}"
    return arg


def translate_command(
    launch: LaunchSpec,
    host_port: int,
    program: Callable[[list[str]], list[str]] = default_program,
    bind: str = "127.0.0.1",
) -> list[str]:
    """The launch's command as it runs on this machine."""
    require_mount_sources(launch)
    command = [str(a) for a in launch.command]
    if "--port" not in command:
        raise LaunchError(f"launch {launch.name} has no --port in its command; cannot run it locally")
    args = [host_path(a, launch.mounts) for a in command[_program_prefix_len(command) :]]
    for flag, value in (("--host", bind), ("--port", str(host_port))):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return program(command) + args


def _url_host(address: str) -> str:
    """The address as a URL's host: an IPv6 address in brackets."""
    return f"[{address}]" if ":" in address else address


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a live pid, None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def _group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class ProcessRuntime(Runtime):
    kind = "process"

    def __init__(
        self,
        state_dir: Path | None = None,
        program: Callable[[list[str]], list[str]] = default_program,
        bind: str | None = None,
    ):
        from cortex.settings import Settings

        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.program = program
        self.bind = bind or Settings.load().engine_host

    # Engines this Python process started, shared by every ProcessRuntime in it: polled so they
    # are reaped and their exit code is known, whichever instance (or Prefect task) asks.
    _children: dict[int, subprocess.Popen[bytes]] = {}

    # -- state files

    def _state_path(self, name: str) -> Path:
        return self.state_dir / "replicas" / f"{name}.json"

    def _log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def _read_state(self, name: str) -> dict[str, Any]:
        path = self._state_path(name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ReplicaNotFound(f"no process replica named {name!r} (no {path})") from None

    # -- interface

    def start(self, launch: LaunchSpec, secrets: Mapping[str, str] | None = None) -> Replica:
        secrets = secrets or {}
        name = launch.name
        if self._state_path(name).exists():
            existing = self.get(name)
            if self.is_running(existing):
                raise LaunchError(f"{name} is already running (pid {existing.ref}); stop it first")
            self.stop(existing)  # a dead leftover of the same launch
        port = free_port(self.bind)
        argv = translate_command(launch, port, self.program, self.bind)
        env = engine_environment(launch, secrets, parent=os.environ)
        log_path = self._log_path(name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"--- {utc_now()} cortex starts: {' '.join(argv)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # own process group: stop reaches its children
                )
            except OSError as exc:
                raise LaunchError(f"cannot run {argv[0]}: {exc}") from exc
        self._children[proc.pid] = proc
        stat = _proc_stat(proc.pid)
        replica = Replica(
            name=name,
            model=launch.model,
            engine=launch.engine,
            runtime=self.kind,
            endpoint=f"http://{_url_host(self.bind)}:{port}",
            since=utc_now(),
            ref=str(proc.pid),
            health_path=launch.health_path,
            stop_timeout_s=float(launch.stop_timeout_s),
            api_key=api_key_from_env(launch.env, secrets),
            log_path=str(log_path),
            launch=launch,
        )
        state = replica.to_json(secrets=True)
        state.update(pid=proc.pid, start_ticks=stat[1] if stat else None, argv=argv, **{MANAGED_LABEL: True})
        atomic_write_json(self._state_path(name), state, mode=0o600)
        return replica

    def _alive_pid(self, state: Mapping[str, Any]) -> int | None:
        """The replica's pid if that process still runs and is the one we started."""
        pid = int(state["pid"])
        child = self._children.get(pid)
        if child is not None:
            return pid if child.poll() is None else None
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return None
        if state.get("start_ticks") is not None and stat[1] != state["start_ticks"]:
            return None  # the pid was reused by an unrelated process
        return pid

    def exit_code(self, replica: Replica) -> int | None:
        state = self._read_state(replica.name)
        if self._alive_pid(state) is not None:
            return None
        child = self._children.get(int(state["pid"]))
        if child is not None and child.returncode is not None:
            return child.returncode
        return -1  # exited, but not our child: its code is unknown

    def engine_identity(self, replica: Replica) -> EngineIdentity:
        from cortex.hub import verified_digest  # hashed once, then remembered while unchanged

        program = Path(self._read_state(replica.name)["argv"][0])
        return EngineIdentity(program=str(program), program_sha256=verified_digest(program))

    def logs(self, replica: Replica, lines: int = 50) -> str:
        path = Path(replica.log_path or self._log_path(replica.name))
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            tail = f.read().decode(errors="replace")
        return "\n".join(tail.splitlines()[-lines:])

    def stop(self, replica: Replica) -> None:
        try:
            state = self._read_state(replica.name)
        except ReplicaNotFound:
            return
        pid, pgid = self._alive_pid(state), int(state["pid"])

        def gone() -> bool:
            return self._alive_pid(state) is None and not _group_members(pgid)

        if pid is not None:
            # SIGTERM to the whole group (vLLM's engine core is a child), the launch's stop
            # timeout to finish, then SIGKILL for whatever is left.
            self._signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + float(state.get("stop_timeout_s", replica.stop_timeout_s))
            while time.monotonic() < deadline and not gone():
                time.sleep(0.1)
        if not gone():
            self._signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not gone():
                time.sleep(0.05)
        child = self._children.pop(int(state["pid"]), None)
        if child is not None:
            child.wait(timeout=5)
        self._state_path(replica.name).unlink(missing_ok=True)

    @staticmethod
    def _signal_group(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return  # the group has exited already: what the signal was for

    def list(self) -> list[Replica]:
        folder = self.state_dir / "replicas"
        if not folder.is_dir():
            return []
        replicas = []
        for path in sorted(folder.glob("*.json")):
            try:
                replicas.append(Replica.from_json(json.loads(path.read_text())))
            except FileNotFoundError:
                continue  # stopped while we listed
        return replicas
