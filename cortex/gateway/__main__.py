"""`python -m cortex.gateway [--host H] [--port P] [--no-auth]`: the same as `cortex gateway`."""

from __future__ import annotations

import argparse

from ..settings import Settings
from .server import serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cortex.gateway", description="Run the Cortex gateway.")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--no-auth", action="store_true")
    args = parser.parse_args()
    serve(Settings.load(gateway_no_auth=True if args.no_auth else None), args.host, args.port)


if __name__ == "__main__":
    main()
