"""Scripts that run inside an engine's own Python (the vLLM virtualenv), not Cortex's.

Each imports only what that environment has (vLLM, torch, transformers, gguf), never `cortex`,
and is run by its path: ``[python, script_path("export_hf"), *args]``. As files of their own
they are linted and read like the rest of the code, not hidden in strings.
"""

from __future__ import annotations

from pathlib import Path


def script_path(name: str) -> Path:
    """The file of the engine script `name` (``export_hf``, ``vllm_flags``, ...)."""
    path = Path(__file__).with_name(f"{name}.py")
    if not path.is_file():
        raise FileNotFoundError(f"no engine script {name!r} in {path.parent}")
    return path
