"""`cortex serve` on a real Prefect server: spec-file triggers, schedules from specs, retire on
delete, and a real `prefect worker` running a deployment from prefect.yaml.

The server is `prefect server start` with its own PREFECT_HOME (SQLite) on a free port, once
per session; `cortex serve` runs as its own process, as an operator would start it. The model is
the SmolLM2 GGUF on the process runtime (llama-server), with a tiny benchmark.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# --- a real Prefect server -----------------------------------------------------------------------


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def ui_url(self) -> str:
        return self.api_url[: -len("/api")]

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api_url, **extra)
        return env

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_prefect_server(home: Path, timeout_s: float = 180) -> PrefectServer:
    """`prefect server start` on a free loopback port, PREFECT_HOME=home; waits for /api/health."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = home / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # --port alone leaves the UI calling the API at the default port 4200: name it for the UI too
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=url,
    )
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = PrefectServer(url, home, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process(proc)
    pytest.fail(f"prefect server did not answer /api/health in {timeout_s} s:\n{server.log()[-3000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_SESSION_SERVER: list[PrefectServer] = []  # one server per session, for every module that imports the fixture


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    owner = not _SESSION_SERVER
    if owner:
        _SESSION_SERVER.append(start_prefect_server(tmp_path_factory.mktemp("prefect-home")))
    server = _SESSION_SERVER[0]
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server
        if owner:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)  # this process's flow runs' last logs and events,
            EventsWorker.drain_all(timeout=10)  # before their server goes away
    if owner:
        _SESSION_SERVER.clear()
        stop_process(server.process)


# --- talking to it ---------------------------------------------------------------------------------


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def flow_runs(deployment: str) -> list[Any]:
    """Flow runs of a deployment ('flow-name/deployment-name'), newest first, without the
    future runs the scheduler creates ahead of a cron schedule."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with client() as c:
        dep = c.read_deployment_by_name(deployment)
        runs = c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=50,
        )
    return [r for r in runs if not r.auto_scheduled]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, log: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"{what}: nothing after {timeout:.0f} s\n{log()[-4000:]}")


def wait_for_new_run(deployment: str, known: set, timeout: float, log: Callable[[], str]) -> Any:
    """The first run of `deployment` not in `known`, once it has finished."""
    run = wait_for(
        lambda: next((r for r in flow_runs(deployment) if r.id not in known), None),
        90,
        f"no new run of {deployment}",
        log,
    )

    def finished():
        with client() as c:
            r = c.read_flow_run(run.id)
        return r if r.state and r.state.type.value in TERMINAL else None

    return wait_for(finished, timeout, f"run {run.name} of {deployment} did not finish", log)


def run_logs(run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client() as c:
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(entry.message for entry in logs)


def run_artifacts(run_id) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def spec_schedules(deployment: str = "apply-spec/deploy") -> list[Any]:
    with client() as c:
        dep = c.read_deployment_by_name(deployment)
        return [s for s in c.read_deployment_schedules(dep.id) if (s.slug or "").startswith("spec:")]


# --- a spec folder and `cortex serve` on it ----------------------------------------------------------


def smollm2_spec(gguf: Path, **extra: Any) -> dict[str, Any]:
    spec = {
        "name": "smollm2-served",
        "source": {"gguf": str(gguf)},
        "engine": "llamacpp",
        "runtime": "process",
        "resources": {"concurrency": 1, "context_length": 512},
        "tests": {"prompts": ["Say hello."], "max_tokens": 4},
        "benchmark": {"concurrency": [1], "requests": 2, "input_len": 16, "output_len": 8},
    }
    spec.update(extra)
    return spec


def write_spec(path: Path, spec: dict[str, Any] | str) -> None:
    """Write like an editor: a temporary file renamed over the spec."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    tmp.replace(path)


@dataclass
class Serve:
    specs: Path
    cortex_home: Path
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def cortex_serve(prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory, toolchain) -> Iterator[Serve]:
    root = tmp_path_factory.mktemp("serve")
    specs, home = root / "specs", root / "cortex-home"
    specs.mkdir()
    log_path = root / "serve.log"
    env = prefect_server.env(
        CORTEX_HOME=str(home),
        CORTEX_GATEWAY_URL="http://127.0.0.1:9",
        CORTEX_DEPLOY_LOCK_TIMEOUT_S="600",
        PYTHONUNBUFFERED="1",
        CORTEX_RESTART_CHECK_S="1",
        CORTEX_RESTART_BACKOFF_S="5",
    )
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--specs", str(specs), "--prefect-url", prefect_server.api_url],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    serve = Serve(specs, home, proc, log_path)

    def registered():
        if proc.poll() is not None:
            pytest.fail(f"cortex serve exited {proc.returncode}:\n{serve.log()[-4000:]}")
        from prefect.exceptions import ObjectNotFound

        try:
            with client() as c:
                return c.read_deployment_by_name("reconcile-specs/reconcile")
        except ObjectNotFound:
            return None

    wait_for(registered, 120, "cortex serve registered no deployments", serve.log)
    wait_for(lambda: "watching" in serve.log(), 30, "cortex serve did not start watching", serve.log)
    time.sleep(3)  # the runner and the file watch settle
    yield serve
    stop_process(proc)
    from cortex.runtime import get_runtime

    old = os.environ.get("CORTEX_HOME")
    os.environ["CORTEX_HOME"] = str(home)
    try:
        runtime = get_runtime("process")
        for replica in runtime.list():
            runtime.stop(replica)
    finally:
        if old is None:
            os.environ.pop("CORTEX_HOME")
        else:
            os.environ["CORTEX_HOME"] = old


def replicas(serve: Serve) -> list[Any]:
    from cortex.runtime.process import ProcessRuntime

    return ProcessRuntime(state_dir=serve.cortex_home / "runtime" / "process").list()


# --- the tests -----------------------------------------------------------------------------------------


def test_cortex_serve_registers_typed_deployments(cortex_serve: Serve) -> None:
    with client() as c:
        deploy = c.read_deployment_by_name("apply-spec/deploy")
        names = {f"{c.read_flow(d.flow_id).name}/{d.name}" for d in c.read_deployments()}
        automations = {a.name: a for a in c.read_automations()}
    assert {
        "apply-spec/deploy",
        "prepare-model/prepare",
        "retire-model/retire",
        "retire-spec/retire-deleted",
        "reconcile-specs/reconcile",
    } <= names
    props = deploy.parameter_openapi_schema["properties"]
    assert props["spec_path"]["type"] == "string" and props["scheduled"]["type"] == "boolean"
    assert deploy.parameter_openapi_schema["required"] == ["spec_path"]
    trigger = automations["deploy on spec change"].trigger
    assert trigger.expect == {"cortex.spec.changed"}
    assert trigger.match.root["prefect.resource.id"] == f"{cortex_serve.specs}/*"
    [action] = automations["deploy on spec change"].actions
    assert action.parameters == {"spec_path": "{{ event.resource.id }}"}


def test_spec_edits_deploy_schedules_follow_and_delete_retires(cortex_serve: Serve, test_model) -> None:
    spec_path = cortex_serve.specs / "smollm2.yaml"
    deploy = "apply-spec/deploy"
    known = {r.id for r in flow_runs(deploy)}

    # 1. A new spec with a schedule: a deploy run starts by itself and finishes serving; the
    #    schedule is on the deploy deployment with the spec as its parameter.
    write_spec(spec_path, smollm2_spec(test_model.gguf, schedule={"cron": "0 3 * * *", "timezone": "Europe/Berlin"}))
    run = wait_for_new_run(deploy, known, 600, cortex_serve.log)
    assert run.state.type.value == "COMPLETED", run_logs(run.id)[-4000:]
    assert run.parameters == {"spec_path": str(spec_path)}
    assert {"model:smollm2-served", "engine:llamacpp"} <= set(run.tags)
    [first] = replicas(cortex_serve)
    assert first.model == "smollm2-served"
    assert httpx.get(first.endpoint + "/health", timeout=5).status_code == 200
    keys = {a.key for a in run_artifacts(run.id)}
    assert {"applied-spec", "plan-smollm2-served", "bench-smollm2-served", "bench-smollm2-served-summary"} <= keys, keys
    [schedule] = spec_schedules()
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    assert schedule.parameters == {"spec_path": str(spec_path), "scheduled": True} and schedule.active
    known.add(run.id)

    # 2. What a scheduled run does when the source is the same: benchmark again, no redeploy.
    from prefect.deployments import run_deployment

    scheduled = run_deployment(deploy, parameters=schedule.parameters, timeout=600)
    assert scheduled.state.type.value == "COMPLETED", run_logs(scheduled.id)[-4000:]
    [applied] = [a for a in run_artifacts(scheduled.id) if a.key == "applied-spec"]
    assert applied.description == "benchmarked smollm2-served"
    assert [r.name for r in replicas(cortex_serve)] == [first.name]
    known.add(scheduled.id)

    # 3. A burst of saves that changes the launch and drops the schedule: one run, a new replica
    #    replaces the old one, and the schedule is gone.
    for batch in (512, 256, 128):
        write_spec(spec_path, smollm2_spec(test_model.gguf, llamacpp={"batch_size": batch}))
        time.sleep(0.1)
    run = wait_for_new_run(deploy, known, 600, cortex_serve.log)
    assert run.state.type.value == "COMPLETED", run_logs(run.id)[-4000:]
    wait_for(lambda: spec_schedules() == [], 30, "the schedule was not removed", cortex_serve.log)
    [second] = replicas(cortex_serve)
    assert second.name != first.name and "128" in " ".join(second.launch.command)
    time.sleep(5)
    assert len([r for r in flow_runs(deploy) if r.id not in known]) == 1, "the burst started more than one run"
    known.add(run.id)

    # 4. An invalid spec: a failed run that names the problem; the model keeps serving.
    write_spec(spec_path, yaml.safe_dump(smollm2_spec(test_model.gguf, resources={"concurency": 1})))
    run = wait_for_new_run(deploy, known, 300, cortex_serve.log)
    assert run.state.type.value == "FAILED"
    problem = "resources.concurency: unknown key 'concurency'; did you mean 'concurrency'?"
    assert problem in run.state.message
    wait_for(
        lambda: problem in run_logs(run.id), 30, "the run's log does not name the problem"
    )  # logs arrive after the state
    assert [r.name for r in replicas(cortex_serve)] == [second.name]
    assert httpx.get(second.endpoint + "/health", timeout=5).status_code == 200

    # 5. Delete the spec: its model is retired.
    retire = "retire-spec/retire-deleted"
    known_retire = {r.id for r in flow_runs(retire)}
    spec_path.unlink()
    run = wait_for_new_run(retire, known_retire, 300, cortex_serve.log)
    assert run.state.type.value == "COMPLETED", run_logs(run.id)[-4000:]
    assert run.parameters == {"spec_path": str(spec_path)}
    assert replicas(cortex_serve) == []


def test_a_replica_whose_engine_is_killed_is_replaced_by_a_run_that_says_so(cortex_serve: Serve, test_model) -> None:
    spec_path = cortex_serve.specs / "crashy.yaml"
    deploy = "apply-spec/deploy"
    known = {r.id for r in flow_runs(deploy)}
    write_spec(spec_path, smollm2_spec(test_model.gguf, name="smollm2-crashy"))
    run = wait_for_new_run(deploy, known, 600, cortex_serve.log)
    assert run.state.type.value == "COMPLETED", run_logs(run.id)[-4000:]
    known.add(run.id)
    [first] = [r for r in replicas(cortex_serve) if r.model == "smollm2-crashy"]

    os.kill(int(first.ref), signal.SIGKILL)
    restart = wait_for_new_run(deploy, known, 600, cortex_serve.log)
    assert restart.state.type.value == "COMPLETED", run_logs(restart.id)[-4000:]
    assert restart.parameters["spec_path"] == str(spec_path)
    assert restart.parameters["restart"].startswith(
        f"restart 1: smollm2-crashy is not running: the engine of {first.name}"
    )
    assert "restart" in restart.tags
    assert "replica-restart" in {a.key for a in run_artifacts(restart.id)}
    wait_for(lambda: "replacing a crashed replica" in run_logs(restart.id), 30, "the run's log does not say why")
    [second] = [r for r in replicas(cortex_serve) if r.model == "smollm2-crashy"]
    assert second.ref != first.ref
    assert httpx.get(second.endpoint + "/health", timeout=5).status_code == 200
    known.add(restart.id)

    retire = "retire-spec/retire-deleted"
    known_retire = {r.id for r in flow_runs(retire)}
    spec_path.unlink()
    assert wait_for_new_run(retire, known_retire, 300, cortex_serve.log).state.type.value == "COMPLETED"
    assert [r for r in replicas(cortex_serve) if r.model == "smollm2-crashy"] == []
    time.sleep(5)  # a few restart checks: a retired model is not restarted
    assert [r for r in flow_runs(deploy) if r.id not in known] == []


def prefect_cli(server: PrefectServer, *args: str, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_a_worker_on_a_gpu_host_queue_runs_the_deployment_host_join_made(
    prefect_server: PrefectServer, tmp_path: Path, test_model
) -> None:
    # As README.md says: the pool, `prefect deploy` next to prefect.yaml (the control plane's
    # deployments), the host's queue and deployments as `cortex host join` makes them (its
    # worker here runs elsewhere: the flows come from the installed package).
    from datetime import datetime, timezone

    from cortex.fleet.hosts import HostRecord
    from cortex.fleet.inventory import HostInventory
    from flows.fleet import join_host

    env = prefect_server.env(CORTEX_HOME=str(tmp_path / "cortex-home"), PYTHONUNBUFFERED="1")
    # --overwrite: `cortex serve` (an earlier test's, on this session's server) made it already
    prefect_cli(prefect_server, "work-pool", "create", "cortex", "--type", "process", "--overwrite", env=env)
    prefect_cli(prefect_server, "--no-prompt", "deploy", "--all", env=env, timeout=600)
    inventory = HostInventory(name="gpu-host-1", address="127.0.0.1", cpu_cores=2, ram_bytes=8 << 30)
    join_host(HostRecord(inventory=inventory, pool="cortex", queue="gpu-host-1", updated_at=datetime.now(timezone.utc)))
    with client() as c:
        dep = c.read_deployment_by_name("prepare-model/prepare-gpu-host-1")
        pooled = {(d.name, d.work_queue_name) for d in c.read_deployments() if d.work_pool_name == "cortex"}
    assert pooled >= {
        ("fleet-apply", "control"),
        ("reconcile", "control"),
        ("fleet-reconcile", "control"),
        ("deploy-gpu-host-1", "gpu-host-1"),
        ("prepare-gpu-host-1", "gpu-host-1"),
        ("retire-gpu-host-1", "gpu-host-1"),
    }
    assert dep.work_pool_name == "cortex" and dep.work_queue_name == "gpu-host-1"
    assert dep.entrypoint == "flows.prepare.prepare_model" and not dep.pull_steps

    spec = tmp_path / "smollm2.yaml"
    write_spec(spec, smollm2_spec(test_model.gguf))
    with client() as c:
        run = c.create_flow_run_from_deployment(dep.id, parameters={"spec_path": str(spec)})

    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cortex", "--work-queue", "gpu-host-1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:

        def finished():
            with client() as c:
                r = c.read_flow_run(run.id)
            return r if r.state and r.state.type.value in TERMINAL else None

        done = wait_for(finished, 300, "the worker did not finish the run", lambda: log_path.read_text())
        assert done.state.type.value == "COMPLETED", run_logs(run.id)[-4000:] + log_path.read_text()[-3000:]
        # The run's process sends its last logs after its final state; stopping the worker
        # before that would lose them.
        wait_for(
            lambda: "prepared smollm2-served: gguf" in run_logs(run.id),
            60,
            "the run's log lacks the prepare summary",
            lambda: log_path.read_text(),
        )
    finally:
        stop_process(worker)
    assert done.work_queue_name == "gpu-host-1"


@pytest.mark.parts  # it starts a Prefect server of its own
def test_cortex_serve_without_a_server_starts_one_and_says_where_the_ui_is(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), CORTEX_HOME=str(tmp_path / "cortex-home"), PYTHONUNBUFFERED="1"
    )
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--specs", str(specs), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: "watching" in log_path.read_text() or proc.poll() is not None,
            240,
            "cortex serve did not come up",
            log_path.read_text,
        )
        assert f"Prefect UI: http://127.0.0.1:{port}\n" in log_path.read_text(), log_path.read_text()
        ui = wait_for(
            lambda: (r := httpx.get(f"http://127.0.0.1:{port}/", timeout=10)).status_code == 200 and r,
            60,
            "the Prefect UI did not answer",
            log_path.read_text,
        )
        assert "<html" in ui.text.lower()

        def registered():
            found = httpx.post(f"http://127.0.0.1:{port}/api/deployments/filter", json={}, timeout=10).json()
            return {d["name"] for d in found} >= {"deploy", "prepare", "retire", "retire-deleted", "reconcile"}

        wait_for(registered, 60, "the deployments were not registered", log_path.read_text)
    finally:
        stop_process(proc, timeout=40)
    # The server it started stops with it.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)


def test_reconcile_applies_what_changed_reports_declared_against_running_and_retires_deleted(
    prefect_server: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_model, toolchain
) -> None:
    from cortex.runtime import get_runtime
    from flows.reconcile import reconcile_specs

    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "cortex-home"))
    monkeypatch.setenv("CORTEX_GATEWAY_URL", "http://127.0.0.1:9")
    specs = tmp_path / "specs"
    specs.mkdir()
    write_spec(specs / "smollm2.yaml", smollm2_spec(test_model.gguf))
    write_spec(specs / "broken.yaml", "name: Broken_Name\nsource: {gguf: ./x.gguf}\n")

    def by_spec(report: dict) -> dict[str, dict]:
        return {row["spec"]: row for row in report["specs"]}

    def ours(report: dict) -> list[dict]:
        return [row for row in report["running"] if row["model"] == "smollm2-served"]

    try:
        first = reconcile_specs(str(specs))
        rows = by_spec(first)
        assert (rows["smollm2.yaml"]["state"], rows["smollm2.yaml"]["action"]) == ("not running", "applied")
        assert rows["broken.yaml"]["state"] == "invalid" and "broken.yaml:1: name:" in rows["broken.yaml"]["detail"]
        [running] = ours(first)
        assert running["declared"] and running["runtime"] == "process"

        second = by_spec(reconcile_specs(str(specs)))  # nothing changed: nothing is done
        assert (second["smollm2.yaml"]["state"], second["smollm2.yaml"]["action"]) == ("up to date", "none")

        (specs / "smollm2.yaml").unlink()
        third = reconcile_specs(str(specs))
        assert by_spec(third)["smollm2.yaml"] == {
            "spec": "smollm2.yaml",
            "model": "smollm2-served",
            "state": "spec deleted",
            "action": "retired",
            "detail": "",
        }
        assert ours(third) == []
    finally:
        runtime = get_runtime("process")
        for replica in runtime.list():
            runtime.stop(replica)


def test_a_scheduled_run_benchmarks_the_same_commit_and_redeploys_a_new_one(
    prefect_server: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_model, toolchain
) -> None:
    """What the spec's schedule starts (apply-spec with scheduled=true), against a local Hub
    endpoint (tests/hubserver.py) whose `main` moves to a new commit between two runs."""
    from cortex.runtime import get_runtime
    from flows.reconcile import apply_spec
    from hubserver import HubRepo, HubServer

    repo = HubRepo("acme/smollm2-gguf")
    first_commit = repo.commit({"SmolLM2.Q4_1.gguf": test_model.gguf})
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "cortex-home"))
    monkeypatch.setenv("CORTEX_GATEWAY_URL", "http://127.0.0.1:9")
    spec = tmp_path / "smollm2.yaml"
    write_spec(spec, smollm2_spec(test_model.gguf, source={"repo": "acme/smollm2-gguf", "gguf": "SmolLM2.Q4_1.gguf"}))
    try:
        with HubServer([repo]) as hub:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            first = apply_spec(str(spec))
            assert first["action"] == "deployed" and first["source_revision"] == first_commit
            assert first["changes"] == ["first record"]

            same = apply_spec(str(spec), scheduled=True)
            assert same["action"] == "benchmarked" and same["replica"] == first["replica"]
            assert same["benchmark"]["levels"][0]["concurrency"] == 1

            readme = tmp_path / "README.md"
            readme.write_text("a new commit on main\n")
            second_commit = repo.commit({"SmolLM2.Q4_1.gguf": test_model.gguf, "README.md": readme})
            moved = apply_spec(str(spec), scheduled=True)
            assert moved["action"] == "deployed" and moved["source_revision"] == second_commit
            assert moved["replica"] != first["replica"] and moved["stopped"] == [first["replica"]]
            # the scheduled redeploy names what changed: the commit, not the file (the GGUF is the same)
            assert moved["changes"][0] == f"Hub commit {first_commit[:12]}→{second_commit[:12]}", moved["changes"]
            assert not any(c.startswith(("source file", "GGUF", "toolchain", "plan")) for c in moved["changes"])
            assert [r.name for r in get_runtime("process").list()] == [moved["replica"]]
    finally:
        runtime = get_runtime("process")
        for replica in runtime.list():
            runtime.stop(replica)
