"""The `cortex` command line.

Each subcommand lives in its own module under `cortex.commands` and exposes
`register(subparsers)`; this file only lists them, so adding a command is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Module names under cortex.commands, in the order `cortex --help` shows them.
COMMANDS = [
    "demo",
    "validate",
    "plan",
    "schema",
    "engines",
    "gateway",
    "keys",
    "deploy",
    "retire",
    "status",
    "bench",
    "compare",
    "prepare",
    "cache",
    "serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cortex",
        description="Take an LLM from a spec to a tested, benchmarked, OpenAI-compatible endpoint.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"cortex.commands.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Commands that run flows start Prefect's ephemeral server when no PREFECT_API_URL is set;
    # its 20 s default start-up timeout is too short on a busy small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The Prefect servers Cortex starts (ephemeral, or `cortex serve`'s own) would phone home
    # every run and print "Failed to send telemetry" where there is no network. An operator's
    # own setting wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
