"""The `cortex` command line (Typer, with Rich tables).

Each subcommand lives in its own module under `cli.commands` and exposes `register(app)`;
this file only lists them, so adding a command is one line here. Printing goes through
`cli.output` (the one `--json` option, JSON or a Rich table from the same rows).
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

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
    "compare_engines",
    "prepare",
    "cache",
    "serve",
    "hosts",
    "local_prefect",
]


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="cortex",
        help="Take an LLM from a spec to a tested, benchmarked, OpenAI-compatible endpoint.",
        no_args_is_help=True,
        add_completion=False,
        # A command's own failure is a plain message on stderr; an unexpected one keeps
        # Python's usual traceback.
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    for name in COMMANDS:
        importlib.import_module(f"cli.commands.{name}").register(app)
    return app


def main(argv: list[str] | None = None) -> int:
    # Flow commands use Cortex's local Prefect server when no PREFECT_API_URL is set
    # (cli/commands/local_prefect.py). The servers Cortex starts (that one, `cortex serve`'s) would phone home
    # every run and print "Failed to send telemetry" where there is no network. An operator's
    # own setting wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from cortex.gateway.client import GatewayError
    from cortex.settings import SettingsError

    try:
        build_app()(args=argv, prog_name="cortex")
    except (SettingsError, GatewayError) as error:
        # Expected operator errors (no gateway here, a wrong token, a refused admin call): one
        # line that says what to do, never a traceback.
        print(f"cortex: {error}", file=sys.stderr)
        return 1
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        raise  # SystemExit("message"): the message goes to stderr, exit 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
