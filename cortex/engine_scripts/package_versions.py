"""The installed version of each distribution named in argv, as a JSON object on stdout
(missing ones left out).

Runs with the vLLM virtualenv's Python (cortex/toolchain.py: install_vllm).
"""

import importlib.metadata as m
import json
import sys


def installed(name: str) -> str | None:
    """The installed version of `name`, or None when it is not installed (the caller checks
    which it needs: a missing one is left out of the answer, not guessed)."""
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None


print(json.dumps({name: v for name in sys.argv[1:] if (v := installed(name)) is not None}))
