"""A rollout as typed values: what flows/deploy.py's `roll_out` is asked to do, and what a
deploy reports. Prefect shows both on the run's page.

    RolloutRequest   the launch and the runtime kind it starts in, the smoke tests it must pass
                     (SmokeRequest), the spec's benchmark section with its gates, the comparison
                     with the F16 reference (QualityRequest), the gateway aliases, the ready timeout,
                     the plan's bytes per device (held against the engine's own report: cortex.actual)
    DeployResult     what the deploy did: replica, endpoint, smoke tests, gateway, what it replaced,
                     the benchmark summary, the quality check, what changed since the model's
                     previous deploy (cortex.provenance); `.to_json()` is what `cortex deploy --json` prints

`rollout_request` builds the request from a spec and what `prepare` made of it.

On a fleet host a replica's name ends in the host's name, and a host may run several replicas
of one model (more replicas than hosts): each is an instance, 0, 1, ..., with its own name,
port, engine and gateway route. Instance 0 keeps the plain `-<host>` ending (the name a host's
only replica always had); instance i > 0 ends in `-<host>_<i>`. Host names have no `_`
(cortex.spec.check_host_name), so the ending names one host and one instance.
"""

from __future__ import annotations

import dataclasses

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cortex.artifacts import f16_reference
from cortex.launch import LaunchSpec, build_launch
from cortex.plan import DevicePlan, Plan
from cortex.probe import SmokeResult
from cortex.quality import QualityReport
from cortex.runtime import RuntimeKind
from cortex.runtime.base import path_size, ready_timeout_s
from cortex.spec import BenchmarkSpec, ModelSpec, QualityCheck, SmokeTests

if TYPE_CHECKING:
    from cortex.bench import BenchmarkResult


class SmokeRequest(SmokeTests):
    """The smoke tests a new replica must pass: the spec's `tests`, for the model's `task`."""

    task: Literal["generate", "embed"] = "generate"
    embedding_dim: int | None = Field(None, ge=1, description="the vector size an embed model must return")


class QualityRequest(BaseModel):
    """Compare the new replica with its F16 reference started beside it (the spec's
    `benchmark.quality`); a top-1 agreement under the check's minimum fails the rollout, and so
    does llama-perplexity's KL-divergence of the two files outside the check's KLD gates."""

    model_config = ConfigDict(frozen=True)

    reference: LaunchSpec  # the F16 GGUF the candidate was quantized from, served the same way
    check: QualityCheck  # prompts, tokens, min_top1_agreement, max_kld, min_same_top_p
    label: str  # the candidate's quantization, e.g. Q4_K_M
    reference_gguf: Path  # the F16 file in the artifact cache (llama-perplexity reads it here)
    reference_sha256: str
    candidate_gguf: Path  # the candidate's file in the artifact cache


class RolloutRequest(BaseModel):
    """Everything `roll_out` needs to replace a model's replicas with `launch`."""

    model_config = ConfigDict(frozen=True)

    launch: LaunchSpec
    runtime: RuntimeKind = "process"
    smoke: SmokeRequest = Field(default_factory=SmokeRequest)
    benchmark: BenchmarkSpec | None = None  # None: no benchmark, no gates
    gpus: int = Field(0, ge=0, description="GPUs the replica uses (the benchmark's cost per token)")
    quality: QualityRequest | None = None
    aliases: list[str] = Field(default_factory=list)
    fallbacks: list[str] = Field(default_factory=list)  # the gateway's fallback list for the model
    ready_timeout: float | None = Field(None, gt=0, description="seconds to healthy (default: the engine's)")
    gateway: bool | None = None  # True: must register; False: do not; None: if a gateway answers
    host: str | None = None  # the fleet host it runs on (None: a single machine)
    instance: int = Field(0, ge=0, description="which of the model's replicas on this host")
    # the plan's bytes per device, compared with what the engine reports once ready (cortex.actual)
    memory_plan: list[DevicePlan] = Field(default_factory=list)

    def ready_timeout_s(self) -> float:
        return self.ready_timeout if self.ready_timeout is not None else ready_timeout_s(self.launch.engine)


def quality_request(
    spec: ModelSpec, plan: Plan, source_revision: str, candidate: Path | list[Path]
) -> QualityRequest | None:
    """The spec's comparison with the F16 reference. None when it asks for none, or when the
    plan has no F16 reference (see cortex.artifacts.f16_reference); ArtifactError when the
    reference should be cached and is not."""
    check = spec.benchmark.quality if spec.benchmark else None
    if check is None:
        return None
    reference = f16_reference(plan, source_revision)
    if reference is None:
        return None
    return QualityRequest(
        reference=build_launch(spec, plan, reference.model_file),
        check=check,
        label=plan.artifact.quantization.upper(),
        reference_gguf=reference.model_file,
        reference_sha256=reference.files[0].sha256,
        candidate_gguf=candidate[0] if isinstance(candidate, list) else candidate,
    )


def rollout_request(
    spec: ModelSpec,
    plan: Plan,
    artifact: Path | list[Path],
    *,
    runtime: RuntimeKind,
    source_revision: str,
    mount_root: Path | None = None,
    gateway: bool | None = None,
    host: str | None = None,
    instance: int = 0,
) -> RolloutRequest:
    """The rollout of a prepared spec: its launch, tests, benchmark and quality comparison, and a
    ready timeout that allows for reading the weights. `host`: the fleet host it runs on; its
    name and `instance` end the replica's (replica_suffix), so replicas of one spec on several
    hosts, or several on one host, are told apart in the gateway (one registry for the fleet)."""
    launch = build_launch(spec, plan, artifact, mount_root)
    if host:
        launch = dataclasses.replace(launch, name=launch.name + replica_suffix(host, instance))
    elif instance:
        raise ValueError(f"instance {instance} of {spec.name}: instances are of a fleet host; no host is named")
    weights = sum(path_size(p) for p in (artifact if isinstance(artifact, list) else [artifact]))
    return RolloutRequest(
        launch=launch,
        runtime=runtime,
        smoke=SmokeRequest(task=spec.task, **spec.tests.model_dump()),
        benchmark=spec.benchmark,
        gpus=spec.resources.gpu_count,
        quality=quality_request(spec, plan, source_revision, artifact),
        aliases=list(spec.aliases),
        fallbacks=list(spec.fallbacks),
        ready_timeout=ready_timeout_s(launch.engine, weights),
        gateway=gateway,
        host=host,
        instance=instance,
        memory_plan=list(plan.devices),
    )


def replica_suffix(host: str, instance: int = 0) -> str:
    """How a fleet replica's name ends: `-<host>` for instance 0, `-<host>_<instance>` after."""
    return f"-{host.lower()}" + (f"_{instance}" if instance else "")


def _instance_ending(replica: str, host: str) -> re.Match[str] | None:
    return re.search(rf"-{re.escape(host.lower())}(?:_(\d+))?\Z", replica)


def instance_of(replica: str, host: str) -> int | None:
    """The instance a replica of `host` is, from its name; None when the name ends in no instance
    of that host (a replica started on a single machine, before the host joined a fleet)."""
    m = _instance_ending(replica, host)
    return None if m is None else int(m[1] or 0)


def same_launch(a: str, b: str, host: str) -> bool:
    """Whether two replica names of `host` are instances of one launch (they differ only in
    their instance)."""
    ma, mb = _instance_ending(a, host), _instance_ending(b, host)
    return ma is not None and mb is not None and a[: ma.start()] == b[: mb.start()]


def replaced_by(host: str | None, instance: int, existing: list[str]) -> list[str]:
    """Which of a model's `existing` replica names a rollout of `instance` on `host` replaces
    once its own replica serves. On a single machine (no host): every one. On a fleet host: those
    of the same instance, and, for instance 0, those that are no instance of the host (left from
    a deploy before it joined); another instance is never touched, so a host runs several side
    by side. retire-model of one instance takes the same ones."""
    if host is None:
        return list(existing)
    wanted = {instance, None} if instance == 0 else {instance}
    return [name for name in existing if instance_of(name, host) in wanted]


class LevelSummary(BaseModel):
    """One load level of the benchmark, as a deploy reports it."""

    concurrency: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms_p50: float | None
    errors: int


class BenchmarkSummary(BaseModel):
    levels: list[LevelSummary]

    @classmethod
    def of(cls, result: BenchmarkResult) -> "BenchmarkSummary":
        return cls(
            levels=[
                LevelSummary(
                    concurrency=lv.concurrency,
                    output_tokens_per_s=lv.output_tokens_per_s,
                    requests_per_s=lv.requests_per_s,
                    ttft_ms_p50=lv.ttft_ms.p50,
                    errors=lv.errors,
                )
                for lv in result.levels
            ]
        )


class DeployResult(BaseModel):
    """What a deploy did. The field order is the key order of `cortex deploy --json`."""

    name: str  # the served model name
    engine: str
    runtime: str
    endpoint: str
    replica: str
    smoke: SmokeResult
    gateway: Literal["registered", "not running", "disabled"] = "disabled"
    reused: bool = False  # the same launch already served: tested again, not restarted
    stopped: list[str] = Field(default_factory=list)  # the replicas it replaced
    since: str = ""
    benchmark: BenchmarkSummary | None = None
    quality: QualityReport | None = None  # the comparison with the F16 reference, when the spec asks for one
    # what changed since the model's previous provenance record (cortex.provenance), in words;
    # ["first record"] for a model's first deploy; set by deploy-model, empty from roll-out alone
    changes: list[str] = Field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """What `cortex deploy --json` prints."""
        return self.model_dump(mode="json")


def dead_routes(routes: list[dict[str, Any]], live: set[str], runtimes: set[str], host: str) -> list[str]:
    """Ids of gateway routes (the admin API's replica views) whose replica is gone: started by one
    of `runtimes` on `host` (labels from the deploy flow; routes from before the host label count
    as this host's), and not among the `live` replica names. Routes registered by hand carry no
    runtime label and are never taken for dead."""
    dead = []
    for route in routes:
        labels = route.get("labels") or {}
        if route["id"] in live or labels.get("runtime") not in runtimes:
            continue
        if labels.get("host", host) == host:
            dead.append(route["id"])
    return dead
