"""`cortex keys`: client API keys for the gateway (asks the running gateway's admin API).

cortex keys create [--name N] [--models a,b] [--expires 30d|12h|2026-12-31]   prints the key once
cortex keys list [--json]
cortex keys revoke KEY_ID
"""

from __future__ import annotations

import re
import sys
import time
from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

from cli.commands import add_command, group
from cli.output import JsonFlag, output, table
from cortex.settings import Settings

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_expiry(text: str, now: float | None = None) -> float:
    """'30d', '12h', '90m' from now, or an ISO date/time (UTC when no zone is given)."""
    now = time.time() if now is None else now
    match = _DURATION.match(text.strip())
    if match:
        return now + int(match.group(1)) * _UNIT[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"--expires {text!r}: use a duration (30d, 12h, 90m, 2w) or an ISO date (2026-12-31)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def register(app: typer.Typer) -> None:
    keys = group(
        app,
        "keys",
        short_help="create, list and revoke the gateway's client API keys",
        help="Client API keys for the gateway. Keys are stored only as hashes: `create` "
        "prints the key once. Needs a running gateway (CORTEX_GATEWAY_URL, CORTEX_ADMIN_TOKEN).",
    )
    add_command(keys, run_create, "create", help="create a key and print it (shown only this once)")
    add_command(keys, run_list, "list", help="list keys (ids, limits, expiry; never the secret)")
    add_command(keys, run_revoke, "revoke", help="disable a key at once")


def _client():
    from cortex.gateway.client import GatewayClient

    return GatewayClient(Settings.load())


def _when(ts: float | None) -> str:
    return "never" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_create(
    name: Annotated[str, typer.Option(help="a label for whoever holds the key")] = "",
    models: Annotated[
        Optional[str], typer.Option(help="comma-separated model names or aliases this key may use (default: all)")
    ] = None,
    expires: Annotated[
        Optional[float],
        typer.Option(parser=parse_expiry, metavar="WHEN", help="30d, 12h, 90m, 2w, or an ISO date (UTC)"),
    ] = None,
    as_json: JsonFlag = False,
) -> int:
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    with _client() as client:
        created = client.create_key(name, allowed, expires)

    output(created, as_json, lambda created: created["key"])
    if not as_json:
        print(
            f"id {created['id']}; models: {', '.join(created['models']) if created['models'] else 'all'}; "
            f"expires: {_when(created['expires_at'])}. The key is not stored and will not be shown again.",
            file=sys.stderr,
        )
    return 0


def _status(key: dict, now: float) -> str:
    if key["disabled"]:
        return "revoked"
    return "expired" if key["expires_at"] and key["expires_at"] < now else "active"


def run_list(as_json: JsonFlag = False) -> int:
    with _client() as client:
        keys = client.list_keys()
    now = time.time()
    output(
        keys,
        as_json,
        lambda keys: table(
            ("ID", "NAME", "STATUS", "EXPIRES", "MODELS"),
            (
                (
                    k["id"],
                    k["name"],
                    _status(k, now),
                    _when(k["expires_at"]),
                    ",".join(k["models"]) if k["models"] else "all",
                )
                for k in keys
            ),
        ),
    )
    return 0


def run_revoke(key_id: Annotated[str, typer.Argument(metavar="KEY_ID")]) -> int:
    with _client() as client:
        client.revoke_key(key_id)
    print(f"revoked {key_id}")
    return 0
