"""vLLM's model registry, asked of vLLM itself: which HF architectures a vLLM version loads.

The decision rules need this list on machines without vLLM, so it is committed as data
(cortex/data/vllm-architectures-<version>.txt); `write_vllm_architectures` makes it from the
installed vLLM and a test fails when the committed list is stale.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cortex.engine_scripts import script_path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def live_vllm_architectures(python: Path) -> list[str]:
    """Every architecture the vLLM installed under `python` supports (its ModelRegistry)."""
    out = subprocess.run(
        [str(python), str(script_path("vllm_architectures"))], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(f"vLLM's model registry could not be read: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def architectures_path(version: str) -> Path:
    return DATA_DIR / f"vllm-architectures-{version}.txt"


def write_vllm_architectures(python: Path, version: str) -> Path:
    archs = live_vllm_architectures(python)
    path = architectures_path(version)
    path.write_text(
        f"# HF architectures vLLM {version} supports (vllm ModelRegistry.get_supported_archs())\n"
        + "\n".join(archs)
        + "\n"
    )
    return path
