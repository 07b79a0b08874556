"""Run the gateway under uvicorn (uvloop + httptools: the fastest pair measured here)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from ..settings import Settings
from .app import Gateway


def configure_logging(access_log: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("cortex.gateway.access")
    access.handlers[:] = [handler]
    access.propagate = False
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    events = logging.StreamHandler(sys.stderr)
    events.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    gateway = logging.getLogger("cortex.gateway")
    gateway.handlers[:] = [events]
    gateway.propagate = False
    gateway.setLevel(logging.INFO)


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    configure_logging(settings.gateway_access_log)
    app = Gateway(settings)
    uvicorn.run(
        app,
        host=host or settings.gateway_host,
        port=port or settings.gateway_port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # the gateway writes its own structured access log
        server_header=False,
        date_header=False,
        timeout_keep_alive=75,
        backlog=4096,
        log_level="warning",
    )
