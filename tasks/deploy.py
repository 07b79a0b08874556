"""Prefect tasks of a deploy: each wraps one function of cortex.runtime / cortex.probe and
adds only what Prefect is for (logging, artifacts, rollback hooks). The flow hands each task
the runtime it made for the run.

The rollback hooks undo what a task did when the transaction around it fails: a started
replica is stopped and removed, a gateway registration is removed. None of these tasks cache:
a deploy must really start and test an engine each time.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.transactions import Transaction, get_transaction

from cortex.actual import (
    MemoryComparison,
    compare_memory,
    forget_memory_record,
    read_engine_report,
    read_memory_record,
    write_memory_record,
)
from cortex.applied import spec_sha256
from cortex.launch import LaunchSpec
from cortex.plan import DevicePlan
from cortex.prepared import Prepared
from cortex.probe import SmokeResult, SmokeTestFailed, smoke_test
from cortex.provenance import build_record, keep_record, record_markdown, record_path
from cortex.runtime import Replica, Runtime, get_runtime, runtime_class
from cortex.runtime.base import engine_secrets
from cortex.runtime.rollout import DeployResult, SmokeRequest
from tasks.common import TASK_OPTIONS, ProgressArtifact, artifact_key


@task(name="start-replica", **TASK_OPTIONS)
def start_replica(launch: LaunchSpec, runtime: Runtime) -> Replica:
    # Secrets are made here, not passed in, so they never appear among a task's parameters.
    replica = runtime.start(launch, engine_secrets())
    transaction = get_transaction()
    if transaction is not None:
        transaction.set("replica", replica)
        transaction.set("runtime", runtime)
    get_run_logger().info("started %s (%s, %s) at %s", replica.name, replica.engine, runtime.kind, replica.endpoint)
    return replica


@start_replica.on_rollback
def _remove_started_replica(transaction: Transaction) -> None:
    replica = transaction.get("replica", None)
    if replica is None:
        return  # the start itself failed: the runtime left nothing behind
    transaction.get("runtime").stop(replica)


@task(name="wait-until-ready", **TASK_OPTIONS)
def wait_until_ready(replica: Replica, runtime: Runtime, timeout_s: float) -> Replica:
    logger = get_run_logger()
    logger.info("waiting up to %.0f s for %s%s", timeout_s, replica.endpoint, replica.health_path)
    last_report = [0.0]

    def report(elapsed: float) -> None:
        if elapsed - last_report[0] >= 15:
            last_report[0] = elapsed
            logger.info("%s not ready yet (%.0f s)", replica.name, elapsed)

    progress = ProgressArtifact(
        artifact_key("start", replica.name), f"Start of {replica.engine} replica {replica.name} at {replica.endpoint}"
    )
    runtime.wait_ready(replica, timeout_s, on_wait=report, progress=progress.reporter())
    progress.finish(f"{replica.name} ready")
    logger.info("%s is healthy", replica.name)
    return replica


# llama-server's load report is its first ~200 lines; read well past it
MEMORY_REPORT_LINES = 5000


@task(name="compare-memory", **TASK_OPTIONS)
def compare_memory_with_plan(replica: Replica, runtime: Runtime, planned: list[DevicePlan]) -> MemoryComparison:
    """Read the ready engine's own account of its memory, hold it against the plan, warn for
    every term more than 10% off (or a report that could not be read), keep the comparison with
    the replica (`cortex status --json`) and show it as a table artifact. Never fails the deploy."""
    logger = get_run_logger()
    try:
        log = runtime.logs(replica, lines=MEMORY_REPORT_LINES)
    except OSError as exc:  # the log itself is unreadable: the comparison says so
        log = ""
        logger.warning("could not read the log of %s: %s", replica.name, exc)
    comparison = compare_memory(planned, read_engine_report(replica.engine, log))
    for warning in comparison.warnings:
        logger.warning("%s: %s", replica.name, warning)
    write_memory_record(replica.name, comparison)
    transaction = get_transaction()
    if transaction is not None:
        transaction.set("memory_record", replica.name)
    create_table_artifact(
        key=artifact_key(f"memory-{replica.model}"),
        table=comparison.table() or [{"problem": comparison.problem or "no device was planned"}],
        description=f"Memory of {replica.name} ({replica.engine}, {replica.runtime}): planned against what "
        f"the engine reports. " + ("; ".join(comparison.warnings) or "every term within 10% of the plan"),
    )
    if not comparison.warnings:
        logger.info("%s: memory as planned (every term within 10%%)", replica.name)
    return comparison


@compare_memory_with_plan.on_rollback
def _forget_memory_record(transaction: Transaction) -> None:
    replica = transaction.get("memory_record", None)
    if replica is not None:
        forget_memory_record(replica)


@task(name="smoke-test", **TASK_OPTIONS)
def smoke_test_replica(replica: Replica, request: SmokeRequest) -> SmokeResult:
    result = smoke_test(
        replica.endpoint,
        replica.model,
        task=request.task,
        prompts=request.prompts,
        max_tokens=request.max_tokens,
        api_key=replica.api_key,
        embedding_dim=request.embedding_dim,
    )
    create_table_artifact(
        key=artifact_key(f"smoke-{replica.model}"),
        table=result.table(),
        description=f"Smoke tests of {replica.model} on {replica.name} ({replica.engine}, {replica.runtime}): "
        f"{'passed' if result.passed else 'FAILED'}",
    )
    if not result.passed:
        raise SmokeTestFailed(result)
    get_run_logger().info(result.summary())
    return result


@task(name="register-in-gateway", **TASK_OPTIONS)
def register_in_gateway(replica: Replica, aliases: list[str], fallbacks: list[str] | None = None) -> dict[str, Any]:
    """Route the replica's model (and aliases) to it; `fallbacks`, when given, replaces the
    model's fallback list in the gateway (the spec's list, so removing one there removes it)."""
    from cortex.gateway.client import GatewayClient

    with GatewayClient() as client:
        registered = client.register(
            replica.model,
            replica.endpoint,
            engine_api_key=replica.api_key,
            aliases=aliases,
            fallbacks=fallbacks,
            replica_id=replica.name,
            labels={
                "engine": replica.engine,
                "runtime": replica.runtime,
                "host": runtime_class(replica.runtime).host(),
            },
        )
    transaction = get_transaction()
    if transaction is not None:
        transaction.set("gateway_replica_id", registered["id"])
    get_run_logger().info("gateway routes %s to %s", replica.model, replica.endpoint)
    return registered


@register_in_gateway.on_rollback
def _deregister(transaction: Transaction) -> None:
    from cortex.gateway.client import GatewayClient

    replica_id = transaction.get("gateway_replica_id", None)
    if replica_id is not None:
        with GatewayClient() as client:
            client.deregister(replica_id)


@task(name="remove-dead-routes", **TASK_OPTIONS)
def remove_dead_routes(replica_ids: list[str]) -> list[str]:
    """Deregister the gateway routes of replicas whose engine is gone (nothing to drain: nothing
    answers there, or something else does). Returns the ids the gateway had."""
    from cortex.gateway.client import GatewayClient

    with GatewayClient() as client:
        removed = [rid for rid in replica_ids if client.remove_route(rid)]
    for rid in removed:
        get_run_logger().warning("removed the gateway route of %s: its engine is no longer running", rid)
    return removed


@task(name="retire-replica", **TASK_OPTIONS)
def retire_replica(replica: Replica, runtime: Runtime, drain_gateway: bool) -> str:
    """Take a replica out of the gateway (waiting for its requests in flight), then stop it."""
    logger = get_run_logger()
    if drain_gateway:
        from cortex.gateway.client import GatewayClient, GatewayError

        with GatewayClient() as client:
            try:
                client.drain(replica.name, wait=True, timeout=replica.stop_timeout_s + 600)
            except GatewayError as exc:
                if exc.status != 404:  # 404: the gateway never knew it; nothing to drain
                    raise
    runtime.stop(replica)
    forget_memory_record(replica.name)
    logger.info("stopped and removed %s", replica.name)
    return replica.name


@task(name="record-provenance", **TASK_OPTIONS)
def record_provenance(
    prepared: Prepared, launch: LaunchSpec, result: DeployResult, spec_path: str, spec_file: str | None = None
) -> list[str]:
    """Write the deployment's provenance record beside its state (cortex.provenance), log what
    changed since the model's previous record, and publish the record with its changes as the
    `provenance-<model>` artifact. Returns the changes. `spec_file`: where the spec was read
    when not at `spec_path` (a fleet host's copy of the text it was sent); it has the same digest."""
    rt = get_runtime(result.runtime)
    replica = rt.get(result.replica)
    record = build_record(
        prepared,
        launch,
        result,
        rt.engine_identity(replica),
        memory=read_memory_record(replica.name),
        spec_path=spec_path,
        spec_sha256=spec_sha256(spec_file or spec_path),
    )
    changes = keep_record(record)
    logger = get_run_logger()
    if not changes:
        logger.info("%s: nothing that decides the deployment changed since its previous record", result.name)
    for change in changes:
        logger.info("%s: %s", result.name, change)
    create_markdown_artifact(
        key=artifact_key(f"provenance-{result.name}"),
        markdown=record_markdown(record, changes),
        description=f"Provenance of {result.name} ({record_path(result.name)}): "
        + ("; ".join(changes) or "nothing changed since the previous record")[:400],
    )
    return changes
