"""cortex.artifacts on the real parts: the pinned convert_hf_to_gguf.py (run with the vLLM
virtualenv's Python) and llama-quantize, the SmolLM2-135M-Instruct HF checkpoint, the gguf
reader, real tmpfs mounts for a full disk, a real SIGKILL for a crashed build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cortex import artifacts as art
from cortex.hub import NotEnoughSpace
from cache_helpers import linked_cortex_cache
from hubserver import sha256_file

SOURCE_ID = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cortex_cache(tmp_path, monkeypatch) -> Path:
    cache = linked_cortex_cache(tmp_path)
    monkeypatch.setenv("CORTEX_CACHE", str(cache))
    return cache


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{len(mounted)}"
        where.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
        )
        assert result.returncode == 0, (
            f"this test needs a tmpfs mount (run as root, or with CAP_SYS_ADMIN): {result.stderr}"
        )
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _build(test_model, toolchain, store, quant="Q8_0", **kw):
    steps: list[tuple[str, bool]] = []
    lines: list[str] = []
    result = art.build_gguf(
        Path(test_model.hf_dir),
        source_id=SOURCE_ID,
        quantization=quant,
        toolchain=toolchain,
        model_name="SmolLM2-135M-Instruct",
        architecture="llama",
        source={"kind": "hf_dir"},
        weights_bytes=(Path(test_model.hf_dir) / "model.safetensors").stat().st_size,
        store=store,
        log=lines.append,
        on_step=lambda name, a, built: steps.append((name, built)),
        **kw,
    )
    return result, steps, lines


def test_the_converter_table_is_what_the_installed_converter_registers(toolchain):
    """The committed data equals what convert_hf_to_gguf.py and conversion/*.py register."""
    parsed = art.read_converter_architectures(toolchain.convert_script.parent)
    assert parsed == art.converter_architectures(toolchain.version), (
        "cortex/data/converter-architectures.json is stale for this toolchain; regenerate it with "
        "python -c 'from cortex.artifacts import write_converter_table; write_converter_table()'"
    )
    assert parsed["LlamaForCausalLM"] == "llama" and parsed["GptOssForCausalLM"] == "gpt-oss"
    with pytest.raises(art.UnsupportedArchitecture, match="CortexNovelForCausalLM.*vLLM"):
        art.gguf_architecture_for(["CortexNovelForCausalLM"], toolchain.version)


def test_convert_quantize_verify_then_reuse(test_model, toolchain, vllm_install, cortex_cache, monkeypatch):
    """F16 by convert_hf_to_gguf.py, Q8_0 by llama-quantize, both checked by the gguf reader;
    the second call builds nothing; list and prune through the CLI."""
    store = art.ArtifactStore()
    (f16, q8), steps, lines = _build(test_model, toolchain, store)
    assert steps == [("F16", True), ("Q8_0", True)]
    assert (f16.gguf.architecture, f16.gguf.file_type) == ("llama", "F16")
    assert (q8.gguf.file_type, q8.gguf.tensor_count) == ("Q8_0", f16.gguf.tensor_count)
    for a in (f16, q8):
        assert a.folder.parent == store.root and a.folder.name == a.key.digest
        assert sha256_file(a.model_file) == a.files[0].sha256
        manifest = json.loads((a.folder / "manifest.json").read_text())
        assert manifest["key"]["toolchain_version"] == toolchain.version
        assert manifest["steps"][0]["exit_code"] == 0
    assert q8.source["quantized_from"]["sha256"] == f16.files[0].sha256
    assert any("llama_model_quantize" in line or "model size" in line for line in lines)  # streamed tool output
    assert not list(store.root.glob(".build-*"))

    # The second call runs no tool: any run of the converter or llama-quantize goes through
    # run_streamed, which here fails the test.
    def no_tool(cmd, *args, **kwargs):
        raise AssertionError(f"a cached build ran {cmd}")

    mtime = q8.model_file.stat().st_mtime_ns
    with monkeypatch.context() as patched:
        patched.setattr(art, "run_streamed", no_tool)
        again, steps, lines = _build(test_model, toolchain, store)
    assert steps == [("Q8_0", False)] and again[0].files == q8.files
    assert lines == [] and q8.model_file.stat().st_mtime_ns == mtime  # nothing logged, nothing rewritten

    listing = subprocess.run(
        [sys.executable, "-m", "cli", "cache", "list", "--json"], capture_output=True, text=True, check=True
    )
    rows = json.loads(listing.stdout)["artifacts"]
    assert {(r["quantization"], r["bytes"]) for r in rows} == {("F16", f16.total_bytes), ("Q8_0", q8.total_bytes)}
    subprocess.run(
        [sys.executable, "-m", "cli", "cache", "prune", "--key", f16.key.digest[:10]],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [a.key.quantization for a in store.list()] == ["Q8_0"]


def test_a_changed_artifact_is_refused(test_model, toolchain, vllm_install, cortex_cache):
    store = art.ArtifactStore()
    (f16,), _, _ = _build(test_model, toolchain, store, quant="F16")
    with open(f16.model_file, "r+b") as f:
        f.seek(f16.files[0].bytes // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(art.ArtifactError, match="damaged.*cortex cache prune"):
        store.get(f16.key)


def test_too_little_space_is_refused_before_the_converter_runs(test_model, toolchain, tmpfs, cortex_cache):
    """A real 50 MB tmpfs: the F16 file (about 270 MB) cannot fit."""
    store = art.ArtifactStore(tmpfs("50M"))
    with pytest.raises(NotEnoughSpace) as err:
        _build(test_model, toolchain, store, predicted_bytes={"F16": 270_000_000})
    assert str(store.root) in str(err.value) and "270000000" in str(err.value)
    assert list(store.root.iterdir()) == []


def test_a_disk_that_fills_up_during_conversion_leaves_nothing_behind(
    test_model, toolchain, vllm_install, tmpfs, cortex_cache
):
    """The space check passes (400 MB free), then another writer fills the disk while the
    converter writes: it fails with ENOSPC, the build folder goes, the cache stays empty."""
    store = art.ArtifactStore(tmpfs("400M"))
    filler = store.root / "someone-else.bin"

    def fill_when_the_build_starts() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(store.root.glob(".build-*")):
            time.sleep(0.01)
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass

    thread = threading.Thread(target=fill_when_the_build_starts, daemon=True)
    thread.start()
    with pytest.raises(NotEnoughSpace, match="filled up"):
        _build(test_model, toolchain, store, quant="F16", predicted_bytes={"F16": 270_000_000})
    thread.join()
    assert sorted(p.name for p in store.root.iterdir()) == ["someone-else.bin"]


_BUILD = """
import sys
from pathlib import Path
from cortex import artifacts as art
from cortex.toolchain import find_toolchain, find_test_model
m = find_test_model()
art.build_gguf(Path(m.hf_dir), source_id=sys.argv[1], quantization="F16", toolchain=find_toolchain(),
               model_name="SmolLM2", architecture="llama", source={}, weights_bytes=270_000_000)
"""


def test_a_killed_build_leaves_no_artifact_and_prune_clears_it(test_model, toolchain, vllm_install, cortex_cache):
    """SIGKILL to the building process (and its converter) while the GGUF is being written."""
    store = art.ArtifactStore()
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILD, SOURCE_ID],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        partial = list(store.root.glob(".build-*/*.gguf"))
        if partial and partial[0].stat().st_size > 10_000_000:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the converter never wrote 10 MB")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.list() == [] and store.get(art.ArtifactKey(SOURCE_ID, "F16", toolchain.version)) is None
    assert len(store.stale_builds()) == 1
    out = subprocess.run(
        [sys.executable, "-m", "cli", "cache", "prune", "--stale-builds"], capture_output=True, text=True, check=True
    )
    assert "leftover build" in out.stdout
    assert not list(store.root.glob(".build-*"))
