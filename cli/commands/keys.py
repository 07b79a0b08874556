"""`cortex keys`: client API keys for the gateway (asks the running gateway's admin API).

    cortex keys create [--name N] [--models a,b] [--expires 30d|12h|2026-12-31]   prints the key once
    cortex keys list [--json]
    cortex keys revoke KEY_ID
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import datetime, timezone

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
        raise argparse.ArgumentTypeError(
            f"--expires {text!r}: use a duration (30d, 12h, 90m, 2w) or an ISO date (2026-12-31)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "keys", help="create, list and revoke the gateway's client API keys",
        description="Client API keys for the gateway. Keys are stored only as hashes: `create` "
        "prints the key once. Needs a running gateway (CORTEX_GATEWAY_URL, CORTEX_ADMIN_TOKEN).")
    actions = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="create a key and print it (shown only this once)")
    create.add_argument("--name", default="", help="a label for whoever holds the key")
    create.add_argument("--models", help="comma-separated model names or aliases this key may use (default: all)")
    create.add_argument("--expires", type=parse_expiry, help="30d, 12h, 90m, 2w, or an ISO date (UTC)")
    create.add_argument("--json", action="store_true", help="print the gateway's JSON answer")
    create.set_defaults(func=run_create)

    listing = actions.add_parser("list", help="list keys (ids, limits, expiry; never the secret)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=run_list)

    revoke = actions.add_parser("revoke", help="disable a key at once")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=run_revoke)


def _client():
    from cortex.gateway.client import GatewayClient

    return GatewayClient(Settings.load())


def _when(ts: float | None) -> str:
    return "never" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_create(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    with _client() as client:
        created = client.create_key(args.name, models, args.expires)
    if args.json:
        print(json.dumps(created, indent=2))
        return 0
    print(created["key"])
    print(f"id {created['id']}; models: {', '.join(created['models']) if created['models'] else 'all'}; "
          f"expires: {_when(created['expires_at'])}. The key is not stored and will not be shown again.",
          file=sys.stderr)
    return 0


def run_list(args: argparse.Namespace) -> int:
    with _client() as client:
        keys = client.list_keys()
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    print(f"{'ID':18} {'NAME':16} {'STATUS':8} {'EXPIRES':22} MODELS")
    now = time.time()
    for k in keys:
        status = "revoked" if k["disabled"] else "expired" if k["expires_at"] and k["expires_at"] < now else "active"
        print(f"{k['id']:18} {k['name'][:16]:16} {status:8} {_when(k['expires_at']):22} "
              f"{','.join(k['models']) if k['models'] else 'all'}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    with _client() as client:
        client.revoke_key(args.key_id)
    print(f"revoked {args.key_id}")
    return 0
