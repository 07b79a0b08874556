"""The `cortex` command line.

Each subcommand lives in its own module under `cli.commands` and exposes
`register(subparsers)`; this file only lists them, so adding a command is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Module names under cli.commands, in the order `cortex --help` shows them.
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
    "local_prefect",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cortex",
        description="Take an LLM from a spec to a tested, benchmarked, OpenAI-compatible endpoint.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"cli.commands.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Flow commands use Cortex's local Prefect server when no PREFECT_API_URL is set
    # (cli/commands/local_prefect.py). The servers Cortex starts (that one, `cortex serve`'s) would phone home
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
