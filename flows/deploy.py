"""Deploy a spec end to end, and retire a model.

    deploy_model(spec)  = prepare -> launch -> ready -> smoke -> gateway -> stop the previous
    roll_out(launch)    = the part after prepare: a new replica replaces the old ones only
                          once it is healthy, tested and routed; otherwise it is removed and
                          the old ones keep serving
    retire_model(name)  = drain from the gateway, stop and remove every replica of a model

The replacement is a Prefect transaction: the start task's rollback hook removes the new
replica and the gateway task's hook removes its route, so a failure at any step (engine dies,
times out, fails a smoke test, gateway refuses) leaves things as they were. The previous
replicas are stopped only after the transaction has committed. A global concurrency limit of
one slot per host keeps two deploys from fighting over the same GPUs.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.transactions import transaction

from cortex.runtime import RUNTIMES, ReplicaError, get_runtime, ready_timeout_s
from cortex.runtime.base import launch_dict, path_size, probe_health, served_model_name
from cortex.runtime.rollout import DeployResult, gateway_client, host_slot_name, replicas_of
from cortex.settings import Settings
from tasks.deploy import register_in_gateway, retire_replica, smoke_test_replica, start_replica, wait_until_ready


class DeployBusy(RuntimeError):
    """Another deploy holds this host's deploy slot."""


def host_deploy_slot(runtime: str, timeout_s: float | None = None):
    """The per-host deploy slot (a Prefect global concurrency limit of 1, created if missing)."""
    name = host_slot_name(runtime)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    return _Slot(name, Settings.load().deploy_lock_timeout_s if timeout_s is None else timeout_s)


class _Slot:
    def __init__(self, name: str, timeout_s: float):
        self.name, self.timeout_s = name, timeout_s
        self._cm = None

    def __enter__(self) -> "_Slot":
        self._cm = concurrency(self.name, occupy=1, timeout_seconds=self.timeout_s, strict=True)
        try:
            self._cm.__enter__()
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
def roll_out(
    launch: dict[str, Any],
    runtime: str = "process",
    task_kind: str = "generate",
    prompts: list[str] | None = None,
    max_tokens: int = 16,
    embedding_dim: int | None = None,
    aliases: list[str] | None = None,
    ready_timeout: float | None = None,
    gateway: bool | None = None,
    benchmark: dict[str, Any] | None = None,
    gpus: int = 0,
    quality: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start `launch`, prove it works, measure it against its gates, route to it, then stop the
    model's other replicas. `benchmark` is the spec's benchmark section (None: no benchmark)."""
    logger = get_run_logger()
    launch = launch_dict(launch)
    model = served_model_name(launch)
    rt = get_runtime(runtime)
    for orphan in rt.cleanup_orphans():
        logger.warning("removed %s: its engine was no longer running", orphan.name)
    existing = replicas_of(rt, model)
    same = next((r for r in existing if r.name == launch["name"]), None)
    # The model's other replicas, in this runtime and any other that answers (a spec that moves
    # from process to docker replaces the process replica too).
    previous = [r for r in existing if r.name != launch["name"]]
    for other in available_runtimes():
        if other.kind != runtime:
            previous += replicas_of(other, model)
    gw = gateway_client(gateway)
    gateway_state = "registered" if gw else ("disabled" if gateway is False else "not running")
    if gw is None and gateway is None:
        logger.info("no gateway answers at CORTEX_GATEWAY_URL; the engine's own endpoint is the result")
    timeout = ready_timeout if ready_timeout is not None else ready_timeout_s(launch["engine"])
    smoke_args = dict(task_kind=task_kind, prompts=prompts, max_tokens=max_tokens, embedding_dim=embedding_dim)

    if same is not None and probe_health(same) == "ok":
        # The very same launch already serves: test it again, keep it, retire the others.
        logger.info("%s already runs this launch; testing it again instead of restarting", same.name)
        replica, reused = same, True
        smoke = smoke_test_replica(replica, **smoke_args)
        bench = _benchmark(replica, benchmark, gpus)
        if gw:
            register_in_gateway(replica, aliases or [])
    else:
        reused = False
        if same is not None:  # the same launch exists but does not answer healthy: replace it
            logger.warning("%s exists but is not healthy; replacing it", same.name)
            rt.stop(same)
        with transaction():
            replica = start_replica(launch, runtime)
            replica = wait_until_ready(replica, timeout)
            smoke = smoke_test_replica(replica, **smoke_args)
            # a failed gate raises here, inside the transaction: the new replica is rolled back
            bench = _benchmark(replica, benchmark, gpus)
            # quantization quality against the F16 reference (a llama.cpp GGUF made from HF)
            _quality(replica, quality, runtime, timeout)
            if gw:
                register_in_gateway(replica, aliases or [])

    stopped = [retire_replica(old, drain_gateway=gw is not None) for old in previous]
    return DeployResult(
        name=model, engine=replica.engine, runtime=runtime, endpoint=replica.endpoint,
        replica=replica.name, smoke=smoke.model_dump(), gateway=gateway_state, reused=reused,
        stopped=stopped, since=replica.since,
    ).to_json() | {"benchmark": bench}


def _benchmark(replica: Any, section: dict[str, Any] | None, gpus: int) -> dict[str, Any] | None:
    """Benchmark the replica with the spec's section and enforce its gates (GatesFailed)."""
    if section is None:
        return None
    from cortex.bench import BenchmarkSettings
    from cortex.spec import BenchmarkSpec
    from tasks.benchmark import run_benchmark

    spec = BenchmarkSpec.model_validate(section)
    result = run_benchmark(
        replica.endpoint, BenchmarkSettings.from_spec(spec, gpus=gpus), model=replica.model,
        api_key=replica.api_key, gates=list(spec.gates), target=replica.name,
    )
    return {"levels": [
        {"concurrency": lv.concurrency, "output_tokens_per_s": lv.output_tokens_per_s,
         "requests_per_s": lv.requests_per_s, "ttft_ms_p50": lv.ttft_ms.p50, "errors": lv.errors}
        for lv in result.levels
    ]}


def _quality(replica: Any, quality: dict[str, Any] | None, runtime: str, timeout: float) -> None:
    """Start the F16 reference next to the new replica, compare them, stop the reference;
    a score under the spec's threshold raises QualityGateFailed (the transaction rolls back)."""
    if not quality:
        return
    from cortex.runtime.rollout import engine_secrets
    from tasks.benchmark import quality_check

    rt = get_runtime(runtime)
    reference = rt.start(quality["reference_launch"], engine_secrets())
    try:
        reference = rt.wait_ready(reference, timeout)
        quality_check(
            reference.endpoint, replica.endpoint, prompts=quality["prompts"], tokens=quality["tokens"],
            min_top1_agreement=quality["min_top1_agreement"], candidate_label=quality["label"],
            api_key=replica.api_key, reference_api_key=reference.api_key,
        )
    finally:
        rt.stop(reference)


def launch_for_spec(spec: Any, spec_path: str) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
    """(launch, artifact bytes, quality check): prepare the weights (a subflow), then build the
    launch; when the spec asks for a quality check of a GGUF made from an HF checkpoint, also the
    launch of its F16 reference."""
    from cortex.launch import build_launch
    from flows.prepare import prepare_model

    prepared = prepare_model(spec_path)
    launch = build_launch(spec, prepared.plan, prepared.artifact_path, prepared.mount_root)
    paths = prepared.artifact_path if isinstance(prepared.artifact_path, list) else [prepared.artifact_path]
    quality = None
    check = spec.benchmark.quality if spec.benchmark else None
    if check is not None:
        quant = prepared.plan.artifact.quantization.upper()
        if prepared.plan.engine != "llamacpp" or prepared.plan.artifact.convert_from != "hf" or quant == "F16":
            get_run_logger().warning("benchmark.quality needs a llama.cpp GGUF quantized from an HF checkpoint; "
                                     "this plan (%s %s) has no F16 reference to compare with", prepared.plan.engine, quant)
        else:
            from cortex.artifacts import ArtifactKey, ArtifactStore
            from cortex.toolchain import find_toolchain

            f16 = ArtifactStore().get(ArtifactKey(prepared.source_revision, "F16", find_toolchain().version))
            if f16 is None:
                raise RuntimeError(f"the F16 reference of {spec.name} is not in the artifact cache; "
                                   "run `cortex prepare` again (it keeps the F16 it quantizes from)")
            reference = build_launch(spec, prepared.plan, f16.model_file)
            quality = {"reference_launch": launch_dict(reference), "prompts": check.prompts, "tokens": check.tokens,
                       "min_top1_agreement": check.min_top1_agreement, "label": quant}
    return launch_dict(launch), sum(path_size(p) for p in paths), quality


@flow(name="deploy-model")
def deploy_model(spec_path: str, runtime: str | None = None, gateway: bool | None = None) -> dict[str, Any]:
    """Deploy the model a spec file describes; see the module docstring for the steps."""
    from cortex.specfile import load_spec

    spec = load_spec(spec_path)
    kind = runtime or spec.runtime
    if kind not in RUNTIMES:
        raise ValueError(f"unknown runtime {kind!r}; choose one of {', '.join(RUNTIMES)}")
    with host_deploy_slot(kind):
        launch, artifact_bytes, quality = launch_for_spec(spec, spec_path)
        return roll_out(
            launch, kind, task_kind=spec.task, prompts=spec.tests.prompts,
            max_tokens=spec.tests.max_tokens, aliases=list(spec.aliases),
            ready_timeout=ready_timeout_s(launch["engine"], artifact_bytes), gateway=gateway,
            benchmark=spec.benchmark.model_dump() if spec.benchmark else None,
            gpus=spec.resources.gpu_count, quality=quality,
        )


def available_runtimes(runtime: str | None = None) -> list[Any]:
    """The runtimes to look in: the one named, or process plus docker where a daemon answers."""
    if runtime:
        return [get_runtime(runtime)]
    runtimes = [get_runtime("process")]
    try:
        runtimes.append(get_runtime("docker"))
    except ReplicaError:
        pass  # no Docker daemon here: nothing of Cortex's can run there
    return runtimes


@flow(name="retire-model")
def retire_model(name: str, runtime: str | None = None) -> list[str]:
    """Drain every replica of model `name` from the gateway, then stop and remove it."""
    gw = gateway_client(None)
    stopped: list[str] = []
    for rt in available_runtimes(runtime):
        for replica in replicas_of(rt, name):
            stopped.append(retire_replica(replica, drain_gateway=gw is not None))
    if not stopped:
        raise LookupError(f"no replica of model {name!r} is running (see `cortex status`)")
    return stopped
