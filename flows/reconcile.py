"""Spec files to running models: apply one spec, retire a deleted one, reconcile a folder.

    apply_spec(spec_path)                  validate (a bad spec fails the run with every problem,
                                           and touches nothing) -> resolve the source -> deploy
                                           -> benchmark -> remember what was applied
    apply_spec(spec_path, scheduled=True)  the same source commit still runs: benchmark again and
                                           record the numbers; a new commit: prepare and redeploy,
                                           and say what changed against the model's previous
                                           provenance record (new commit, toolchain, plan, ...)
    retire_spec(spec_path)                 the spec file is gone: retire the model it deployed
    reconcile_specs(specs_dir)             apply every spec whose file or source changed or whose
                                           model is not running, retire models of deleted specs,
                                           and report what runs against what the specs declare

Each of them first asks `fleet_or_local()` where to act: with no host joined to the work pool
the local machine is the fleet and everything runs here, as above; as soon as a host has joined
(`cortex host join`), apply-spec runs the fleet-apply flow (flows/fleet.py: place the replicas,
deploy each on its host) as a subflow, reconcile reads what runs from the hosts' records, and
retire-spec runs retire-model on each host that runs a model applied there. The choice and its reason are
in the run's log and its `control-path` artifact.

These are what `cortex serve` registers as deployments (flows/serve.py). Every flow reads the
spec from disk; an event that started it only names the file.

What was applied is kept per spec file by cortex.applied (spec sha256, model name, source
revision, replica): that is how a scheduled run knows whether the commit moved and how a
deleted spec's model is found.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey
from prefect.context import FlowRunContext

from cortex.applied import FLEET, AppliedSpec, all_applied, forget_applied, read_applied, spec_sha256, write_applied
from cortex.fleet.hosts import ControlKind, control_path, deployment_name
from cortex.runtime.rollout import BenchmarkSummary
from cortex.runtime import RuntimeKind
from cortex.spec import ModelSpec
from cortex.specfile import SpecError, load_spec, spec_files
from flows.fleet import DEPLOY_TIMEOUT_S, POOL, FleetHost, fleet_apply, read_fleet
from tasks.common import TASK_OPTIONS, artifact_key


# --- tasks -------------------------------------------------------------------------------------


@task(name="validate-spec", **TASK_OPTIONS)
def validate_spec(spec_path: str) -> ModelSpec:
    """The spec, or a failed task whose message and markdown artifact list every problem."""
    try:
        return load_spec(spec_path)
    except SpecError as error:
        create_markdown_artifact(
            key="spec-problems",
            markdown="## The spec is invalid; nothing was changed\n\n"
            + "\n".join(f"- `{p}`" for p in error.problems)
            + "\n\nFix the file; saving it starts a new run.",
            description=f"{len(error.problems)} problem(s) in {spec_path}",
        )
        raise


def _tag_run(*tags: str) -> None:
    """Add tags (model name, engine) to the running flow run, so the UI can filter by them."""
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx else None
    if run is None:  # not inside a flow run: nothing to tag
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run.id).tags
        client.update_flow_run(run.id, tags=sorted(set(current) | set(tags)))


def _running_replica(name: str, runtime: str, replica_name: str | None = None):
    from cortex.runtime import get_runtime
    from cortex.runtime.base import probe_health

    for replica in get_runtime(runtime).replicas_of(name):
        if (replica_name is None or replica.name == replica_name) and probe_health(replica) == "ok":
            return replica
    return None


@dataclass(frozen=True)
class ControlPath:
    """Where this run acts (cortex.fleet.hosts.control_path decides), and the hosts it read."""

    kind: ControlKind
    reason: str
    pool: str
    hosts: list[FleetHost]

    @property
    def fleet_models(self) -> dict[str, list[str]]:
        """model -> the online hosts whose record lists a replica of it."""
        models: dict[str, list[str]] = {}
        for h in self.hosts:
            if h.status == "online":
                for r in h.record.replicas:
                    models.setdefault(r.model, []).append(h.record.name)
        return models


def fleet_or_local(pool: str = POOL) -> ControlPath:
    """The one place the control plane decides between the fleet and this machine: logged, and
    published as the run's `control-path` artifact."""
    hosts = read_fleet(pool)
    kind, reason = control_path({h.record.name: h.status for h in hosts}, pool)
    get_run_logger().info("acting on the %s: %s", "fleet" if kind == "fleet" else "local machine", reason)
    create_markdown_artifact(
        key="control-path",
        markdown=f"## Acting on the {'fleet' if kind == 'fleet' else 'local machine'}\n\n{reason}",
        description=f"{kind}: {reason}"[:300],
    )
    return ControlPath(kind, reason, pool, hosts)


# --- flows -------------------------------------------------------------------------------------


@flow(name="apply-spec")
def apply_spec(
    spec_path: str,
    scheduled: bool = False,
    runtime: RuntimeKind | None = None,
    gateway: bool | None = None,
    restart: str | None = None,
    pool: str = POOL,
) -> dict[str, Any]:
    """Deploy the model the spec file at `spec_path` describes (see the module docstring).

    scheduled: a scheduled run; redeploy only if the source's commit changed, else benchmark
    the running replica again. runtime: process | docker (default: the spec's). gateway: True
    requires the gateway, False skips it, unset uses it when one answers. restart: set by
    `cortex serve` when the model's engine died (why, and which attempt); said in the run's log
    and a `replica-restart` artifact. pool: the fleet's Prefect work pool; with a host joined
    to it the spec is applied on the fleet (fleet-apply), else here."""
    from tasks.benchmark import benchmark_replica
    from tasks.prepare import resolve_source

    logger = get_run_logger()
    path = str(Path(spec_path).expanduser().absolute())
    if restart:
        logger.warning("replacing a crashed replica: %s", restart)
        _tag_run("restart")
        create_markdown_artifact(
            key="replica-restart",
            markdown=f"## Replacing a crashed replica\n\n{restart}\n\nspec `{path}`; this run deploys it again.",
            description=restart[:200],
        )
    spec = validate_spec(path)
    digest = spec_sha256(path)
    where = fleet_or_local(pool)
    if where.kind == "fleet":
        return _apply_on_fleet(spec, path, digest, where, gateway, scheduled)
    kind = runtime or spec.runtime
    _tag_run(f"model:{spec.name}", f"runtime:{kind}", "scheduled" if scheduled else "applied")
    resolved = resolve_source(spec)
    previous = read_applied(path)

    if scheduled and previous is not None and previous.source_revision == resolved.source_id:
        replica = _running_replica(spec.name, previous.runtime, previous.replica)
        if replica is not None:
            logger.info(
                "%s still runs %s at source %s: benchmarking it again", spec.name, replica.name, resolved.source_id[:12]
            )
            _tag_run(f"engine:{replica.engine}")
            measured = benchmark_replica(replica, spec)
            outcome = {
                "action": "benchmarked",
                "name": spec.name,
                "replica": replica.name,
                "endpoint": replica.endpoint,
                "source_revision": resolved.source_id,
                "benchmark": BenchmarkSummary.of(measured).model_dump(),
            }
            _publish_outcome(path, digest, outcome)
            return outcome
        logger.info("%s is not running any more: deploying it again", spec.name)
    elif scheduled and previous is not None:
        logger.info(
            "%s: source moved from %s to %s: preparing and redeploying",
            spec.name,
            previous.source_revision[:12],
            resolved.source_id[:12],
        )

    result = deploy_spec(spec, path, kind, gateway)
    _tag_run(f"engine:{result['engine']}")
    for change in result.get("changes", []):
        logger.info("%s: %s", spec.name, change)
    replica = _running_replica(spec.name, kind, result["replica"])
    bench = result.get("benchmark")
    if bench is None and replica is not None:  # the deploy flow did not benchmark: do it here
        bench = BenchmarkSummary.of(benchmark_replica(replica, spec)).model_dump()
    write_applied(
        AppliedSpec(
            spec_path=path,
            spec_sha256=digest,
            name=spec.name,
            runtime=kind,
            source_revision=resolved.source_id,
            replica=result["replica"],
            endpoint=result["endpoint"],
            applied_at=datetime.now(timezone.utc).isoformat(),
        )
    )
    outcome = {
        "action": "deployed",
        "name": spec.name,
        "replica": result["replica"],
        "endpoint": result["endpoint"],
        "engine": result["engine"],
        "source_revision": resolved.source_id,
        "reused": result.get("reused", False),
        "stopped": result.get("stopped", []),
        "gateway": result.get("gateway"),
        "changes": result.get("changes", []),
        "benchmark": bench,
        "control_path": where.reason,
    }
    _publish_outcome(path, digest, outcome, smoke=result.get("smoke"))
    return outcome


def _apply_on_fleet(
    spec: ModelSpec, path: str, digest: str, where: ControlPath, gateway: bool | None, scheduled: bool
) -> dict[str, Any]:
    """Run fleet-apply as a subflow. A scheduled run does the same: each host's deploy reuses a
    replica whose spec, source commit and plan are unchanged and redeploys one whose commit moved.

    A spec last applied on this machine (before any host joined) is taken over: once the fleet's
    replicas are healthy and routed in the gateway, the local replica is drained and stopped
    (hand_over_local). Until then it keeps serving, and if fleet-apply fails it keeps serving."""
    _tag_run(f"model:{spec.name}", "fleet", "scheduled" if scheduled else "applied")
    previous = read_applied(path)
    local = previous if previous is not None and not previous.on_fleet else None
    result = fleet_apply(path, pool=where.pool, gateway=gateway)
    hosts = sorted(result["deployed"])
    serving = sorted(h for h, version in result["versions"].items() if version.startswith("spec "))
    handed_over = hand_over_local(local, serving, gateway) if local is not None else None
    write_applied(
        AppliedSpec(
            spec_path=path,
            spec_sha256=digest,
            name=spec.name,
            runtime=FLEET,
            source_revision="",
            replica=",".join(hosts),
            endpoint="",
            applied_at=datetime.now(timezone.utc).isoformat(),
        )
    )
    outcome = {
        "action": "deployed on the fleet",
        "name": spec.name,
        "hosts": hosts,
        "deploy_runs": result["deployed"],
        "control_path": where.reason,
    }
    if handed_over is not None:
        outcome["local_replica"] = handed_over
    _publish_outcome(path, digest, outcome)
    return outcome


def _slot_suffix(slot: str) -> str:
    from cortex.fleet.hosts import Slot
    from cortex.runtime.rollout import replica_suffix

    parsed = Slot.parse(slot)
    return replica_suffix(parsed.host, parsed.instance)


def hand_over_local(local: AppliedSpec, hosts: list[str], gateway: bool | None) -> str:
    """Drain and stop the replica the single-machine path deployed here (`local`), now that
    fleet-apply deployed the model on `hosts` (slots: `h1`, `h1_1` for a host's second instance); returns what was done, which the run's log and
    outcome say. Only that replica, by its name: the fleet's replicas are named
    `<replica>-<host>` (CORTEX_HOST_NAME), so a fleet replica on this same machine (it joined
    with `cortex host join`) is never the local one, even in the same runtime.

    With a gateway, it waits (a hang guard, not a measure) until each host's replica is routed
    and healthy there; if that does not happen, it fails and the local replica keeps serving (the
    spec stays applied here, so the next apply tries again). Without one (none answers, or
    gateway=False) nothing routes either way: the hosts' deploys passed their readiness and smoke
    checks, and that is the evidence."""
    from cortex.gateway.client import gateway_client
    from cortex.runtime import ReplicaNotFound, get_runtime
    from cortex.settings import Settings
    from tasks.deploy import retire_replica

    logger = get_run_logger()
    gw = gateway_client(gateway)
    if gw is not None:
        wait_s = max(120.0, 40 * Settings.load().gateway_health_interval)
        deadline = time.monotonic() + wait_s
        with gw:
            while True:
                routes = [r for r in gw.replicas_of(local.name) if r["id"] != local.replica]
                # a fleet replica's id ends in its slot: -<host>, or -<host>_<i> for instance i > 0
                healthy = [r["id"] for r in routes if r["healthy"] is True and r["state"] == "active"]
                serving = {h for h in hosts if any(rid.endswith(_slot_suffix(h)) for rid in healthy)}
                if serving >= set(hosts):
                    break
                if time.monotonic() > deadline:
                    missing = ", ".join(sorted(set(hosts) - serving))
                    raise RuntimeError(
                        f"{local.name}: deployed on the fleet, but the gateway does not route to a healthy replica "
                        f"on {missing} after {wait_s:.0f} s; the local replica {local.replica} keeps serving and the "
                        "next apply of the spec hands over again (see `cortex hosts`, `cortex status`)"
                    )
                time.sleep(1.0)
        evidence = f"the gateway routes to healthy replicas on {', '.join(hosts)}"
    else:
        evidence = f"no gateway is used; the deploys on {', '.join(hosts)} passed their readiness and smoke checks"
    runtime = get_runtime(local.runtime)
    try:
        replica = runtime.get(local.replica)
    except ReplicaNotFound:
        # e.g. a host on this machine sharing its CORTEX_HOME replaced it with its own deploy
        said = f"the local replica {local.replica} was already gone; {evidence}"
        logger.info("%s: taken over by the fleet: %s", local.name, said)
        return said
    retire_replica(replica, runtime, drain_gateway=gw is not None)
    said = f"drained and stopped the local replica {local.replica} ({local.runtime}): {evidence}"
    logger.info("%s: taken over by the fleet: %s", local.name, said)
    create_markdown_artifact(
        key="fleet-takeover",
        markdown=f"## {local.name}: the fleet took over\n\n{said}.",
        description=said[:300],
    )
    return said


def deploy_spec(spec: ModelSpec, spec_path: str, runtime: RuntimeKind, gateway: bool | None) -> dict[str, Any]:
    """Run flows.deploy.deploy_model as a subflow, and copy its subflows' prepare report (source,
    files, facts, decision trace, plan) and benchmark table and summary (with the chart) onto
    this run: its page is the one an operator opens, and the UI lists only a run's own artifacts."""
    from flows.deploy import deploy_model

    result = deploy_model(spec_path, runtime=runtime, gateway=gateway).to_json()
    copies = {  # subflow artifact key -> (key on this run, kind)
        artifact_key("prepare", spec.name, "report"): (f"plan-{spec.name}", "markdown"),
        artifact_key("benchmark", spec.name): (f"bench-{spec.name}", "table"),
        artifact_key("benchmark", spec.name, "summary"): (f"bench-{spec.name}-summary", "markdown"),
    }
    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=list(copies)))
        )
    for artifact in latest:
        key, kind = copies[artifact.key]
        description = f"{spec.name}: {artifact.description or key} (from the {kind} of a subflow)"
        if kind == "table":
            data: Any = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            create_table_artifact(key=artifact_key(key), table=data, description=description)
        else:
            create_markdown_artifact(key=artifact_key(key), markdown=str(artifact.data), description=description)
    return result


def _publish_outcome(spec_path: str, digest: str, outcome: dict[str, Any], smoke: dict[str, Any] | None = None) -> None:
    rows = [f"| {k} | `{v}` |" for k, v in outcome.items() if k not in ("benchmark", "changes")]
    checks = ""
    if "changes" in outcome:
        checks += "\n\n### What changed since the previous deploy\n\n" + (
            "\n".join(f"- {c}" for c in outcome["changes"]) or "- nothing that decides the deployment"
        )
    if smoke:
        checks += (
            "\n\n### Smoke tests: "
            + ("passed" if smoke.get("passed") else "FAILED")
            + "\n\n| check | passed | detail |\n|---|---|---|\n"
        )
        checks += "\n".join(
            f"| {c.get('name')} | {'yes' if c.get('passed') else 'no'} | {str(c.get('detail', '')).replace('|', '/')} |"
            for c in smoke.get("checks", [])
        )
    create_markdown_artifact(
        key="applied-spec",
        markdown=f"## {outcome['action']}: {outcome['name']}\n\nspec `{spec_path}` (sha256 `{digest[:16]}`)\n\n"
        "| | |\n|---|---|\n" + "\n".join(rows) + checks,
        description=f"{outcome['action']} {outcome['name']}"
        + (f": {'; '.join(outcome['changes'])}"[:300] if outcome.get("changes") else ""),
    )


@flow(name="retire-spec")
def retire_spec(spec_path: str, pool: str = POOL) -> list[str]:
    """The spec file at `spec_path` was deleted: retire the model Cortex deployed from it (where
    it was applied: here, or on each host of `pool` that runs it)."""
    from flows.deploy import retire_model

    logger = get_run_logger()
    path = str(Path(spec_path).expanduser().absolute())
    if Path(path).exists():
        logger.info("%s exists again; nothing to retire", path)
        return []
    record = read_applied(path)
    if record is None:
        logger.info("no model was deployed from %s by Cortex; nothing to retire", path)
        return []
    _tag_run(f"model:{record.name}")
    if record.on_fleet:  # applied on the fleet: retired on the hosts that run it
        stopped = _retire_on_fleet(record.name, fleet_or_local(pool))
    else:  # applied here (before any host joined, too): retired here
        try:
            stopped = retire_model(record.name, runtime=record.runtime)
        except LookupError:
            logger.info("%s was no longer running", record.name)
            stopped = []
    forget_applied(path)
    create_markdown_artifact(
        key="retired-spec",
        markdown=f"## retired {record.name}\n\nits spec `{path}` was deleted\n\n"
        + "\n".join(f"- stopped `{r}`" for r in stopped),
        description=f"retired {record.name}",
    )
    return stopped


def _retire_on_fleet(model: str, where: ControlPath) -> list[str]:
    """Run retire-model on each online host that runs `model`, one after the other; fails naming
    the hosts where it failed and the offline hosts that still list the model."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    stopped: list[str] = []
    failed: list[str] = []
    for host in where.hosts:
        if not any(r.model == model for r in host.record.replicas):
            continue
        name = host.record.name
        if host.status != "online":
            failed.append(f"{name}: {host.status}, its replicas of {model} could not be retired")
            continue
        run = run_deployment(  # waits for the run to end (the drain and stop take seconds)
            deployment_name("retire-model", name),
            parameters={"name": model},
            timeout=DEPLOY_TIMEOUT_S,
            tags=[f"model:{model}", f"host:{name}"],
        )
        state = run.state  # type: ignore[union-attr]  # the sync form returns the FlowRun
        if state is not None and state.is_completed():
            logger.info("%s: retired on %s (flow run %s)", model, name, run.name)  # type: ignore[union-attr]
            stopped.append(f"{model} on {name}")
        else:
            failed.append(f"{name}: {state.name if state else 'no state'}: {state.message if state else ''}")
    if failed:
        raise RuntimeError(f"retiring {model} on the fleet failed: " + "; ".join(failed))
    return stopped


@flow(name="reconcile-specs")
def reconcile_specs(specs_dir: str, apply: bool = True, runtime: str | None = None, pool: str = POOL) -> dict[str, Any]:
    """Bring what runs in line with the spec files in `specs_dir`, and report both.

    apply: False only reports. A spec is applied when its file changed since it was last
    applied, it was never applied, or its model is not running; a model deployed from a spec
    file of this folder that is gone is retired. Models started by hand (`cortex deploy`) are
    reported, never touched. With a host joined to `pool`, "running" is what the online hosts'
    records list, and specs are applied and retired on the fleet."""
    from flows.deploy import available_runtimes

    logger = get_run_logger()
    folder = Path(specs_dir).expanduser().absolute()
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of spec files")
    where = fleet_or_local(pool)
    on_fleet = where.kind == "fleet"
    fleet_models = where.fleet_models
    rows: list[dict[str, Any]] = []
    declared: set[str] = set()
    for file in spec_files([folder]):
        path = str(file.absolute())
        try:
            spec = load_spec(path)
        except SpecError as error:
            rows.append(
                {
                    "spec": file.name,
                    "model": "",
                    "state": "invalid",
                    "action": "none",
                    "detail": str(error.problems[0])
                    + (f" (+{len(error.problems) - 1})" if len(error.problems) > 1 else ""),
                }
            )
            continue
        declared.add(spec.name)
        record = read_applied(path)
        if on_fleet:
            running = record is not None and record.on_fleet and spec.name in fleet_models
        else:
            running = (
                record is not None
                and not record.on_fleet
                and _running_replica(record.name, record.runtime, record.replica) is not None
            )
        changed = record is None or record.spec_changed(path) or record.name != spec.name
        state = "up to date" if running and not changed else ("changed" if running else "not running")
        action, detail = "none", ""
        if state != "up to date" and apply:
            run = apply_spec(path, runtime=runtime, pool=pool, return_state=True)
            action = "applied" if run.is_completed() else "failed"
            detail = "" if run.is_completed() else str(run.message or run.name)
        rows.append({"spec": file.name, "model": spec.name, "state": state, "action": action, "detail": detail})
    for record in all_applied():
        if Path(record.spec_path).parent == folder and not Path(record.spec_path).exists():
            action = "retired" if apply else "none"
            if apply:
                retire_spec(record.spec_path, pool=pool)
            rows.append(
                {
                    "spec": Path(record.spec_path).name,
                    "model": record.name,
                    "state": "spec deleted",
                    "action": action,
                    "detail": "",
                }
            )

    def running_row(r: Any, **extra: str) -> dict[str, Any]:
        return {
            "model": r.model,
            "replica": r.name,
            "engine": r.engine,
            "runtime": r.runtime,
            "endpoint": r.endpoint,
            "declared": r.model in declared,
            **extra,
        }

    if on_fleet:
        running_rows = [
            running_row(r, host=f"{h.record.name} ({h.status})") for h in where.hosts for r in h.record.replicas
        ]
    else:
        running_rows = [running_row(r) for rt in available_runtimes(runtime) for r in rt.list()]
    create_table_artifact(key="declared-specs", table=rows, description=f"spec files in {folder}")
    create_table_artifact(
        key="running-models",
        table=running_rows,
        description="what runs now"
        + (" on the fleet's hosts (their last records)" if on_fleet else "")
        + ", and whether a spec declares it",
    )
    undeclared = [str(r["model"]) for r in running_rows if not r["declared"]]
    if undeclared:
        logger.info("running but declared by no spec in %s: %s", folder, ", ".join(sorted(set(undeclared))))
    failed = [r for r in rows if r["action"] == "failed"]
    if failed:
        raise RuntimeError("could not apply " + ", ".join(f"{r['spec']} ({r['detail']})" for r in failed))
    return {"specs": rows, "running": running_rows, "control_path": where.reason}
