"""Every flag of vLLM's API server, from its own argument parser, as JSON on stdout.

Runs with the vLLM virtualenv's Python (cortex/engines/introspect.py: vllm_table).
"""

import json
import sys

# vLLM attaches help text only when it sees --help on the command line (arg_utils.NEEDS_HELP).
sys.argv = ["vllm-api-server", "--help"]
from vllm.entrypoints.launchers.cli_args import make_arg_parser  # noqa: E402 (after sys.argv, on purpose)
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

parser = make_arg_parser(FlexibleArgumentParser(description="vLLM OpenAI-compatible server"))
flags = []
for action in parser._actions:
    if not action.option_strings:
        continue  # the positional model tag
    nargs = action.nargs
    takes_value = nargs != 0
    optional = nargs in ("?", "*")
    choices = None
    if action.choices is not None:
        choices = sorted(str(c) for c in action.choices)
    metavar = action.metavar
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    first_line = (action.help or "").strip().split("\n\n")[0]
    flags.append(
        {
            "names": list(action.option_strings),
            "takes_value": takes_value,
            "value_optional": optional,
            "metavar": metavar if metavar is None else str(metavar),
            "choices": choices,
            "nargs": None if nargs is None else str(nargs),
            "env": None,
            "help": " ".join(first_line.split())[:300],
        }
    )
print(json.dumps(flags))
