"""The installed version of each distribution named in argv, as a JSON object on stdout
(missing ones left out).

Runs with the vLLM virtualenv's Python (cortex/toolchain.py: install_vllm).
"""
import importlib.metadata as m
import json
import sys

out = {}
for name in sys.argv[1:]:
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps(out))
