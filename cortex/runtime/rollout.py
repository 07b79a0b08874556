"""The pieces of a rollout that are not Prefect's business: which replicas a model has, the
engine's secrets, the per-host lock name, the gateway hand-over, and the result a deploy
reports. flows/deploy.py puts them in order inside a transaction.
"""

from __future__ import annotations

import os
import secrets as _secrets
import socket
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from cortex.runtime.base import Replica, Runtime
from cortex.settings import Settings

ENGINE_API_KEY_SECRET = "engine_api_key"


def engine_secrets() -> dict[str, str]:
    """Secrets a launch may reference. The engine API key comes from the `engine_api_key`
    setting (CORTEX_ENGINE_API_KEY), else a fresh random one per replica (the gateway gets it
    when the replica registers, and the runtime keeps it with the replica's state, readable
    only by its owner)."""
    key = Settings.load().engine_api_key or _secrets.token_urlsafe(24)
    return {ENGINE_API_KEY_SECRET: key}


def host_slot_name(runtime_kind: str) -> str:
    """Name of the global concurrency limit that serialises deploys on one host's GPUs:
    the Docker host for the docker runtime, this machine for the process runtime."""
    host = socket.gethostname()
    if runtime_kind == "docker":
        parsed = urlparse(os.environ.get("DOCKER_HOST", ""))
        if parsed.scheme in ("tcp", "ssh", "http", "https") and parsed.hostname:
            host = parsed.hostname
    return f"cortex-deploy-{host}"


def replicas_of(runtime: Runtime, model: str) -> list[Replica]:
    return [r for r in runtime.list() if r.model == model]


def gateway_client(mode: bool | None) -> Any | None:
    """The gateway admin client, or None where no gateway is meant to be used.

    mode True: the gateway must answer (GatewayError otherwise); False: do not use it;
    None: use it if one answers at CORTEX_GATEWAY_URL."""
    if mode is False:
        return None
    from cortex.gateway.client import GatewayClient, GatewayError
    from cortex.settings import SettingsError

    try:
        client = GatewayClient()
    except SettingsError:  # no admin token: no gateway was ever started here
        if mode:
            raise
        return None
    try:
        client.list()
        return client
    except GatewayError:
        client.close()
        if mode:
            raise
        return None


@dataclass
class DeployResult:
    """What `cortex deploy --json` prints."""

    name: str
    engine: str
    runtime: str
    endpoint: str
    replica: str
    smoke: dict[str, Any]
    gateway: Literal["registered", "not running", "disabled"] = "disabled"
    reused: bool = False
    stopped: list[str] = field(default_factory=list)
    since: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)
