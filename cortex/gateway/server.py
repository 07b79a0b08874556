"""Run the gateway under uvicorn (uvloop + httptools: the fastest pair measured here), with the
client-connection limits of connections.py in uvicorn's HTTP protocol."""

from __future__ import annotations

import logging
import sys

import uvicorn

from ..settings import Settings
from .accesslog import AccessLog
from .app import Gateway
from .connections import ConnectionGuard, ConnectionLimits, protocol_class


def configure_logging() -> None:
    events = logging.StreamHandler(sys.stderr)
    events.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    gateway = logging.getLogger("cortex.gateway")
    gateway.handlers[:] = [events]
    gateway.propagate = False
    gateway.setLevel(logging.INFO)


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    configure_logging()
    guard = ConnectionGuard(ConnectionLimits.from_settings(settings))
    app = Gateway(settings, access_log=AccessLog(sys.stderr.buffer), connections=guard)
    uvicorn.run(
        app,
        host=host or settings.gateway_host,
        port=port or settings.gateway_port,
        loop="uvloop",
        http=protocol_class(guard),
        lifespan="on",
        access_log=False,  # the gateway writes its own structured access log
        server_header=False,
        date_header=False,
        timeout_keep_alive=settings.gateway_keep_alive_timeout,
        proxy_headers=False,  # the gateway is the edge; skipping the middleware saves a call per request
        backlog=4096,
        log_level="warning",
    )
