"""`cortex gateway`: run the OpenAI-compatible gateway, and look at what it routes.

    cortex gateway [--host H] [--port P] [--no-auth]     serve (uvicorn; 127.0.0.1:8080 by default)
    cortex gateway replicas [--json]                     replicas, health and in-flight requests
    cortex gateway settings                              every setting, its variable and default
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from cortex.settings import Settings, describe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="run the OpenAI-compatible gateway in front of the engines",
        description="Serve /v1 (chat, completions, embeddings, models) routed by model name to "
        "registered engine replicas. Settings come from CORTEX_* variables or the config file; "
        "`cortex gateway settings` lists them.",
    )
    parser.add_argument("--host", help="bind address (default: CORTEX_GATEWAY_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: CORTEX_GATEWAY_PORT, 8080)")
    parser.add_argument("--no-auth", action="store_true",
                        help="serve /v1 without client API keys (local, single-user only)")
    parser.set_defaults(func=run_serve)
    actions = parser.add_subparsers(dest="gateway_command", required=False, metavar="ACTION")

    replicas = actions.add_parser("replicas", help="list registered replicas (asks the running gateway)")
    replicas.add_argument("--json", action="store_true", help="print the gateway's JSON answer")
    replicas.set_defaults(func=run_replicas)

    settings = actions.add_parser("settings", help="print every setting with its current value")
    settings.set_defaults(func=run_settings)


def run_serve(args: argparse.Namespace) -> int:
    from cortex.gateway.server import serve

    settings = Settings.load(gateway_no_auth=True if args.no_auth else None)
    if settings.gateway_no_auth:
        print("WARNING: client authentication is OFF (no-auth mode): anyone who reaches "
              f"{args.host or settings.gateway_host} can use every model.", flush=True)
    token_source = "CORTEX_ADMIN_TOKEN" if settings.admin_token else str(settings.admin_token_path)
    print(f"cortex gateway on http://{args.host or settings.gateway_host}:{args.port or settings.gateway_port} "
          f"(registry {settings.gateway_db}, admin token from {token_source})", flush=True)
    serve(settings, args.host, args.port)
    return 0


def run_replicas(args: argparse.Namespace) -> int:
    from cortex.gateway.client import GatewayClient

    with GatewayClient(Settings.load()) as client:
        listing = client.list()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    aliases: dict[str, list[str]] = {}
    for alias, model in listing["aliases"].items():
        aliases.setdefault(model, []).append(alias)
    print(f"{'MODEL':24} {'REPLICA':28} {'STATE':9} {'HEALTHY':8} {'IN-FLIGHT':9} URL")
    for r in listing["replicas"]:
        name = r["model"] + (f" ({', '.join(aliases[r['model']])})" if r["model"] in aliases else "")
        print(f"{name:24} {r['id']:28} {r['state']:9} {str(r['healthy']):8} {r['in_flight']:<9} {r['url']}")
    return 0


def run_settings(args: argparse.Namespace) -> int:
    settings = Settings.load()
    print(describe())
    print()
    for name, value in dataclasses.asdict(settings).items():
        if name == "admin_token" and value:
            value = "(set)"
        print(f"{name} = {value}")
    return 0
