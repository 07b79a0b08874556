"""The control plane's own queue: the deployments on the queue `control` of the fleet's work
pool, and the Prefect worker that runs them, which `cortex serve` starts, watches and stops.

    deployment                    flow              started by
    fleet-apply/fleet-apply       fleet-apply       `cortex deploy --fleet` users, the UI form
    reconcile-specs/reconcile     reconcile-specs   the UI form (defaults to the watched folder)
    fleet-reconcile/...           fleet-reconcile   every CORTEX_FLEET_RECONCILE_S seconds, and the
                                                    events `prefect.work-queue.not-ready` / `.ready`
                                                    of a queue of the pool (a host's worker stopped
                                                    polling, or polls again)

They are the same deployments as prefect.yaml's (names, queue, module entrypoints, schedule,
trigger): an operator without `cortex serve` gets them with `prefect deploy --all` and one
`prefect worker start --pool cortex --work-queue control`; `cortex serve` makes them from code
and runs that worker itself (ControlWorker).

Why a worker process on the queue rather than serving these flows in `cortex serve`'s own
runner: the deployments then live on the pool like the hosts' do, so any control-plane machine's
worker can run them (prefect.yaml's and cortex serve's are one set, not two of the same name
fighting over one deployment); Prefect reports the control plane's liveness the way it reports a
host's (the queue's last poll and status), which is how a second `cortex serve` knows not to
start a second worker; and a flow run that takes its process down takes down a run, not the
folder watcher. The spec-folder deployments (apply-spec, prepare, retire, retire-deleted) stay
in `cortex serve`'s runner: they act on the files of the folder it watches.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.flows import EntrypointType

from cortex.restarts import RestartBackoff
from cortex.settings import Settings
from flows.fleet import POOL, ensure_pool, fleet_apply, fleet_reconcile
from flows.reconcile import reconcile_specs

log = logging.getLogger(__name__)

CONTROL_QUEUE = "control"
# Prefect's server emits these when a work queue's status changes (its foreman marks a queue
# not-ready when no worker polled it for work_queue_last_polled_timeout_seconds).
QUEUE_EVENTS = {"prefect.work-queue.not-ready", "prefect.work-queue.ready"}


def control_deployments(folder: str | Path, pool: str = POOL, queue: str = CONTROL_QUEUE) -> list[Any]:
    """The RunnerDeployments of the control queue (module entrypoints: the worker imports the
    flows from the installed package, nothing is pulled)."""
    on_queue: dict[str, Any] = {
        "work_pool_name": pool,
        "work_queue_name": queue,
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }
    return [
        fleet_apply.to_deployment(
            name="fleet-apply",
            tags=["cortex", "fleet"],
            description="Place a spec's replicas on the joined hosts (placement trace as an artifact) and "
            "deploy each on its host.",
            **on_queue,
        ),
        reconcile_specs.to_deployment(
            name="reconcile",
            tags=["cortex"],
            parameters={"specs_dir": str(Path(folder).absolute())},
            description="Apply what changed in a folder of specs; report what runs against what they declare.",
            **on_queue,
        ),
        fleet_reconcile.to_deployment(
            name="fleet-reconcile",
            tags=["cortex", "fleet"],
            interval=Settings.load().fleet_reconcile_s,
            concurrency_limit=1,  # two at once would both re-place the same lost replica
            parameters={"pool": pool},
            description="Re-place the replicas of lost hosts, retire stale ones of hosts that came back, "
            "say what could not be placed. On a schedule and when a host's work queue changes status.",
            triggers=[
                DeploymentEventTrigger(
                    name="reconcile when a host's queue changes status",
                    expect=QUEUE_EVENTS,
                    match={"prefect.resource.id": "prefect.work-queue.*"},
                    match_related={"prefect.resource.role": "work-pool", "prefect.resource.name": pool},
                    parameters={"pool": pool},
                )
            ],
            **on_queue,
        ),
    ]


def register_control(folder: str | Path, pool: str = POOL, queue: str = CONTROL_QUEUE) -> list[str]:
    """Make the pool (type process), its `control` queue and the control deployments
    (idempotent); returns the deployments' names."""
    with get_client(sync_client=True) as client:
        ensure_pool(client, pool)
        try:
            client.read_work_queue_by_name(queue, work_pool_name=pool)
        except ObjectNotFound:
            try:
                client.create_work_queue(queue, description="Cortex's control plane", work_pool_name=pool)
            except ObjectAlreadyExists:  # made at the same moment by another control plane
                client.read_work_queue_by_name(queue, work_pool_name=pool)
    names = []
    for deployment in control_deployments(folder, pool, queue):
        deployment.apply()
        names.append(f"{deployment.flow_name}/{deployment.name}")
    return names


def query_seconds() -> float:
    """How often a Prefect worker polls its queue (PREFECT_WORKER_QUERY_SECONDS, 10 by default)."""
    from prefect.settings import PREFECT_WORKER_QUERY_SECONDS

    return float(PREFECT_WORKER_QUERY_SECONDS.value())


def queue_poller(pool: str = POOL, queue: str = CONTROL_QUEUE, watch_s: float | None = None) -> str | None:
    """Whether a worker polls the queue now, from Prefect's own record of the queue: None when
    nobody does, else what shows it. A queue Prefect calls not ready has not been polled within
    the foreman's timeout: nobody. A ready one may only be stale (a worker stopped less than that
    timeout ago), so its last poll is watched for `watch_s` (two poll intervals and a margin by
    default): it moves only while a worker polls."""
    from prefect.client.schemas.objects import WorkQueueStatus

    def read() -> tuple[Any, datetime | None]:
        with get_client(sync_client=True) as client:
            try:
                found = client.read_work_queue_by_name(queue, work_pool_name=pool)
            except ObjectNotFound:
                return None, None
        return found.status, found.last_polled

    status, first = read()
    if status != WorkQueueStatus.READY or first is None:
        return None
    deadline = time.monotonic() + (watch_s if watch_s is not None else 2 * query_seconds() + 5)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        status, last = read()
        if last is not None and last != first:
            return f"queue {pool}/{queue} polled at {first.isoformat()} and again at {last.isoformat()}"
    return None


# Runs the worker so that it gets SIGTERM when the thread that started it goes away (Linux's
# PR_SET_PDEATHSIG, kept across exec), so a `cortex serve` that is killed (SIGKILL, the OOM killer)
# before it could stop its worker leaves no worker behind; argv: parent pid, then the command.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(0)  # the parent died before prctl\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class ControlWorker:
    """The one worker of the control queue that `cortex serve` owns: `prefect worker start
    --pool POOL --work-queue control --type process` in its own session, its output in
    `log_path`. `run(stop)` keeps it so until `stop` is set, then stops it: started when no
    other worker polls the queue (queue_poller), started again after it exits (paced like the
    replica restarts: CORTEX_RESTART_BACKOFF_S, doubling), and left alone while another
    control plane's worker polls the queue."""

    def __init__(self, log_path: Path, pool: str = POOL, queue: str = CONTROL_QUEUE, check_s: float = 5.0) -> None:
        settings = Settings.load()
        self.log_path = log_path
        self.pool = pool
        self.queue = queue
        self.check_s = check_s
        self.name = f"{queue}-{socket.gethostname()}"
        self.backoff = RestartBackoff(settings.restart_backoff_s, settings.restart_backoff_max_s)
        self.process: subprocess.Popen | None = None
        self.started = 0  # how many times this process started its worker
        self.other: str | None = None  # what shows another worker polls the queue, while it does

    def _start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), sys.executable, "-m", "prefect", "worker"]
                + ["start", "--pool", self.pool, "--work-queue", self.queue, "--type", "process", "--name", self.name],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),  # PREFECT_API_URL included: `cortex serve` set it
                start_new_session=True,
            )
        self.started += 1
        log.info(
            "started the control worker %s (pid %d) on queue %s/%s; its log: %s",
            self.name,
            self.process.pid,
            self.pool,
            self.queue,
            self.log_path,
        )

    def check(self) -> None:
        """One supervision step (see the class docstring)."""
        if self.process is not None and self.process.poll() is None:
            self.backoff.due({}, set())  # running: a later exit starts the pacing over
            return
        why = "not started"
        if self.process is not None:
            why = f"the control worker exited with {self.process.returncode} (see {self.log_path})"
        other = queue_poller(self.pool, self.queue)
        if other is not None:
            if self.other is None:
                log.info("a worker already polls the control queue (%s): not starting one", other)
            self.other = other
            return
        if self.other is not None:
            log.warning("the other worker of queue %s/%s stopped polling it: starting this one", self.pool, self.queue)
            self.other = None
        for restart in self.backoff.due({"control worker": why}, set()):
            if self.process is not None:
                log.warning("%s; starting it again (attempt %d)", why, restart.attempt)
            self._start()

    def run(self, stop: threading.Event) -> None:
        try:
            while True:
                try:
                    self.check()
                except Exception:  # noqa: BLE001 - logged with its traceback; the next check must still run
                    log.exception("checking the control worker failed")
                if stop.wait(self.check_s):
                    break
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        log.info("stopped the control worker %s", self.name)
