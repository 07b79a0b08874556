"""Deploy a spec end to end, and retire a model.

    deploy_model(spec)    = prepare -> launch -> ready -> memory against the plan -> smoke -> gateway
                            -> stop the previous -> the provenance record, and what changed since
                            the model's previous one (cortex.provenance)
    roll_out(request)     = the part after prepare: a new replica replaces the old ones only
                            once it is healthy, tested and routed; otherwise it is removed and
                            the old ones keep serving
    retire_model(name)    = drain from the gateway, stop and remove every replica of a model

roll_out takes a `RolloutRequest` and both deploy flows return a `DeployResult`
(cortex.runtime.rollout); what to deploy and how to check it is decided there, in the core.
Each flow run makes its runtimes once and hands them to the tasks.

The replacement is a Prefect transaction: the start task's rollback hook removes the new
replica and the gateway task's hook removes its route, so a failure at any step (engine dies,
times out, fails a smoke test, gateway refuses) leaves things as they were. The previous
replicas are stopped only after the transaction has committed. A global concurrency limit of
one slot per host keeps two deploys from fighting over the same GPUs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.transactions import transaction

from cortex.applied import all_applied, forget_applied
from cortex.quality import QualityReport
from cortex.gateway.client import gateway_client
from cortex.runtime import Replica, Runtime, RuntimeKind, get_runtime, reachable_runtimes, runtime_class
from cortex.runtime.base import engine_secrets
from cortex.runtime.rollout import (
    BenchmarkSummary,
    DeployResult,
    QualityRequest,
    RolloutRequest,
    dead_routes,
    replaced_by,
    rollout_request,
)
from cortex.settings import Settings
from tasks.deploy import (
    compare_memory_with_plan,
    record_provenance,
    register_in_gateway,
    remove_dead_routes,
    retire_replica,
    smoke_test_replica,
    start_replica,
    wait_until_ready,
)


class DeployBusy(RuntimeError):
    """Another deploy holds this host's deploy slot."""


def host_deploy_slot(runtime: str, timeout_s: float | None = None):
    """The deploy slot of the host whose GPUs the runtime uses (the Docker host for docker, this
    machine for process): a Prefect global concurrency limit of 1, created if missing."""
    name = f"cortex-deploy-{runtime_class(runtime).host()}"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    return _Slot(name, Settings.load().deploy_lock_timeout_s if timeout_s is None else timeout_s)


class _Slot:
    def __init__(self, name: str, timeout_s: float):
        self.name, self.timeout_s = name, timeout_s
        self._cm: AbstractContextManager[None] | None = None

    def __enter__(self) -> "_Slot":
        self._cm = cm = concurrency(self.name, occupy=1, timeout_seconds=self.timeout_s, strict=True)
        try:
            cm.__enter__()
        except TimeoutError as exc:
            raise DeployBusy(
                f"another deploy holds {self.name} (global concurrency limit) for more than "
                f"{self.timeout_s:.0f} s; wait for it, or see `prefect gcl inspect {self.name}`"
            ) from exc
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._cm is not None
        self._cm.__exit__(*exc)


@flow(name="roll-out")
def roll_out(request: RolloutRequest) -> DeployResult:
    """Start the request's launch, prove it works, measure it against its gates, route to it,
    then stop the model's other replicas."""
    logger = get_run_logger()
    launch = request.launch
    # every runtime this run uses, made once: the one to start in, and any other that answers
    # (a spec that moves from process to docker replaces the process replica too)
    runtimes, _ = reachable_runtimes(request.runtime)
    rt = runtimes[request.runtime]
    gw = gateway_client(request.gateway)
    if gw is not None:
        gw.close()  # it answers; each gateway task opens its own client
    orphans = rt.cleanup_orphans()
    for orphan in orphans:
        logger.warning("removed %s: its engine was no longer running", orphan.name)
    if orphans and gw:  # the route goes with the state: another process may take the port
        remove_dead_routes([orphan.name for orphan in orphans])
    existing = [r for other in runtimes.values() for r in other.replicas_of(launch.model)]
    same = next((r for r in existing if r.name == launch.name and r.runtime == rt.kind), None)
    # on a fleet host, only this instance's older replicas: the host's other instances keep serving
    replaced = set(replaced_by(request.host, request.instance, [r.name for r in existing]))
    previous = [r for r in existing if r is not same and r.name in replaced]
    gateway_state = "registered" if gw else ("disabled" if request.gateway is False else "not running")
    if gw is None and request.gateway is None:
        logger.info("no gateway answers at CORTEX_GATEWAY_URL; the engine's own endpoint is the result")
    timeout = request.ready_timeout_s()

    quality = None
    if same is not None and rt.health(same) == "ok":
        # The very same launch already serves: test it again, keep it, retire the others.
        logger.info("%s already runs this launch; testing it again instead of restarting", same.name)
        replica, reused = same, True
        smoke = smoke_test_replica(replica, request.smoke)
        bench = _benchmark(replica, request)
        if gw:
            register_in_gateway(replica, request.aliases, request.fallbacks)
    else:
        reused = False
        if same is not None:  # the same launch exists but does not answer healthy: replace it
            logger.warning("%s exists but is not healthy; replacing it", same.name)
            rt.stop(same)
        with transaction():
            replica = start_replica(launch, rt)
            replica = wait_until_ready(replica, rt, timeout)
            compare_memory_with_plan(replica, rt, request.memory_plan)  # warns, never fails
            smoke = smoke_test_replica(replica, request.smoke)
            # a failed gate raises here, inside the transaction: the new replica is rolled back
            bench = _benchmark(replica, request)
            if request.quality is not None:
                quality = _compare_with_reference(replica, request.quality, rt, timeout)
            if gw:
                register_in_gateway(replica, request.aliases, request.fallbacks)

    stopped = [retire_replica(old, runtimes[old.runtime], drain_gateway=gw is not None) for old in previous]
    return DeployResult(
        name=launch.model,
        engine=replica.engine,
        runtime=rt.kind,
        endpoint=replica.endpoint,
        replica=replica.name,
        smoke=smoke,
        gateway=gateway_state,
        reused=reused,
        stopped=stopped,
        since=replica.since,
        benchmark=bench,
        quality=quality,
    )


def _benchmark(replica: Replica, request: RolloutRequest) -> BenchmarkSummary | None:
    """Benchmark the replica with the spec's section and enforce its gates (GatesFailed)."""
    if request.benchmark is None:
        return None
    from cortex.bench import BenchmarkSettings
    from tasks.benchmark import run_benchmark

    result = run_benchmark(
        replica.endpoint,
        BenchmarkSettings.from_spec(request.benchmark, gpus=request.gpus),
        model=replica.model,
        api_key=replica.api_key,
        gates=list(request.benchmark.gates),
        target=replica.name,
    )
    return BenchmarkSummary.of(result)


def _compare_with_reference(replica: Replica, quality: QualityRequest, rt: Runtime, timeout: float) -> QualityReport:
    """Measure the KL-divergence of the two files when a KLD gate is set, start the F16
    reference next to the new replica, compare them, stop the reference; a score outside any of
    the spec's gates raises QualityGateFailed (the transaction rolls back)."""
    from cortex.progress import Reporter
    from tasks.benchmark import kl_divergence, quality_check

    check = quality.check
    kld = None
    if check.measures_kld():  # before the reference starts: llama-perplexity has the CPU to itself
        kld = kl_divergence(
            quality.reference_gguf,
            quality.candidate_gguf,
            candidate_label=quality.label,
            reference_sha256=quality.reference_sha256,
            max_kld=check.max_kld,
            min_same_top_p=check.min_same_top_p,
        )
    reference = rt.start(quality.reference, engine_secrets())
    try:
        reference = rt.wait_ready(reference, timeout, progress=Reporter())
        return quality_check(
            reference.endpoint,
            replica.endpoint,
            prompts=quality.check.prompts,
            tokens=quality.check.tokens,
            min_top1_agreement=quality.check.min_top1_agreement,
            candidate_label=quality.label,
            api_key=replica.api_key,
            reference_api_key=reference.api_key,
            kld=kld,
        )
    finally:
        rt.stop(reference)


@flow(name="deploy-model")
def deploy_model(
    spec_path: str,
    runtime: RuntimeKind | None = None,
    gateway: bool | None = None,
    spec_text: str | None = None,
    instance: int = 0,
) -> DeployResult:
    """Deploy the model a spec file describes; see the module docstring for the steps.

    On a fleet host (fleet-apply starts it there): `spec_text` is the spec's text, since the
    host has no file at `spec_path` (the control plane's, kept for messages and provenance); it
    is written to the host's fleet-specs folder and deployed from there. `instance` says which
    of the model's replicas on this host it is (each has its own name, port and engine)."""
    from cortex.applied import store_fleet_spec
    from cortex.specfile import load_spec
    from flows.prepare import prepare_model

    spec_file = str(store_fleet_spec(spec_text, spec_path)) if spec_text is not None else spec_path
    spec = load_spec(spec_file)
    kind = runtime or spec.runtime
    with host_deploy_slot(kind):
        prepared = prepare_model(spec_file)
        request = rollout_request(
            spec,
            prepared.plan,
            prepared.artifact_path,
            runtime=kind,
            source_revision=prepared.source_revision,
            mount_root=prepared.mount_root,
            gateway=gateway,
            host=Settings.load().host_name,
            instance=instance,
        )
        if spec.benchmark and spec.benchmark.quality and request.quality is None:
            get_run_logger().warning(
                "benchmark.quality needs a llama.cpp GGUF quantized from an HF checkpoint; this plan (%s %s) "
                "has no F16 reference to compare with",
                prepared.plan.engine,
                prepared.plan.artifact.quantization,
            )
        result = roll_out(request)
        # after the rollout committed: a failed deploy leaves the running one's record as it was
        changes = record_provenance(prepared, request.launch, result, spec_path, spec_file)
        return result.model_copy(update={"changes": changes})


def available_runtimes(runtime: str | None = None) -> list[Runtime]:
    """The runtimes to look in: the one named, or process plus docker where a daemon answers."""
    return [get_runtime(runtime)] if runtime else list(reachable_runtimes()[0].values())


@flow(name="retire-model")
def retire_model(name: str, runtime: str | None = None, instance: int | None = None) -> list[str]:
    """Drain every replica of model `name` from the gateway, then stop and remove it; remove the
    routes of its replicas whose engine is already gone. Returns the replica names stopped or
    unrouted. Specs applied under that name are forgotten, so `cortex serve` does not restart it.
    `instance` (on a fleet host): only that instance of the model on this host; the others and
    the applied records stay."""
    host = Settings.load().host_name
    if instance is not None and not host:
        raise ValueError(f"instance {instance} of {name}: instances are of a fleet host, and this is not one")

    def chosen(replica_name: str) -> bool:  # instance 0 also takes a replica of no instance, as its deploy does
        return instance is None or bool(replaced_by(host, instance, [replica_name]))

    gw = gateway_client(None)
    if gw is not None:
        gw.close()  # it answers: drain there first
    runtimes = available_runtimes(runtime)
    stopped = [
        retire_replica(replica, rt, drain_gateway=gw is not None)
        for rt in runtimes
        for replica in rt.replicas_of(name)
        if chosen(replica.name)
    ]
    unrouted: list[str] = []
    if gw is not None:
        with gateway_client(True) as client:
            routes = client.replicas_of(name)
        dead = [
            rid
            for rt in runtimes
            for rid in dead_routes(routes, live=set(), runtimes={rt.kind}, host=rt.host())
            if chosen(rid)
        ]
        unrouted = remove_dead_routes(dead) if dead else []
    if instance is None:
        for record in all_applied():
            if record.name == name:
                forget_applied(record.spec_path)
    if not stopped and not unrouted:
        which = f"instance {instance} of model {name!r}" if instance is not None else f"replica of model {name!r}"
        raise LookupError(f"no {which} is running (see `cortex status`)")
    return stopped + unrouted
