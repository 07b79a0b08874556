"""Caches the tests share: a fresh CORTEX_CACHE that still finds what `./dev setup` installed,
and SmolLM2 as GGUF files of several types, built once."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cortex import toolchain as tc


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


def smollm2_gguf_files(
    types: Sequence[str], toolchain: tc.Toolchain, vllm: tc.VllmInstall, test_model: tc.TestModel
) -> dict[str, Path]:
    """SmolLM2-135M-Instruct from its HF checkpoint as GGUF files of `types` ("F16", "Q8_0", ...):
    F16 by convert_hf_to_gguf.py, the others by llama-quantize from it. Each is built once per
    toolchain version in ``$CORTEX_CACHE/test-artifacts/`` and reused across sessions."""
    folder = tc.cache_root() / "test-artifacts" / f"smollm2-135m-{toolchain.version}"
    paths = {t.upper(): folder / f"SmolLM2-135M-Instruct-{t.upper()}.gguf" for t in ("F16", *types)}
    with tc.install_lock(f"test-artifacts-{toolchain.version}"):
        if not paths["F16"].is_file():
            tc.convert_to_gguf(test_model.hf_dir, paths["F16"], "f16", toolchain=toolchain, vllm=vllm)
        for quant, path in paths.items():
            if not path.is_file():
                tc.quantize_gguf(paths["F16"], path, quant, toolchain=toolchain)
    return {t.upper(): paths[t.upper()] for t in types}
