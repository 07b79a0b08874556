"""`python -m cortex.gateway [--host H] [--port P] [--no-auth] [--workers N]`: the same as `cortex gateway`."""

from __future__ import annotations

import argparse

from ..settings import Settings
from . import compiled


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cortex.gateway", description="Run the Cortex gateway.")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--no-auth", action="store_true")
    parser.add_argument("--workers", type=int, help="worker processes (default: CORTEX_GATEWAY_WORKERS, 1)")
    args = parser.parse_args()
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers}: at least 1")
    compiled.install()  # before the server is imported: the compiled build, when there is one
    from .server import serve

    serve(
        Settings.load(gateway_no_auth=True if args.no_auth else None, gateway_workers=args.workers),
        args.host,
        args.port,
    )


if __name__ == "__main__":
    main()
