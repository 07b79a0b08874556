"""A fresh CORTEX_CACHE for one test that still finds what `./dev setup` installed."""

from __future__ import annotations

import os
from pathlib import Path


def linked_cortex_cache(tmp: Path) -> Path:
    """`tmp/cortex`: empty artifact cache, stamps and Hub listings of its own, with links to the
    real cache's toolchain, engines and test models (installing those again would take minutes).
    Made once; a second call returns the same folder."""
    real = Path(os.environ.get("CORTEX_CACHE") or Path.home() / ".cache" / "cortex")
    cache = tmp / "cortex"
    if not cache.exists():
        cache.mkdir()
        for part in ("toolchain", "engines", "models"):
            if (real / part).exists():
                os.symlink(real / part, cache / part)
    return cache
