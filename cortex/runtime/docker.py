"""The docker runtime: a launch spec run as a container through the Docker SDK, the way the
seed runs engines in production.

The container gets the launch's name (`vllm-model-{id}` / `llamacpp-model-{id}`), its command,
env (secrets resolved here, never stored in labels), read-only model mounts, GPU device
requests, shm size and IPC mode, and labels that mark it as Cortex's. The engine's port is
published on 127.0.0.1 (a random host port) unless CORTEX_DOCKER_BIND says otherwise, which
is what a remote Docker host (DOCKER_HOST=tcp://... or ssh://...) needs to be reachable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlparse

from cortex.runtime.base import (
    MANAGED_LABEL,
    EngineIdentity,
    LaunchError,
    Replica,
    ReplicaError,
    ReplicaNotFound,
    Runtime,
    api_key_from_env,
    engine_environment,
    require_mount_sources,
    utc_now,
)
from cortex.settings import Settings

if TYPE_CHECKING:
    from cortex.launch import LaunchSpec

LABEL_MODEL = "ai.cortex.model"
LABEL_ENGINE = "ai.cortex.engine"
LABEL_SINCE = "ai.cortex.since"
LABEL_LAUNCH = "ai.cortex.launch"  # the launch spec as JSON (env values that are secrets stay references)


def _docker():
    import docker  # imported here: the process runtime must work without a Docker daemon

    return docker


def remote_docker_host() -> str | None:
    """The host name of a remote Docker daemon (DOCKER_HOST=tcp://... or ssh://...), else None."""
    parsed = urlparse(os.environ.get("DOCKER_HOST", ""))
    if parsed.scheme in ("tcp", "ssh", "http", "https") and parsed.hostname:
        return parsed.hostname
    return None


class DockerRuntime(Runtime):
    kind = "docker"

    def __init__(self, client: Any = None, bind_address: str | None = None):
        docker = _docker()
        if client is None:
            try:
                client = docker.from_env()  # honours DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH
                client.ping()
            except docker.errors.DockerException as exc:
                where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
                raise ReplicaError(
                    f"cannot reach the Docker daemon at {where}: {exc}. Start dockerd "
                    "(scripts/docker-setup does it on this kind of machine), set DOCKER_HOST, "
                    "or deploy with --runtime process"
                ) from exc
        self.client = client
        self.bind_address = bind_address or Settings.load().docker_bind

    # -- helpers

    @classmethod
    def host(cls) -> str:
        """The Docker host: a remote daemon's machine, else this one."""
        return remote_docker_host() or super().host()

    def _endpoint_host(self) -> str:
        """Where this machine reaches a port the daemon published."""
        if self.bind_address not in ("127.0.0.1", "0.0.0.0", "::", "localhost"):
            return self.bind_address
        return remote_docker_host() or "127.0.0.1"

    def _replica(self, container: Any) -> Replica:
        from cortex.launch import LaunchSpec  # here: `cortex status` need not import the planner

        labels = container.labels
        launch = LaunchSpec.from_json(json.loads(labels[LABEL_LAUNCH]))
        endpoint = ""
        bindings = (container.attrs.get("NetworkSettings") or {}).get("Ports") or {}
        published = bindings.get(f"{launch.port}/tcp") or []
        if published:
            endpoint = f"http://{self._endpoint_host()}:{published[0]['HostPort']}"
        env = dict(item.split("=", 1) for item in (container.attrs.get("Config") or {}).get("Env") or [] if "=" in item)
        return Replica(
            name=container.name,
            model=labels.get(LABEL_MODEL, launch.model),
            engine=launch.engine,
            runtime=self.kind,
            endpoint=endpoint,
            since=labels.get(LABEL_SINCE, ""),
            ref=container.id,
            health_path=launch.health_path,
            stop_timeout_s=float(launch.stop_timeout_s),
            api_key=env.get("LLAMA_API_KEY") or env.get("VLLM_API_KEY"),
            log_path=None,
            launch=launch,
        )

    def _container(self, replica: Replica) -> Any:
        docker = _docker()
        try:
            return self.client.containers.get(replica.ref or replica.name)
        except docker.errors.NotFound:
            raise ReplicaNotFound(f"no container {replica.name} ({replica.ref[:12]})") from None

    @staticmethod
    def device_requests(gpus: Any) -> list[Any]:
        docker = _docker()
        if isinstance(gpus, list) and gpus:
            return [docker.types.DeviceRequest(device_ids=[str(g) for g in gpus], capabilities=[["gpu"]])]
        if isinstance(gpus, int) and gpus != 0:
            return [docker.types.DeviceRequest(count=gpus, capabilities=[["gpu"]])]
        return []

    # -- interface

    def start(self, launch: LaunchSpec, secrets: Mapping[str, str] | None = None) -> Replica:
        docker = _docker()
        secrets = secrets or {}
        name = launch.name
        require_mount_sources(launch)
        try:
            existing = self.client.containers.get(name)
        except docker.errors.NotFound:
            existing = None
        if existing is not None:
            if existing.labels.get(MANAGED_LABEL) != "true":
                raise LaunchError(f"a container named {name} exists and is not Cortex's; remove or rename it")
            if existing.status == "running":
                raise LaunchError(f"{name} is already running; stop it first")
            existing.remove(force=True)  # a dead leftover of the same launch
        labels = {str(k): str(v) for k, v in launch.labels.items()}
        labels.update(
            {
                MANAGED_LABEL: "true",
                LABEL_MODEL: launch.model,
                LABEL_ENGINE: launch.engine,
                LABEL_SINCE: utc_now(),
                LABEL_LAUNCH: json.dumps(launch.to_json(), sort_keys=True),
            }
        )
        mounts = [
            docker.types.Mount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only)
            for m in launch.mounts
        ]
        for m in launch.mounts:
            if not os.path.exists(str(m.source)) and not os.environ.get("DOCKER_HOST"):
                raise LaunchError(f"mount source {m.source} does not exist (for {m.target} in {name})")
        kwargs: dict[str, Any] = dict(
            image=launch.image,
            command=[str(a) for a in launch.command],
            name=name,
            labels=labels,
            environment=engine_environment(launch, secrets),  # the image supplies PATH and HOME
            mounts=mounts,
            ports={f"{launch.port}/tcp": (self.bind_address, None)},
            device_requests=self.device_requests(launch.gpus),
            stop_signal="SIGTERM",
        )
        if launch.shm_size:
            kwargs["shm_size"] = launch.shm_size
        if launch.ipc_mode:
            kwargs["ipc_mode"] = launch.ipc_mode
        try:
            self.client.images.get(launch.image)  # never pull implicitly: say what is missing
        except docker.errors.ImageNotFound:
            raise LaunchError(
                f"image {launch.image} is not on the Docker host: build it "
                "(scripts/docker-setup builds the llama.cpp image) or pull it"
            ) from None
        try:
            container = self.client.containers.create(**kwargs)
        except docker.errors.APIError as exc:
            raise LaunchError(f"docker could not create {name}: {exc.explanation or exc}") from exc
        try:
            container.start()
        except docker.errors.APIError as exc:
            # created but could not start (port, device request, mount): leave nothing behind
            container.remove(force=True)
            raise LaunchError(f"docker could not start {name}: {exc.explanation or exc}") from exc
        container.reload()
        replica = self._replica(container)
        if not replica.endpoint and container.status == "running":
            # (an engine that already exited has no published port; wait_ready reports why it exited)
            self.stop(replica)
            raise LaunchError(f"{name} started but docker published no port for {launch.port}/tcp")
        return dataclasses.replace(replica, api_key=api_key_from_env(launch.env, secrets))

    def exit_code(self, replica: Replica) -> int | None:
        container = self._container(replica)
        container.reload()
        if container.status in ("running", "created", "restarting"):
            return None
        state = container.attrs.get("State") or {}
        if state.get("OOMKilled"):
            return 137
        return int(state.get("ExitCode", -1))

    def engine_identity(self, replica: Replica) -> EngineIdentity:
        return EngineIdentity(image_id=self._container(replica).attrs.get("Image"))

    def logs(self, replica: Replica, lines: int = 50) -> str:
        try:
            container = self._container(replica)
        except ReplicaNotFound:
            return ""
        text = container.logs(tail=lines, stdout=True, stderr=True).decode(errors="replace")
        state = container.attrs.get("State") or {}
        if state.get("OOMKilled"):
            text += "\n[docker] container was OOMKilled"
        return text

    def stop(self, replica: Replica) -> None:
        docker = _docker()
        try:
            container = self._container(replica)
        except ReplicaNotFound:
            return
        try:
            if container.status in ("running", "restarting", "paused") or self.exit_code(replica) is None:
                container.stop(timeout=int(round(replica.stop_timeout_s)))
            container.remove(force=True)
        except docker.errors.NotFound:
            pass  # removed concurrently: the goal is met

    def list(self) -> list[Replica]:
        containers = self.client.containers.list(all=True, filters={"label": f"{MANAGED_LABEL}=true"})
        return [self._replica(c) for c in containers]
