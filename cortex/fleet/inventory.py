"""What one host of the fleet offers: GPUs and their free memory, CPU cores, RAM, disk, runtimes,
engines, and where its engines are reachable.

`cortex host join` will publish this for each host; until then a fleet is declared in a hosts
file (`cortex plan SPEC --fleet --hosts FILE`, read by `load_hosts`) or is this machine alone
(`local_inventory()`). Sizes are whole numbers (MiB for GPUs, as nvidia-smi reports them;
bytes for RAM and disk), so an inventory survives a JSON round trip exactly.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator

from cortex import hardware
from cortex.hardware import Gpu, Inventory
from cortex.spec import (
    HOST_NAME,
    MAX_COUNT,
    MAX_GPUS,
    MAX_TEXT,
    Labels,
    Section,
    check_host_name,
    parse_bytes,
    short_repr,
)

MiB = 2**20
MAX_GPU_MIB = 2**24  # 16 TiB on one GPU, as cortex.spec.MAX_GPU_BYTES

log = logging.getLogger("cortex.fleet")


def _byte_count(value: Any) -> Any:
    """Bytes, or a size with a unit (512GiB); 0 is a size here: a full disk has 0 bytes free."""
    if value == 0 and not isinstance(value, bool):
        return 0
    return parse_bytes(value)


ByteCount = Annotated[
    int,
    BeforeValidator(_byte_count),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$"},
            ],
            "description": "bytes, or a size with a unit: 512GiB, 2TB",
        }
    ),
]

Runtime = Literal["docker", "process"]
Engine = Literal["llamacpp", "vllm"]


def _process_only() -> list[Runtime]:
    return ["process"]


class GpuInfo(Section):
    """One GPU, in device order (the first is cuda:0)."""

    name: str = Field("gpu", min_length=1, max_length=MAX_TEXT, description="model name, e.g. NVIDIA H100 80GB HBM3")
    memory_total_mib: int = Field(ge=1, le=MAX_GPU_MIB, description="the GPU's memory, MiB")
    memory_free_mib: int = Field(ge=0, le=MAX_GPU_MIB, description="memory free when the inventory was taken, MiB")

    @model_validator(mode="after")
    def _free_within_total(self) -> "GpuInfo":
        if self.memory_free_mib > self.memory_total_mib:
            raise ValueError(
                f"memory_free_mib {self.memory_free_mib} is more than memory_total_mib {self.memory_total_mib}"
            )
        return self


class HostInventory(Section):
    """One host of the fleet, as placement sees it."""

    name: str = Field(description="the host's name (unique in the fleet; what placement.hosts lists)")
    address: str = Field(description="host name or IP address its engines are reachable at")
    labels: Labels = Field(default_factory=dict, description="what placement.labels selects on, e.g. {gpu: h100}")
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=MAX_GPUS, description="GPUs, cuda:0 first")
    cpu_cores: int = Field(ge=1, le=MAX_COUNT)
    ram_bytes: ByteCount = Field(description="RAM available (MemAvailable)")
    disk_free_bytes: ByteCount | None = Field(None, description="free disk where Cortex caches models")
    runtimes: list[Runtime] = Field(
        default_factory=_process_only,
        min_length=1,
        description="runtimes that work there (docker: dockerd answers)",
    )
    engine_versions: dict[Engine, Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]] = Field(
        default_factory=dict, description="engines installed for the process runtime, engine: version"
    )
    toolchain_version: str | None = Field(
        None, min_length=1, max_length=MAX_TEXT, description="the llama.cpp toolchain that converts and quantizes"
    )
    collected_at: datetime | None = Field(None, description="when the inventory was taken")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_host_name(v)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            if not HOST_NAME.match(v):
                raise ValueError(f"{short_repr(v)} is neither an IP address nor a host name") from None
        return v

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a runtime is listed twice")
        return v

    def hardware(self) -> Inventory:
        """The hardware the planner plans for: each GPU's free memory, the available RAM."""
        gpus = [Gpu(i, g.memory_free_mib * MiB, g.name, g.memory_total_mib * MiB) for i, g in enumerate(self.gpus)]
        return Inventory(gpus, self.cpu_cores, self.ram_bytes, source="declared")


def _docker_answers() -> bool:
    from cortex.runtime.base import ReplicaError
    from cortex.runtime.docker import DockerRuntime

    try:
        DockerRuntime()  # connects and pings, as a deploy would
    except ReplicaError:
        return False
    return True


def _disk_free(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent  # the cache may not exist yet: the disk it will be on
    return shutil.disk_usage(path).free


def local_inventory(
    name: str | None = None, address: str = "127.0.0.1", labels: dict[str, str] | None = None
) -> HostInventory:
    """This machine: GPUs by nvidia-smi, RAM by /proc/meminfo (cortex.hardware), whether dockerd
    answers, the installed engines. `address` defaults to 127.0.0.1, where the process runtime's
    engines listen (and the docker runtime publishes, unless CORTEX_DOCKER_BIND says otherwise)."""
    from cortex import toolchain
    from cortex.settings import cache_root

    detected = hardware.detect()
    gpus = [
        GpuInfo(
            name=g.name,
            memory_total_mib=max(g.total_bytes, g.memory_bytes) // MiB or 1,
            memory_free_mib=g.memory_bytes // MiB,
        )
        for g in sorted(detected.gpus, key=lambda g: g.index)
    ]
    engines: dict[str, str] = {}
    for engine, find in (("llamacpp", toolchain.find_toolchain), ("vllm", toolchain.find_vllm)):
        try:
            engines[engine] = find().version
        except toolchain.ToolchainMissing as missing:  # an engine this host cannot run: left out
            log.info("inventory: no %s here (%s)", engine, missing)
    toolchain_version = engines.get("llamacpp")
    return HostInventory.model_validate(
        {
            "name": name or socket.gethostname(),
            "address": address,
            "labels": labels or {},
            "gpus": gpus,
            "cpu_cores": detected.cpu_cores,
            "ram_bytes": detected.ram_bytes,
            "disk_free_bytes": _disk_free(cache_root()),
            "runtimes": ["docker", "process"] if _docker_answers() else ["process"],
            "engine_versions": engines,
            "toolchain_version": toolchain_version,
            "collected_at": datetime.now(timezone.utc),
        }
    )


def offered_ram(available: int, declared: int | None, in_use: int) -> int:
    """The RAM a host offers the fleet's engines: what is available, or, when the host declares
    a budget (CORTEX_HOST_RAM), that budget less what the plans of the replicas it runs take
    (`in_use`), if that is less. A measured MemAvailable already counts the running engines; a
    budget does not, so they are taken off it: the placement then sees that a host whose budget
    holds one replica has no room for a second beside it."""
    if declared is None:
        return available
    return max(0, min(available, declared - in_use))


# --------------------------------------------------------------------------- hosts files

MAX_HOSTS_FILE_BYTES = 16 << 20  # 16 MiB: a host takes about 500 bytes
MAX_HOSTS_FILE_NODES = 1_000_000  # values once aliases are expanded: MAX_HOSTS hosts of 8 GPUs each fit


def parse_hosts_text(text: str, filename: str) -> list[HostInventory]:
    """A YAML (or JSON) list of host inventories; SpecError lists every problem as
    `FILE:LINE: [i].field: message`, as for a spec."""
    from dataclasses import replace

    from pydantic import ValidationError

    from cortex.spec import MAX_HOSTS
    from cortex.specfile import Problem, SpecError, read_yaml, validation_problems

    data, root = read_yaml(text, filename, max_nodes=MAX_HOSTS_FILE_NODES)
    example = "a list of hosts, each with at least name, address, cpu_cores and ram_bytes"
    if data is None:
        raise SpecError([Problem(filename, 1, "(hosts)", f"the file is empty; a hosts file is {example}")])
    if not isinstance(data, list):
        raise SpecError([Problem(filename, 1, "(hosts)", f"a hosts file is {example}, not a {type(data).__name__}")])
    if len(data) > MAX_HOSTS:
        raise SpecError([Problem(filename, 1, "(hosts)", f"{len(data)} hosts; at most {MAX_HOSTS}")])
    problems: list[Problem] = []
    hosts: list[HostInventory] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(data):
        node = root.value[i] if root is not None else None
        line = node.start_mark.line + 1 if node is not None else 1
        try:
            host = HostInventory.model_validate(item)
        except ValidationError as e:
            for p in validation_problems(e, filename, node, HostInventory).problems:
                field = p.field if p.field != "(spec)" else ""
                problems.append(replace(p, field=f"[{i}]" + ("." + field if field else "")))
            continue
        key = host.name.lower()
        if key in seen:
            problems.append(
                Problem(
                    filename, line, f"[{i}].name", f"host {host.name!r} is listed twice (first on line {seen[key]})"
                )
            )
        seen.setdefault(key, line)
        hosts.append(host)
    if problems:
        raise SpecError(sorted(problems, key=lambda p: p.line))
    return hosts


def load_hosts(path: str | Path) -> list[HostInventory]:
    """The hosts of a hosts file; SpecError with `FILE:LINE` problems when it is not one."""
    from cortex.specfile import read_checked_text

    text = read_checked_text(path, MAX_HOSTS_FILE_BYTES, "a hosts file is YAML or JSON")
    return parse_hosts_text(text, str(path))
