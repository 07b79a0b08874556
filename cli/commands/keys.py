"""`cortex keys`: client API keys for the gateway (asks the running gateway's admin API).

cortex keys create [--name N] [--models a,b] [--expires 30d|12h|2026-12-31]
                   [--rpm N] [--tpm N] [--budget-tokens N/day]            prints the key once
cortex keys update KEY_ID [--rpm N|none] [--tpm N|none] [--budget-tokens N/day|none]
cortex keys usage [--since 7d|2026-12-01] [--json]
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


# A limit option's value: a number, or "none" (update: remove the limit). UNSET: not given.
NONE = -1


def parse_limit(text: str) -> int:
    """--rpm/--tpm: a whole number of at least 1, or `none`."""
    if text.strip().lower() == "none":
        return NONE
    if not text.strip().isdigit() or int(text) < 1:
        raise typer.BadParameter(f"{text!r}: a whole number of at least 1, or 'none' for no limit")
    return int(text)


def parse_budget(text: str) -> int:
    """--budget-tokens: N/day (or N: per day), or `none`. Days are UTC days."""
    value = text.strip().lower()
    if value == "none":
        return NONE
    number, _, per = value.partition("/")
    if per not in ("", "day", "d") or not number.isdigit() or int(number) < 1:
        raise typer.BadParameter(
            f"{text!r}: give tokens per day as N/day (e.g. 1000000/day; the day is a UTC day), or 'none'"
        )
    return int(number)


RpmOption = Annotated[
    Optional[int], typer.Option("--rpm", parser=parse_limit, metavar="N", help="requests per minute (or 'none')")
]
TpmOption = Annotated[
    Optional[int],
    typer.Option("--tpm", parser=parse_limit, metavar="N", help="tokens (prompt + completion) per minute (or 'none')"),
]
BudgetOption = Annotated[
    Optional[int],
    typer.Option(
        "--budget-tokens",
        parser=parse_budget,
        metavar="N/day",
        help="tokens per UTC day, reset at 00:00 UTC (or 'none')",
    ),
]


def register(app: typer.Typer) -> None:
    keys = group(
        app,
        "keys",
        short_help="create, list and revoke the gateway's client API keys",
        help="Client API keys for the gateway. Keys are stored only as hashes: `create` "
        "prints the key once. Needs a running gateway (CORTEX_GATEWAY_URL, CORTEX_ADMIN_TOKEN).",
    )
    add_command(keys, run_create, "create", help="create a key and print it (shown only this once)")
    add_command(keys, run_update, "update", help="change a key's rate limits and daily token budget")
    add_command(keys, run_usage, "usage", help="requests, tokens and errors per key and model")
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
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    budget_tokens: BudgetOption = None,
    as_json: JsonFlag = False,
) -> int:
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    limits = [None if v == NONE else v for v in (rpm, tpm, budget_tokens)]
    with _client() as client:
        created = client.create_key(name, allowed, expires, *limits)

    output(created, as_json, lambda created: created["key"])
    if not as_json:
        print(
            f"id {created['id']}; models: {', '.join(created['models']) if created['models'] else 'all'}; "
            f"expires: {_when(created['expires_at'])}; limits: {_limits(created)}. "
            "The key is not stored and will not be shown again.",
            file=sys.stderr,
        )
    return 0


def _limits(key: dict) -> str:
    parts = []
    for field, unit in (("rpm", "req/min"), ("tpm", "tok/min"), ("budget_tokens_per_day", "tok/day")):
        if key.get(field) is not None:
            parts.append(f"{key[field]} {unit}")
    return ", ".join(parts) or "none"


def run_update(
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID")],
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    budget_tokens: BudgetOption = None,
    as_json: JsonFlag = False,
) -> int:
    changes = {
        field: None if value == NONE else value
        for field, value in (("rpm", rpm), ("tpm", tpm), ("budget_tokens_per_day", budget_tokens))
        if value is not None
    }
    if not changes:
        raise typer.BadParameter("give at least one of --rpm, --tpm, --budget-tokens (a number, or 'none')")
    with _client() as client:
        updated = client.update_key(key_id, **changes)
    output(updated, as_json, lambda k: f"{k['id']}: limits {_limits(k)}")
    return 0


def parse_since(text: str, now: float | None = None) -> float:
    """'7d', '24h', '90m' ago, or an ISO date/time (UTC when no zone is given)."""
    now = time.time() if now is None else now
    match = _DURATION.match(text.strip())
    if match:
        return now - int(match.group(1)) * _UNIT[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"--since {text!r}: use a duration back from now (7d, 24h, 90m, 2w) or an ISO date (2026-12-01)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def run_usage(
    since: Annotated[
        Optional[float],
        typer.Option(
            parser=parse_since, metavar="WHEN", help="7d, 24h, 90m, 2w back, or an ISO date (UTC); default: all"
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> int:
    with _client() as client:
        rows = client.usage(since)["usage"]
    output(
        rows,
        as_json,
        lambda rows: table(
            ("KEY", "NAME", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "ERRORS", "LIMITED"),
            (
                (
                    r["key_id"],
                    r["name"],
                    r["model"],
                    r["requests"],
                    r["prompt_tokens"],
                    r["completion_tokens"],
                    r["errors"],
                    r["rate_limited"],
                )
                for r in rows
            ),
            right=("REQUESTS", "PROMPT", "COMPLETION", "ERRORS", "LIMITED"),
        ),
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
            ("ID", "NAME", "STATUS", "EXPIRES", "MODELS", "LIMITS"),
            (
                (
                    k["id"],
                    k["name"],
                    _status(k, now),
                    _when(k["expires_at"]),
                    ",".join(k["models"]) if k["models"] else "all",
                    _limits(k),
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
