"""The launch spec: exactly how the chosen engine starts, as data a runtime executes.

Image, container name, command (a list, never a shell string), environment (secrets only by
reference), read-only model mounts, GPU requests, port, health path and stop timeout. Each
engine's flags come from its table in cortex.engines; every flag emitted is checked against
the engine version's own flag list before the launch spec exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from cortex.engines import FlagError, build_args, flag_names
from cortex.engines import llamacpp as llamacpp_engine
from cortex.engines import vllm as vllm_engine
from cortex.engines.introspect import load_flag_table
from cortex.plan import Plan
from cortex.spec import LlamaCppSettings, ModelSpec, VllmSettings

MODELS_DIR = "/models"  # where model files appear inside the engine's container
VLLM_MODULE_ARGV = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
ENGINE_API_KEY_SECRET = "engine_api_key"  # the key only the gateway holds; resolved by the runtime
LABEL_PREFIX = "ai.cortex"
PLANNED_RAM_LABEL = f"{LABEL_PREFIX}.planned-ram-bytes"


@dataclass(frozen=True)
class Mount:
    source: str | None  # host path; None until prepare has made the artifact
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class LaunchSpec:
    engine: str
    engine_version: str
    image: str
    name: str
    model: str  # the name the engine serves the model under (its --served-model-name / --alias)
    command: list[str]
    env: dict[str, Any]  # value, or {"secret": NAME} for a secret the runtime resolves
    mounts: list[Mount]
    gpus: list[int]
    port: int
    health_path: str = "/health"
    stop_timeout_s: int = 10
    shm_size: str | None = None
    ipc_mode: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def planned_ram(self) -> int:
        """The bytes of RAM its plan takes (0 for a launch from before the label was set)."""
        return int(self.labels.get(PLANNED_RAM_LABEL, 0))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LaunchSpec":
        """The launch `to_json` gave, as a runtime recorded it with its replica."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["mounts"] = [Mount(**m) for m in data.get("mounts") or []]
        # launches recorded before `model` was a field name it only in their labels
        values.setdefault("model", (data.get("labels") or {}).get(f"{LABEL_PREFIX}.model", ""))
        return cls(**values)


def _model_mounts(
    spec: ModelSpec, plan: Plan, artifact: Path | list[Path] | None, mount_root: Path | None = None
) -> tuple[list[Mount], str]:
    """Mounts and the in-container model path. GGUF split sets mount every part. A Hub snapshot
    (`snapshots/<sha>/` whose files link into `../../blobs/`) mounts its repo folder, `mount_root`,
    so the links resolve inside the container."""
    if plan.artifact.format == "gguf":
        files = artifact if isinstance(artifact, list) else [artifact] if artifact else None
        if files is None and spec.source.kind == "gguf_file":
            from cortex.facts import gguf_split_set

            assert spec.source.gguf is not None  # Source.kind "gguf_file" means `gguf` is set
            files = gguf_split_set(Path(spec.source.gguf))
        if files:
            mounts = [Mount(str(f), f"{MODELS_DIR}/{Path(f).name}") for f in files]
            return mounts, mounts[0].target
        name = f"{spec.name}.{plan.artifact.quantization}.gguf"
        return [Mount(None, f"{MODELS_DIR}/{name}")], f"{MODELS_DIR}/{name}"
    folder: Path | None = None
    if isinstance(artifact, Path):
        folder = artifact
    elif spec.source.kind == "hf_dir":
        assert spec.source.path is not None  # Source.kind "hf_dir" means `path` is set
        folder = Path(spec.source.path)
    target = f"{MODELS_DIR}/{spec.name}"
    if folder is not None and mount_root is not None and Path(folder).is_relative_to(mount_root):
        inside = Path(folder).relative_to(mount_root).as_posix()
        return [Mount(str(mount_root), target)], f"{target}/{inside}"
    return [Mount(str(folder) if folder else None, target)], target


def launch_id(
    spec: ModelSpec, command: list[str], image: str, mounts: list[Mount], env: Mapping[str, str] | None = None
) -> str:
    """A short name part that changes with what the engine runs: command, image, mounts and the
    spec's own engine env (left out when empty, so launches without one keep their ids)."""
    parts: list[Any] = [command, image, [asdict(m) for m in mounts]]
    if env:
        parts.append(sorted(env.items()))
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    return f"{spec.name}-{digest[:8]}"


def check_flags(engine: str, args: list[str]) -> None:
    """Refuse a command with a flag the target engine version does not know."""
    module = vllm_engine if engine == "vllm" else llamacpp_engine
    table = load_flag_table(module.FLAG_TABLE_ENGINE)
    unknown = [f for f in flag_names(args) if f not in table.by_name]
    if unknown:
        raise FlagError(f"{module.ENGINE_LABEL} {table.version} does not accept {', '.join(unknown)}")


def build_launch(
    spec: ModelSpec, plan: Plan, artifact: Path | list[Path] | None = None, mount_root: Path | None = None
) -> LaunchSpec:
    embed = spec.task == "embed"
    mounts, model_path = _model_mounts(spec, plan, artifact, mount_root)
    gpus = [int(d.device.split(":")[1]) for d in plan.devices if d.device.startswith("cuda:")]
    if plan.engine == "llamacpp":
        eng: ModuleType = llamacpp_engine
        settings: LlamaCppSettings | VllmSettings = spec.llamacpp
        base = eng.server_args(model_path=model_path, served_name=spec.name, port=eng.PORT, embed=embed)
        args = base + build_args(eng.FLAGS, settings, plan) + list(settings.extra_args)
        command = ["llama-server", *args]
        variant = "cuda" if gpus else "cpu"
        from cortex.toolchain import LLAMA_CPP_PYTHON_VERSION

        image = spec.image.llamacpp or f"{eng.DEFAULT_IMAGE}:{LLAMA_CPP_PYTHON_VERSION}-{variant}"
        # the spec's engine env first: what Cortex sets wins (validation refuses those names anyway)
        env: dict[str, Any] = {**settings.env, eng.API_KEY_ENV: {"secret": ENGINE_API_KEY_SECRET}}
        shm, ipc = None, None
    else:
        eng = vllm_engine
        settings = spec.vllm
        base = eng.server_args(model_path=model_path, served_name=spec.name, port=eng.PORT, embed=embed)
        gpu_only = {"gpu_memory_utilization"} if not gpus else set()
        table = [m for m in eng.FLAGS if m.setting not in gpu_only]
        args = base + build_args(table, settings, plan) + list(settings.extra_args)
        command = [*VLLM_MODULE_ARGV, *args]
        image = spec.image.vllm or f"{eng.DEFAULT_IMAGE}:v{plan.engine_version}"
        env = {**settings.env, eng.API_KEY_ENV: {"secret": ENGINE_API_KEY_SECRET}, "HF_HUB_OFFLINE": "1"}
        if plan.cpu_kv_cache_gib:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(plan.cpu_kv_cache_gib)
        # tensor-parallel workers share memory through /dev/shm (vLLM's docs: --ipc=host)
        shm, ipc = None, "host"
    check_flags(plan.engine, args)
    ident = launch_id(spec, command, image, mounts, settings.env)
    prefix = "vllm" if plan.engine == "vllm" else "llamacpp"
    labels = {
        f"{LABEL_PREFIX}.managed": "true",
        f"{LABEL_PREFIX}.model": spec.name,
        f"{LABEL_PREFIX}.engine": plan.engine,
        f"{LABEL_PREFIX}.launch-id": ident,
        # the RAM its plan takes: a fleet host with a declared budget (CORTEX_HOST_RAM) offers
        # what its running replicas leave (cortex.fleet.inventory.offered_ram)
        PLANNED_RAM_LABEL: str(sum(d.total_bytes for d in plan.devices if d.device == "cpu")),
    }
    return LaunchSpec(
        engine=plan.engine,
        engine_version=plan.engine_version,
        image=image,
        name=f"{prefix}-model-{ident}",
        model=spec.name,
        command=command,
        env=env,
        mounts=mounts,
        gpus=gpus,
        port=eng.PORT,
        health_path="/health",
        stop_timeout_s=eng.STOP_TIMEOUT_S,
        shm_size=shm,
        ipc_mode=ipc,
        labels=labels,
    )
