"""`cortex serve`: run Cortex's Prefect deployments, spec schedules and spec-file triggers.

    cortex serve [--specs DIR] [--prefect-url URL] [--port 4200] [--limit N]

Connects to the Prefect server at --prefect-url (or $PREFECT_API_URL); with neither, starts a
local one (`prefect server start`, SQLite in $PREFECT_HOME) and stops it on exit. Starts the
Prefect worker of the fleet pool's `control` queue (flows/control.py) unless another one polls
it, and stops it on exit. Prints where the UI is, then serves until Ctrl-C. See README.md, "Operating Cortex through Prefect".
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import httpx
import typer

from cli.commands import add_command


def register(app: typer.Typer) -> None:
    add_command(
        app,
        run,
        "serve",
        short_help="serve Cortex's Prefect deployments; watch a specs folder; keep spec schedules",
        help="Register the deploy, prepare, retire and reconcile deployments on a Prefect "
        "server, turn each spec's `schedule` into a schedule, and deploy a spec when its file in "
        "--specs is saved (retire its model when it is deleted). Runs the worker of the control "
        "queue (fleet-apply, reconcile, fleet-reconcile) unless one already polls it. Runs until interrupted.",
    )


def api_url(url: str) -> str:
    """A Prefect API URL ends in /api; accept the UI's address too."""
    url = url.rstrip("/")
    return url if url.endswith("/api") else url + "/api"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def start_local_server(
    port: int,
    log_path: Path,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on 127.0.0.1:port (in its own session, with `env` added to this
    process's environment); returns once /api/health answers."""
    url = f"http://127.0.0.1:{port}/api"
    if healthy(url):
        raise RuntimeError(f"something already answers at {url}; connect to it with --prefect-url {url}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | (env or {})
    # --port alone leaves the UI calling the API at the default port 4200: name it for the UI too
    server_env.update(PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port), PREFECT_UI_API_URL=url)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited {proc.returncode} before it answered; see {log_path}")
        if healthy(url):
            return proc, url
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"prefect server did not answer at {url} within {timeout_s:.0f} s; see {log_path}")


def run(
    specs: Annotated[str, typer.Option(help="folder of spec files to watch")] = "specs",
    prefect_url: Annotated[
        Optional[str],
        typer.Option(
            help="Prefect API URL, e.g. http://prefect.example:4200/api (default: $PREFECT_API_URL, "
            "else start a local server)"
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="port of the local Prefect server, if one is started")] = 4200,
    limit: Annotated[Optional[int], typer.Option(help="most flow runs at once in this process")] = None,
) -> int:
    from cortex.settings import Settings

    folder = Path(specs).expanduser().absolute()
    if not folder.is_dir():
        print(f"cortex serve: {folder} is not a folder; name your specs folder with --specs DIR", file=sys.stderr)
        return 2
    server = None
    url = prefect_url or os.environ.get("PREFECT_API_URL")
    if url:
        url = api_url(url)
        if not healthy(url, timeout=10):
            print(
                f"cortex serve: no Prefect server answers at {url}/health; start one with "
                "`prefect server start`, or leave out --prefect-url to let cortex start one",
                file=sys.stderr,
            )
            return 1
    else:
        log_path = Path(Settings.load().home) / "prefect-server.log"
        print(f"starting a local Prefect server on 127.0.0.1:{port} (log: {log_path}) ...", flush=True)
        server, url = start_local_server(port, log_path)
    os.environ["PREFECT_API_URL"] = url  # flow-run processes inherit it

    from prefect.settings import PREFECT_API_URL, temporary_settings

    ui = url[: -len("/api")]
    print(f"Prefect UI: {ui}", flush=True)
    print(f"  deployments: {ui}/deployments   (Run > Custom run on 'apply-spec/deploy' starts a deploy)", flush=True)
    control_log = Path(Settings.load().home) / "control-worker.log"
    print(f"control-plane worker (queue cortex/control): log {control_log}", flush=True)
    print(f"watching {folder} for spec changes; Ctrl-C stops", flush=True)

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # SIGTERM stops like Ctrl-C: the server it started too

    signal.signal(signal.SIGTERM, interrupted)
    # what serve does itself (schedules kept in step, spec changes, the control worker) goes to its
    # output, through Prefect's console handler, like its runs' messages
    logging.getLogger("flows").setLevel(logging.INFO)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            from flows.serve import serve_specs

            serve_specs(folder, limit=limit, control_log=control_log)
    except KeyboardInterrupt:
        print("cortex serve: interrupted (Ctrl-C); stopping", flush=True)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0
