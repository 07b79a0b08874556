"""`cortex prepare SPEC`: download, convert and quantize what the spec's engine will load.

    cortex prepare specs/smollm2.yaml [--json]

Runs the prepare-model Prefect flow (against PREFECT_API_URL, or Cortex's local Prefect server) and
prints the files it produced. With --json: one object with `files` ({path, bytes, sha256}),
`source_revision` (the commit sha, or a local GGUF's sha256), `cached` and the plan.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="download, convert and quantize a spec's model into the cache (verified)",
        description="Run the prepare-model flow on SPEC: resolve the source to a commit, plan, "
        "download only the needed files (resumable, sha256-verified), convert and quantize with "
        "the pinned llama.cpp tools when the plan needs a GGUF. A second run reuses the cache.",
    )
    parser.add_argument("spec", help="path to the model's YAML spec")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cli.commands.local_prefect import run_flow
    from cortex.artifacts import source_origin
    from flows.prepare import prepare_model

    outcome = run_flow(f"prepare of {args.spec}", prepare_model, args.spec, json_errors=args.json,
                       context={"spec": args.spec})
    if outcome.exit_code:
        return outcome.exit_code
    result = outcome.result.to_json()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"prepared {result['name']} for {result['engine']}: {result['format']} {result['quantization']}")
    print(f"  source    {source_origin(result['source'])} -> {result['source_revision']}")
    print(f"  cached    {'yes (nothing downloaded or built)' if result['cached'] else 'no'}"
          f"; downloaded {result['downloaded_bytes']} bytes; built {', '.join(result['built']) or 'nothing'}")
    print(f"  load      {result['artifact_path']}")
    width = max((len(f["path"]) for f in result["files"]), default=4)
    print(f"  {'path':<{width}}  {'bytes':>12}  sha256")
    for f in result["files"]:
        print(f"  {f['path']:<{width}}  {f['bytes']:>12}  {f['sha256']}")
    return 0
