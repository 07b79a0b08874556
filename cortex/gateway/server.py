"""Run the gateway on its own HTTP/1.1 server (http.py: httptools on uvloop), with the
client-connection limits of connections.py.

With `gateway_workers` N > 1 this process binds the port once, makes the shared in-flight
board (inflight.py) and forks N workers that accept on that one socket, each a whole gateway
(its own event loop, upstream pools, health checks, metrics and access-log buffer) on the same
registry. It stays as their supervisor: a worker that dies is replaced (its in-flight counts
zeroed first), and SIGTERM or SIGINT stops them all gracefully (usage flushed, logs written).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from typing import Any

from ..settings import Settings
from . import compiled, http
from .accesslog import AccessLog
from .app import Gateway
from .connections import ConnectionGuard, ConnectionLimits
from .inflight import InFlightBoard
from .registry import Registry

log = logging.getLogger("cortex.gateway")

# A worker that exits with an error within this many seconds of its start is not restarted in a
# loop: the supervisor stops the gateway (a bad setting or a broken registry fails every worker
# alike). A worker killed by a signal (the OOM killer, an operator) is replaced at once.
EARLY_DEATH_S = 5.0


def configure_logging() -> None:
    events = logging.StreamHandler(sys.stderr)
    events.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    gateway = logging.getLogger("cortex.gateway")
    gateway.handlers[:] = [events]
    gateway.propagate = False
    gateway.setLevel(logging.INFO)


def _app(settings: Settings, board: InFlightBoard | None) -> tuple[Gateway, ConnectionGuard]:
    guard = ConnectionGuard(ConnectionLimits.from_settings(settings))
    access_log = AccessLog(sys.stderr.buffer, atomic_lines=board is not None)
    return Gateway(settings, access_log=access_log, connections=guard, board=board), guard


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    configure_logging()
    host, port = host or settings.gateway_host, port or settings.gateway_port
    log.info("gateway code: %s", compiled.state)
    if settings.gateway_workers == 1:
        try:
            sock = http.bind_socket(host, port)
        except OSError as exc:
            raise SystemExit(f"gateway: {exc}") from None
        app, guard = _app(settings, None)
        log.info("gateway on http://%s:%d", host, port)
        http.run(app, guard, sock)
        return
    _supervise(settings, host, port)


def _worker(settings: Settings, board: InFlightBoard, index: int, sock: socket.socket) -> None:
    board.attach(index)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # http.run installs its own handlers on its loop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    configure_logging()
    app, guard = _app(settings, board)
    http.run(app, guard, sock)


def _supervise(settings: Settings, host: str, port: int) -> None:
    workers = settings.gateway_workers
    # Done once here, not raced by N workers: the registry's schema and the admin token file.
    Registry(settings.gateway_db).close()
    settings.resolve_admin_token(create=True)
    try:
        sock = http.bind_socket(host, port)
    except OSError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    board = InFlightBoard(workers)
    context = multiprocessing.get_context("fork")
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    def start(index: int) -> tuple[multiprocessing.process.BaseProcess, float]:
        proc = context.Process(target=_worker, args=(settings, board, index, sock), name=f"cortex-gateway-{index}")
        proc.start()
        return proc, time.monotonic()

    procs = [start(i) for i in range(workers)]
    log.info("gateway on http://%s:%d with %d workers (pids %s)", host, port, workers, [p.pid for p, _ in procs])
    try:
        while not stopping:
            multiprocessing.connection.wait([p.sentinel for p, _ in procs], timeout=0.5)
            for index, (proc, started) in enumerate(procs):
                if proc.is_alive() or stopping:
                    continue
                exitcode = proc.exitcode or 0
                if exitcode > 0 and time.monotonic() - started < EARLY_DEATH_S:
                    log.error(
                        "gateway worker %d exited with %s within %.0f s of starting; stopping the gateway",
                        index,
                        proc.exitcode,
                        EARLY_DEATH_S,
                    )
                    stopping = True
                    break
                log.error("gateway worker %d (pid %s) exited with %s; starting another", index, proc.pid, proc.exitcode)
                board.forget_worker(index)  # its requests died with it
                procs[index] = start(index)
    finally:
        for proc, _ in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc, _ in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        sock.close()
    if any(proc.exitcode not in (0, -signal.SIGTERM) for proc, _ in procs):
        sys.exit(1)
