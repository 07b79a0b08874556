"""`cortex validate PATH...`: check spec files; every problem as FILE:LINE: field: message."""

from __future__ import annotations

import argparse
import sys

from cortex.specfile import SpecError, load_spec, spec_files


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check spec files (exit 2 if any is invalid)",
                       description="Check spec files or folders of specs. Exit 0 when all are valid, 2 otherwise.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="spec files or folders holding *.yaml specs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    files = spec_files(args.paths)
    if not files:
        print(f"{' '.join(args.paths)}: no spec files (*.yaml, *.yml) found", file=sys.stderr)
        return 2
    bad = 0
    for f in files:
        try:
            spec = load_spec(f)
        except SpecError as e:
            bad += 1
            for problem in e.problems:
                print(problem, file=sys.stderr)
            continue
        print(f"{f}: ok ({spec.name}, source {spec.source.kind}, engine {spec.engine})")
    if bad:
        print(f"{bad} of {len(files)} spec(s) invalid", file=sys.stderr)
        return 2
    return 0
