"""`cortex gateway`: run the OpenAI-compatible gateway, and look at what it routes.

cortex gateway [--host H] [--port P] [--no-auth] [--workers N]   serve (127.0.0.1:8080 by default)
cortex gateway replicas [--json]                     replicas, health and in-flight requests
cortex gateway settings                              every setting, its variable and default
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.commands import add_command
from cli.output import JsonFlag, output, table
from cortex.settings import FIELDS, Settings, describe


def register(app: typer.Typer) -> None:
    gateway = typer.Typer(
        short_help="run the OpenAI-compatible gateway in front of the engines",
        help="Serve /v1 (chat, completions, embeddings, models) routed by model name to "
        "registered engine replicas. Settings come from CORTEX_* variables or the config file; "
        "`cortex gateway settings` lists them.",
        invoke_without_command=True,
    )
    gateway.callback()(run_serve)
    add_command(gateway, run_replicas, "replicas", help="list registered replicas (asks the running gateway)")
    add_command(gateway, run_settings, "settings", help="print every setting with its current value")
    app.add_typer(gateway, name="gateway")


def run_serve(
    ctx: typer.Context,
    host: Annotated[Optional[str], typer.Option(help="bind address (default: CORTEX_GATEWAY_HOST, 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default: CORTEX_GATEWAY_PORT, 8080)")] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="serve /v1 without client API keys (local, single-user only)")
    ] = False,
    workers: Annotated[
        Optional[int],
        typer.Option(
            help="worker processes sharing the port and the in-flight counts (default: CORTEX_GATEWAY_WORKERS, 1)"
        ),
    ] = None,
) -> None:
    """`cortex gateway` alone serves; with an action (replicas, settings) it only runs that."""
    if ctx.invoked_subcommand is not None:
        return
    from cortex.gateway import compiled

    compiled.install()  # before the server is imported: the compiled build, when there is one
    from cortex.gateway.registry import redact_url
    from cortex.gateway.server import serve

    if workers is not None and workers < 1:
        raise typer.BadParameter(f"--workers {workers}: at least 1", param_hint="--workers")
    settings = Settings.load(gateway_no_auth=True if no_auth else None, gateway_workers=workers)
    if settings.gateway_no_auth:
        print(
            "WARNING: client authentication is OFF (no-auth mode): anyone who reaches "
            f"{host or settings.gateway_host} can use every model.",
            flush=True,
        )
    token_source = "CORTEX_ADMIN_TOKEN" if settings.admin_token else str(settings.admin_token_path)
    print(
        f"cortex gateway on http://{host or settings.gateway_host}:{port or settings.gateway_port} "
        f"(registry {redact_url(settings.gateway_db)}, admin token from {token_source}, "
        f"{settings.gateway_workers} worker{'s' if settings.gateway_workers > 1 else ''})",
        flush=True,
    )
    try:
        serve(settings, host, port)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def run_replicas(as_json: JsonFlag = False) -> int:
    from cortex.gateway.client import GatewayClient

    with GatewayClient(Settings.load()) as client:
        listing = client.list()

    def render(listing: dict) -> Table:
        aliases: dict[str, list[str]] = {}
        for alias, model in listing["aliases"].items():
            aliases.setdefault(model, []).append(alias)
        return table(
            ("MODEL", "REPLICA", "STATE", "HEALTHY", "IN-FLIGHT", "URL"),
            (
                (
                    r["model"] + (f" ({', '.join(aliases[r['model']])})" if r["model"] in aliases else ""),
                    r["id"],
                    r["state"],
                    r["healthy"],
                    r["in_flight"],
                    r["url"],
                )
                for r in listing["replicas"]
            ),
        )

    output(listing, as_json, render)
    return 0


def run_settings() -> int:
    from cortex.gateway.registry import redact_url

    settings = Settings.load()
    print(describe())
    print()
    secret = {f.name for f in FIELDS if f.secret}
    for name, value in dataclasses.asdict(settings).items():
        if name in secret and value:
            value = "(set)"
        elif name == "gateway_db":
            value = redact_url(value)  # a postgresql:// URL may carry a password
        print(f"{name} = {value}")
    return 0
