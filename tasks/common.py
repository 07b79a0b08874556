"""What every Cortex task shares: its Prefect options and the shape of its artifact keys."""

from __future__ import annotations

import re
from typing import Any

from prefect.cache_policies import NO_CACHE

# No task is cached or keeps its result in Prefect: each call must really start, test, measure or
# build (what is reusable, e.g. a built GGUF, is cached by Cortex itself).
TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def artifact_key(*parts: str) -> str:
    """`parts` joined by dashes as a Prefect artifact key, which allows lowercase letters,
    digits and dashes only; the same parts always give the same key, so a flow can find a
    subflow's artifacts by recomputing it."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
