"""Cortex's local Prefect server, kept running across commands, and the one way commands run a flow.

    cortex prefect status [--json]     where the local server is, whether it answers
    cortex prefect stop                stop it (the next flow command starts it again)

Commands that run a flow (`prepare`, `deploy`, `retire`, `demo`) use the Prefect API in
`PREFECT_API_URL` when it is set. Otherwise they use Cortex's local server: `prefect server
start` on a free loopback port with its database in `<CORTEX_HOME>/prefect`, started by the
first such command and left running, the way the gateway is. Before, every command started
Prefect's temporary server and stopped it on exit: 20-25 s of fixed cost for a command whose
flow takes under 3 s, and its runs were gone with it. Now the runs stay, and the UI shows them.

`run_flow` runs a flow against that API and turns a failed run into one plain line on stderr
(and a JSON error object with --json) and exit code 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from cli.commands import add_command, group
from cli.output import JsonFlag, output

STATE_FILE = "server.json"


def register(app: typer.Typer) -> None:
    prefect = group(
        app,
        "prefect",
        short_help="Cortex's local Prefect server (kept running across commands): status, stop",
        help="Flow commands use PREFECT_API_URL when set; otherwise Cortex's own local "
        "Prefect server, started on first use and kept running (database in <CORTEX_HOME>/prefect).",
    )
    add_command(prefect, run_status, "status", help="where the local server is and whether it answers")
    add_command(prefect, run_stop, "stop", help="stop the local server")


def _folder() -> Path:
    from cortex.settings import Settings

    return Path(Settings.load().home) / "prefect"


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def ensure_api() -> str:
    """The Prefect API flows should use: PREFECT_API_URL, else the local server (started if it
    does not answer). Sets PREFECT_API_URL for this process and the processes it starts."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from cli.commands.serve import healthy, start_local_server
    from cortex.fileio import atomic_write_json, file_lock
    from cortex.net import free_port

    folder = _folder()
    # Two commands started at once must not start two servers on one database.
    with file_lock(folder / "server.lock"):
        state = _read_state(folder)
        if state is None or not healthy(state["url"]):
            port = free_port()
            log = folder / "server.log"
            print(
                f"cortex: starting the local Prefect server on 127.0.0.1:{port} (log {log}; "
                "it keeps running: `cortex prefect stop`)",
                file=sys.stderr,
                flush=True,
            )
            proc, url = start_local_server(port, log, env={"PREFECT_HOME": str(folder)})
            state = {"url": url, "pid": proc.pid, "port": port, "home": str(folder)}
            atomic_write_json(folder / STATE_FILE, state, newline=True)
    os.environ["PREFECT_API_URL"] = state["url"]
    return state["url"]


@dataclass(frozen=True)
class FlowOutcome:
    result: Any  # the flow's return value; None when it failed
    exit_code: int  # 0, or 1 when the run failed
    flow_run_id: Any  # the run's id in Prefect (its UI page, its task runs)


def run_flow(
    what: str,
    flow: Callable[..., Any],
    *args: Any,
    json_errors: bool = False,
    context: dict[str, Any] | None = None,
    **kwargs: Any,
) -> FlowOutcome:
    """Run `flow(*args, **kwargs)` against the Prefect API (`ensure_api`). A failed run says
    `<what> failed: <error>` on stderr (and prints a JSON error object, with `context`'s fields,
    when `json_errors`), and its outcome has exit code 1. When `context` names a `spec`, that file
    is checked first: a missing or invalid spec fails the same way with exit code 2, and no flow
    run starts."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cortex.specfile import SpecError, load_spec

    if context and "spec" in context:  # bad input is said before a flow run starts, without Prefect's traceback
        try:
            load_spec(context["spec"])
        except SpecError as exc:
            if json_errors:
                print(json.dumps({**context, "error": str(exc), "type": type(exc).__name__}))
            print(f"{what} failed: {exc}", file=sys.stderr)
            return FlowOutcome(None, 2, None)
    # Prefect reads its settings once, at import: the URL is given to it explicitly as well.
    with temporary_settings(updates={PREFECT_API_URL: ensure_api()}):
        state = flow(*args, return_state=True, **kwargs)
    run_id = state.state_details.flow_run_id
    try:
        return FlowOutcome(state.result(), 0, run_id)
    except Exception as exc:  # the run's own error, already in its Prefect logs: say it plainly
        if json_errors:
            print(json.dumps({**(context or {}), "error": str(exc), "type": type(exc).__name__}))
        print(f"{what} failed: {exc}", file=sys.stderr)
        return FlowOutcome(None, 1, run_id)


def run_status(as_json: JsonFlag = False) -> int:
    from cli.commands.serve import healthy

    folder = _folder()
    state = _read_state(folder) or {}
    report = {
        "home": str(folder),
        "url": state.get("url"),
        "pid": state.get("pid"),
        "running": bool(state) and healthy(state["url"]),
        "env_override": os.environ.get("PREFECT_API_URL"),
    }

    def render(report: dict) -> str:
        if report["running"]:
            return f"local Prefect server: {report['url']} (pid {report['pid']}), UI {report['url'][:-4]}"
        return f"local Prefect server: not running (started by the next flow command; database in {folder})"

    output(report, as_json, render)
    if report["env_override"]:
        print(f"note: PREFECT_API_URL={report['env_override']} is set, so commands use that server instead")
    return 0


def run_stop() -> int:
    folder = _folder()
    state = _read_state(folder)
    if state is None:
        print("local Prefect server: not running")
        return 0
    try:
        os.killpg(state["pid"], signal.SIGTERM)  # it runs in its own session: stop its children too
        print(f"stopped the local Prefect server (pid {state['pid']})")
    except ProcessLookupError:
        print("local Prefect server: was not running")
    (folder / STATE_FILE).unlink(missing_ok=True)
    return 0
