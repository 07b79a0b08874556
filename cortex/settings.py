"""Settings shared by the gateway, `cortex deploy` and the command line.

One table (`FIELDS`) names every setting once: its environment variable, its key in the
config file, its type, default and help. Values come, highest first, from the environment
(`CORTEX_<NAME>`), then the config file (`$CORTEX_CONFIG`, default `$CORTEX_HOME/config.yaml`),
then the default. `cortex gateway settings` prints the table, so the docs come from here.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False  # printed as "(set)", never its value (`cortex gateway settings`)

    @property
    def env(self) -> str:
        return "CORTEX_" + self.name.upper()


def cache_root() -> Path:
    """The cache of engines, the test model, artifacts and Hub stamps: ``$CORTEX_CACHE``, else
    ``~/.cache/cortex``. Only the environment, never the config file: the cache is one per
    machine, shared by every Cortex home (the config file lives in one), and the shell scripts
    (dev, scripts/apt-install, scripts/docker-setup) read ``$CORTEX_CACHE`` with the same default."""
    configured = os.environ.get("CORTEX_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "cortex"


def _size(text: str) -> int:
    from cortex.spec import parse_bytes

    return parse_bytes(text)


def _load_ratio(text: str) -> float:
    ratio = float(text)
    if not ratio >= 1.0:  # also refuses nan
        raise ValueError(f"expected a number of at least 1.0, got {text!r}")
    return ratio


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _parse_price(text: str) -> float:
    value = float(text)
    if not (0 <= value < 1e6):
        raise ValueError(f"expected a price in USD per hour, 0 or more, got {text!r}")
    return value


def _parse_gateway_db(text: str) -> str:
    """A SQLite file path, or a PostgreSQL URL (the password best in PGPASSWORD or ~/.pgpass)."""
    if "://" in text and not text.startswith(("postgresql://", "postgres://")):
        scheme = text.split("://", 1)[0]
        raise ValueError(
            f"{scheme}:// is not a registry Cortex can use; give a SQLite file path or a "
            "postgresql://user@host:port/database URL"
        )
    return text


def _default_home() -> str:
    return str(Path(os.environ.get("XDG_DATA_HOME", "~/.local/share")).expanduser() / "cortex")


# The single list of settings. Paths default to None and are derived from `home`.
FIELDS: list[Field] = [
    Field("home", str, None, "State directory (registry database, admin token). Default ~/.local/share/cortex."),
    Field("gateway_url", str, "http://127.0.0.1:8080", "Where clients and `cortex deploy` reach the gateway."),
    Field("gateway_host", str, "127.0.0.1", "Address `cortex gateway` binds to. Loopback by default."),
    Field("gateway_port", int, 8080, "Port `cortex gateway` listens on."),
    Field(
        "gateway_workers",
        _positive_int,
        1,
        "Gateway worker processes sharing the port; in-flight counts are shared, so balancing stays global.",
    ),
    Field(
        "admin_token",
        str,
        None,
        "Token for the gateway's /admin API. Default: generated once into <home>/gateway/admin-token (mode 0600).",
        secret=True,
    ),
    Field(
        "gateway_db",
        _parse_gateway_db,
        None,
        "Registry of replicas and API keys: a SQLite file, or a postgresql://user@host:port/db URL that "
        "several gateways share (README: Two gateways). Default <home>/gateway/registry.db.",
    ),
    Field(
        "gateway_no_auth",
        _parse_bool,
        False,
        "Serve /v1 without client API keys. Only for a local, single-user gateway; never the default.",
    ),
    Field("gateway_max_body_bytes", int, 16 * 1024 * 1024, "Largest request body accepted; larger gets 413."),
    Field("gateway_health_interval", float, 2.0, "Seconds between health checks of each replica."),
    Field("gateway_health_timeout", float, 2.0, "Seconds a replica's /health may take before it counts as down."),
    Field(
        "gateway_metrics_timeout",
        float,
        10.0,
        "Seconds the gateway waits for an engine's /metrics when it proxies a scrape (GET /admin/replicas/{id}/metrics).",
    ),
    Field("gateway_connect_timeout", float, 3.0, "Seconds to open a connection to a replica before trying another."),
    Field(
        "gateway_read_timeout", float, 600.0, "Seconds a replica may stay silent mid-request before the request fails."
    ),
    Field(
        "gateway_affinity",
        _parse_bool,
        True,
        "Send requests that share a prompt prefix to the same replica of a model (its prefix cache hits); "
        "false: least-in-flight only.",
    ),
    Field(
        "gateway_affinity_load_ratio",
        _load_ratio,
        1.25,
        "Affinity yields to least-in-flight when the chosen replica has more than this times "
        "(mean in flight + 1) requests in flight (at least 1.0).",
    ),
    Field(
        "gateway_max_header_bytes",
        int,
        32 * 1024,
        "Largest request head (request line and headers) accepted; larger gets 431 and the connection is closed.",
    ),
    Field(
        "gateway_header_timeout",
        float,
        10.0,
        "Seconds a client has to send a complete request head, from connecting or from its first byte on a kept-alive connection; then 408 and close.",
    ),
    Field(
        "gateway_body_timeout", float, 60.0, "Seconds a request body may stall (no byte arriving) before 408 and close."
    ),
    Field(
        "gateway_send_timeout",
        float,
        60.0,
        "Seconds a client may leave the response unread (the gateway cannot write) before its connection is closed.",
    ),
    Field("gateway_keep_alive_timeout", int, 75, "Seconds an idle kept-alive client connection stays open."),
    Field(
        "gateway_max_connections_per_client",
        int,
        512,
        "Open connections allowed from one client address; more get 429 and are closed. 0: no limit (behind a reverse proxy every client has its address).",
    ),
    Field(
        "gateway_access_log", _parse_bool, True, "Write one JSON access-log line per request (never prompt contents)."
    ),
    Field(
        "gateway_usage_flush_interval",
        float,
        5.0,
        "Seconds between writes of per-key usage and rate-limit state to the registry (what a crash can lose).",
    ),
    Field(
        "gateway_metrics_max_keys",
        int,
        100,
        'API keys with their own /metrics series; the others are summed under key="other".',
    ),
    Field(
        "api_key",
        str,
        None,
        "Client API key `cortex bench` sends to the gateway when --api-key is not given.",
        secret=True,
    ),
    Field(
        "engine_api_key",
        str,
        None,
        "API key every engine replica requires. Default: a new random key per replica.",
        secret=True,
    ),
    Field(
        "docker_bind",
        str,
        "127.0.0.1",
        "Host address the docker runtime publishes engine ports on (a remote DOCKER_HOST needs a reachable one).",
    ),
    Field(
        "engine_host",
        str,
        "127.0.0.1",
        "Address the process runtime's engines listen on and register at in the gateway; `cortex host join --address` sets it to the host's internal address.",
    ),
    Field(
        "host_name",
        str,
        None,
        "This machine's name in the fleet (its work queue, its deployments, its replicas' suffix). Default: the system host name; `cortex host join NAME` sets it.",
    ),
    Field(
        "host_ram",
        lambda text: _size(text),
        None,
        "RAM this fleet host offers engines (a size: 64GiB, or bytes). `cortex host join` publishes it less the planned RAM of the replicas running here, capped by the RAM available. Default: the RAM available.",
    ),
    Field(
        "deploy_lock_timeout_s", float, 1800.0, "Seconds a deploy waits for another deploy on the same host to finish."
    ),
    Field(
        "restart_check_s", float, 10.0, "Seconds between `cortex serve`'s checks for applied specs whose engine died."
    ),
    Field(
        "restart_backoff_s",
        float,
        30.0,
        "Wait after a failed restart of a dead replica; doubles after each further failure.",
    ),
    Field("restart_backoff_max_s", float, 600.0, "Longest wait between restarts of a replica that keeps failing."),
    Field(
        "fleet_reconcile_s",
        float,
        60.0,
        "Seconds between `cortex serve`'s scheduled fleet-reconcile runs (also started when a host's work queue goes not-ready or ready).",
    ),
    Field(
        "gpu_hour_price_usd",
        _parse_price,
        None,
        "USD per GPU-hour, for the cost per 1M output tokens of `cortex compare-engines` (a spec's "
        "`benchmark.gpu_hour_price_usd` wins).",
    ),
    Field(
        "cpu_hour_price_usd",
        _parse_price,
        None,
        "USD per hour of the whole host, for the cost per 1M output tokens of an engine that runs on no GPU.",
    ),
    Field(
        "hf_token_block",
        str,
        "hf-token",
        "Prefect Secret block holding the Hugging Face token, used when HF_TOKEN is not set.",
    ),
]

_BY_NAME = {f.name: f for f in FIELDS}


@dataclasses.dataclass(frozen=True)
class Settings:
    home: str
    gateway_url: str
    gateway_host: str
    gateway_port: int
    gateway_workers: int
    admin_token: str | None
    gateway_db: str
    gateway_no_auth: bool
    gateway_max_body_bytes: int
    gateway_health_interval: float
    gateway_health_timeout: float
    gateway_metrics_timeout: float
    gateway_connect_timeout: float
    gateway_read_timeout: float
    gateway_affinity: bool
    gateway_affinity_load_ratio: float
    gateway_max_header_bytes: int
    gateway_header_timeout: float
    gateway_body_timeout: float
    gateway_send_timeout: float
    gateway_keep_alive_timeout: int
    gateway_max_connections_per_client: int
    gateway_access_log: bool
    gateway_usage_flush_interval: float
    gateway_metrics_max_keys: int
    api_key: str | None
    engine_api_key: str | None
    docker_bind: str
    engine_host: str
    host_name: str | None
    host_ram: int | None
    deploy_lock_timeout_s: float
    restart_check_s: float
    restart_backoff_s: float
    restart_backoff_max_s: float
    fleet_reconcile_s: float
    gpu_hour_price_usd: float | None
    cpu_hour_price_usd: float | None
    hf_token_block: str

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Read settings from the environment, then the config file, then defaults."""
        env = os.environ if env is None else env
        home = overrides.get("home") or env.get("CORTEX_HOME") or _default_home()
        config_path = Path(env.get("CORTEX_CONFIG") or Path(home).expanduser() / "config.yaml").expanduser()
        from_file: dict[str, Any] = {}
        if config_path.is_file():
            loaded = yaml.safe_load(config_path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise SettingsError(f"{config_path}: expected a mapping of setting names to values")
            unknown = set(loaded) - set(_BY_NAME)
            if unknown:
                raise SettingsError(f"{config_path}: unknown settings {sorted(unknown)}; known: {sorted(_BY_NAME)}")
            from_file = loaded
        values: dict[str, Any] = {}
        for f in FIELDS:
            if f.name in overrides and overrides[f.name] is not None:
                values[f.name] = overrides[f.name]
                continue
            raw: Any = env.get(f.env)
            source = f.env
            if raw is None and f.name in from_file:
                raw, source = from_file[f.name], f"{config_path}:{f.name}"
            if raw is None:
                values[f.name] = f.default
                continue
            try:
                if isinstance(raw, bool) and f.type is _parse_bool:
                    values[f.name] = raw
                else:
                    values[f.name] = f.type(raw if isinstance(raw, str) or f.type is not _parse_bool else str(raw))
            except (TypeError, ValueError) as exc:
                raise SettingsError(f"{source}: {exc}") from exc
        values["home"] = str(Path(values["home"] or home).expanduser())
        if values["gateway_db"] is None:
            values["gateway_db"] = str(Path(values["home"]) / "gateway" / "registry.db")
        return cls(**values)

    @property
    def admin_token_path(self) -> Path:
        return Path(self.home) / "gateway" / "admin-token"

    def resolve_admin_token(self, create: bool = False) -> str:
        """The admin token: from settings, else from the token file (created when `create`)."""
        if self.admin_token:
            return self.admin_token
        path = self.admin_token_path
        if path.is_file():
            token = path.read_text().strip()
            if token:
                return token
        if not create:
            raise SettingsError(
                f"no gateway admin token: set CORTEX_ADMIN_TOKEN, or start `cortex gateway` once "
                f"on this machine so it writes {path}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        token = "cortex-admin-" + secrets.token_urlsafe(32)
        partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        try:
            os.link(partial, path)  # atomic, and fails if another process got there first
        except FileExistsError:
            token = path.read_text().strip()
        finally:
            partial.unlink()
        return token


def describe() -> str:
    """A Markdown table of every setting, for the README and `cortex gateway settings`."""
    lines = ["| environment | config key | default | meaning |", "|---|---|---|---|"]
    for f in FIELDS:
        default = "" if f.default is None else f"`{f.default}`"
        lines.append(f"| `{f.env}` | `{f.name}` | {default} | {f.help} |")
    lines.append("| `CORTEX_CONFIG` | | `$CORTEX_HOME/config.yaml` | The YAML config file read for these keys. |")
    return "\n".join(lines)
