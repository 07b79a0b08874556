"""Cortex's deployments, their schedules and spec-file triggers, served by one process.

    deployment      flow               started by
    deploy          apply-spec         the UI form, a spec's `schedule` (one cron schedule per
                                       spec, parameters {spec_path, scheduled: true}), and a
                                       `cortex.spec.changed` event (spec_path = the event's
                                       resource id, the spec file's absolute path)
    prepare         prepare-model      the UI form
    retire          retire-model       the UI form (a model name)
    retire-deleted  retire-spec        a `cortex.spec.deleted` event

These run in this process's runner. The control plane's deployments on the fleet pool's queue
`control` (fleet-apply, reconcile, fleet-reconcile with its schedule and queue-status trigger:
flows/control.py) are registered too, and run by the control worker this process starts and
watches (flows.control.ControlWorker), unless another control plane's worker polls that queue.

`serve_specs(folder)` registers them all, makes the deploy deployment's schedules match the specs,
starts the folder watcher (cortex/watch.py) that emits the events and the restart watch
(cortex/restarts.py: a spec's model whose engine died is deployed again by an apply-spec run
whose `restart` parameter says why, with backoff), and runs the deployments until stopped. Schedules are kept in step on every settled change of the folder: a spec that
gains a `schedule` gets one, a spec that drops it (or is deleted) loses it, and an invalid
spec keeps what it had, so a typo never removes a schedule.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron

from cortex.restarts import RestartBackoff, dead_specs
from cortex.settings import Settings
from cortex.specfile import SpecError, load_spec, spec_files
from cortex.watch import SpecChange, SpecWatcher
from flows.control import ControlWorker, register_control
from flows.deploy import retire_model
from flows.prepare import prepare_model
from flows.reconcile import apply_spec, retire_spec

log = logging.getLogger(__name__)

SPEC_CHANGED = "cortex.spec.changed"
SPEC_DELETED = "cortex.spec.deleted"
DEPLOY = "apply-spec/deploy"  # the deployment a spec's schedule belongs to
SCHEDULE_SLUG_PREFIX = "spec:"


def schedule_slug(spec_path: Path) -> str:
    return f"{SCHEDULE_SLUG_PREFIX}{spec_path}"


def spec_schedules(folder: Path) -> tuple[dict[str, Any], set[str]]:
    """({slug: Schedule} for every valid spec with a `schedule`, {slugs of invalid specs})."""
    wanted: dict[str, Any] = {}
    invalid: set[str] = set()
    for file in spec_files([folder]):
        path = file.absolute()
        try:
            spec = load_spec(path)
        except SpecError:
            invalid.add(schedule_slug(path))
            continue
        if spec.schedule is not None:
            wanted[schedule_slug(path)] = Cron(
                spec.schedule.cron,
                timezone=spec.schedule.timezone,
                slug=schedule_slug(path),
                parameters={"spec_path": str(path), "scheduled": True},
            )
    return wanted, invalid


def sync_schedules(folder: str | Path, deployment: str = DEPLOY) -> dict[str, list[str]]:
    """Make the deploy deployment's spec schedules match the spec files; returns what changed."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    wanted, invalid = spec_schedules(Path(folder).absolute())
    done: dict[str, list[str]] = {"created": [], "updated": [], "deleted": []}
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        current = {s.slug: s for s in client.read_deployment_schedules(dep.id) if s.slug}
        for slug, old in current.items():
            if not slug.startswith(SCHEDULE_SLUG_PREFIX) or slug in wanted or slug in invalid:
                continue
            client.delete_deployment_schedule(dep.id, old.id)
            done["deleted"].append(slug)
        for slug, want in wanted.items():
            cron = CronSchedule(cron=want.cron, timezone=want.timezone, day_or=want.day_or)
            existing = current.get(slug)
            if existing is None:
                client.create_deployment_schedules(
                    dep.id,
                    [DeploymentScheduleCreate(schedule=cron, active=True, parameters=want.parameters, slug=slug)],
                )
                done["created"].append(slug)
            elif existing.schedule != cron or existing.parameters != want.parameters or not existing.active:
                client.update_deployment_schedule(
                    dep.id, existing.id, schedule=cron, active=True, parameters=want.parameters
                )
                done["updated"].append(slug)
    for what, slugs in done.items():
        for slug in slugs:
            log.info("schedule %s: %s", what, slug)
    return done


def emit_spec_event(change: SpecChange) -> None:
    """`cortex.spec.changed` / `cortex.spec.deleted`: resource id = the spec's absolute path."""
    resource = {"prefect.resource.id": str(change.path), "prefect.resource.name": change.path.name}
    if change.name:
        resource["cortex.model.name"] = change.name
    emit_event(
        event=SPEC_CHANGED if change.kind == "changed" else SPEC_DELETED,
        resource=resource,
        payload={"path": str(change.path), "sha256": change.sha256},
    )
    log.info("%s %s (sha256 %s)", change.kind, change.path, (change.sha256 or "-")[:16])


def cortex_deployments(folder: str | Path) -> list[Any]:
    """The RunnerDeployments `cortex serve` runs in its own runner, with triggers on spec files
    under `folder` (the control queue's are flows.control.control_deployments)."""
    folder = Path(folder).absolute()
    in_folder = {"prefect.resource.id": f"{folder}/*"}
    tags = ["cortex"]
    return [
        apply_spec.to_deployment(
            name="deploy",
            tags=tags,
            description="Deploy the model a spec file describes. Started from this form, by a spec's "
            "schedule (scheduled=true: redeploy if the source commit changed, else re-benchmark) and "
            f"when a spec file in {folder} is saved.",
            triggers=[
                DeploymentEventTrigger(
                    name="deploy on spec change",
                    expect={SPEC_CHANGED},
                    match=in_folder,
                    parameters={"spec_path": "{{ event.resource.id }}"},
                )
            ],
        ),
        prepare_model.to_deployment(
            name="prepare",
            tags=tags,
            description="Only prepare the weights a spec needs (download, convert, quantize; cached).",
        ),
        retire_model.to_deployment(
            name="retire",
            tags=tags,
            description="Drain a model from the gateway and stop every replica.",
        ),
        retire_spec.to_deployment(
            name="retire-deleted",
            tags=tags,
            description=f"Retire the model of a spec file deleted from {folder}.",
            triggers=[
                DeploymentEventTrigger(
                    name="retire on spec delete",
                    expect={SPEC_DELETED},
                    match=in_folder,
                    parameters={"spec_path": "{{ event.resource.id }}"},
                )
            ],
        ),
    ]


def watch_replicas(folder: Path, stop: threading.Event, settings: Settings | None = None) -> None:
    """Until `stop`: every `restart_check_s`, start an apply-spec run (parameter `restart`: why)
    for each applied spec of `folder` whose model runs no more, paced by cortex.restarts."""
    from prefect.deployments import run_deployment

    settings = settings or Settings.load()
    backoff = RestartBackoff(settings.restart_backoff_s, settings.restart_backoff_max_s)
    runs: dict[str, Any] = {}  # spec path -> id of its last restart run
    while not stop.wait(settings.restart_check_s):
        try:
            with get_client(sync_client=True) as client:
                states = {path: client.read_flow_run(run_id).state for path, run_id in runs.items()}
            busy = {path for path, state in states.items() if state is None or not state.is_final()}
            for restart in backoff.due(dead_specs(folder), busy):
                log.warning("%s: %s; starting a deploy run", restart.spec_path, restart.describe())
                run = run_deployment(
                    DEPLOY,
                    parameters={"spec_path": restart.spec_path, "restart": restart.describe()},
                    timeout=0,
                    as_subflow=False,
                )
                runs[restart.spec_path] = run.id  # type: ignore[union-attr]  # sync here; typed as maybe async
        except Exception:  # noqa: BLE001 - logged with its traceback; the next check must still run
            log.exception("checking for replicas whose engine died failed")


def serve_specs(
    folder: str | Path,
    *,
    limit: int | None = None,
    stop: threading.Event | None = None,
    control_log: Path | None = None,
) -> None:
    """Register the deployments, sync schedules, start and watch the control worker (its output
    in `control_log`, default $CORTEX_HOME/control-worker.log), watch `folder`, and run until
    interrupted; the control worker stops with it."""
    folder = Path(folder).absolute()
    deployments = cortex_deployments(folder)
    for deployment in deployments:
        deployment.apply()  # now, so that the schedules below have a deployment to attach to
    for name in register_control(folder):
        log.info("registered %s on the control queue", name)
    sync_schedules(folder)

    # The watcher thread sees this thread's Prefect settings (API URL) only through a copy of
    # its context: threads do not inherit context variables.
    context = contextvars.copy_context()

    def report(change: SpecChange) -> None:
        emit_spec_event(change)
        sync_schedules(folder)

    def on_change(change: SpecChange) -> None:
        context.run(report, change)

    stop = stop or threading.Event()
    SpecWatcher(folder, on_change).start(stop)
    # its own copy: one context cannot be entered by two threads at once
    threading.Thread(
        target=contextvars.copy_context().run, args=(watch_replicas, folder, stop), name="replica-restarts", daemon=True
    ).start()
    worker = ControlWorker(control_log or Path(Settings.load().home) / "control-worker.log")
    supervisor = threading.Thread(
        target=contextvars.copy_context().run, args=(worker.run, stop), name="control-worker", daemon=True
    )
    supervisor.start()
    try:
        serve(*deployments, limit=limit, pause_on_shutdown=False, print_starting_message=False)
    finally:
        stop.set()
        supervisor.join(timeout=60)  # it stops the worker it started
