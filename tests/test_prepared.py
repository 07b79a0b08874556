"""The core of the prepare flow (cortex/prepared.py) without Prefect: pinning a source (a real
huggingface_hub client against the local Hub endpoint of tests/hubserver.py, or local files),
the space a prepare needs, the files an engine loads, and the result and its report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cortex import hub
from cortex.artifacts import gguf_build_types, local_source_id, predict_build_bytes
from cortex.facts import gguf_facts
from cortex.hardware import Inventory
from cortex.plan import make_plan
from cortex.prepared import (
    Prepared,
    ResolvedSource,
    hf_checkpoint_files,
    hub_files_needed,
    pin_source,
    plan_json,
    render_report,
    source_facts,
    source_gguf_files,
    space_needed,
)
from cortex.spec import ModelSpec
from cache_helpers import linked_cortex_cache
from hubserver import HubRepo, HubServer

REPO = "acme/smollm2-135m-instruct"
CPU = Inventory(cpu_cores=8, ram_bytes=32 * 2**30, source="declared")


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fresh HF and artifact caches; the toolchain stays where `./dev setup` put it."""
    monkeypatch.setenv("CORTEX_CACHE", str(linked_cortex_cache(tmp_path)))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _linked_checkpoint(hf_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    for src in hf_dir.iterdir():
        if src.is_file() and not src.name.startswith("."):
            os.symlink(src, folder / src.name)
    return folder


def _spec(source: dict, **more) -> ModelSpec:
    return ModelSpec.model_validate({"name": "smollm2", "source": source, **more})


def test_a_hub_repo_is_pinned_with_its_small_files_and_the_space_counts_download_and_builds(
    test_model, toolchain, caches, monkeypatch
):
    """Client paths: resolve_revision, model_info and snapshot_download of the small files only;
    the weights stay on the server until the download step."""
    folder = _linked_checkpoint(Path(test_model.hf_dir), caches / "repo")
    (folder / "README.md").write_text("not part of the checkpoint\n")
    repo = HubRepo.from_folder(REPO, folder)
    spec = _spec({"repo": REPO}, engine="llamacpp", quantization="Q8_0")
    with HubServer([repo]) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        said: list[str] = []
        resolved = pin_source(spec.source, log=said.append)
        commit = repo.refs["main"]
        assert (resolved.kind, resolved.repo, resolved.revision) == ("hf_repo", REPO, "main")
        assert resolved.commit == resolved.source_id == commit and resolved.on_hub
        assert said == [f"{REPO}@main is commit {commit}"]
        fetched = {p.name for p in Path(resolved.folder).iterdir()}
        assert "config.json" in fetched and fetched <= set(hub.SMALL_HF_FILES)
        assert server.gets_of("model.safetensors") == []
        needed = {f.path for f in hub_files_needed(spec.source, commit)}
        assert "model.safetensors" in needed and "README.md" not in needed

        facts = source_facts(resolved)
        plan = make_plan(spec, facts, CPU)
        assert plan.artifact.convert_from == "hf"
        predicted = predict_build_bytes(facts, "Q8_0")
        assert list(predicted) == gguf_build_types("Q8_0") == ["F16", "Q8_0"]
        assert predicted["Q8_0"] == plan.artifact.predicted_bytes  # one prediction, in the plan and the flow
        needs = space_needed(spec.source, resolved, facts, plan)
    assert [what for _, _, what in needs] == ["the download", "the F16 GGUF", "the Q8_0 GGUF"]
    weights = (folder / "model.safetensors").stat().st_size
    assert needs[0][0] == hub.hub_cache_dir() and needs[0][1] >= weights
    assert [size for _, size, _ in needs[1:]] == [predicted["F16"], predicted["Q8_0"]]


def test_a_hub_repo_without_config_json_is_not_an_hf_checkpoint(test_model, caches, monkeypatch):
    folder = caches / "ggufs"
    folder.mkdir()
    os.symlink(test_model.gguf, folder / "smollm2.Q4_1.gguf")
    with HubServer([HubRepo.from_folder("acme/ggufs", folder)]) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(hub.HubError, match="has no config.json: not an HF checkpoint"):
            pin_source(_spec({"repo": "acme/ggufs"}).source)


def test_a_local_checkpoint_is_pinned_by_its_model_files_and_loaded_as_a_folder(test_model, caches):
    folder = _linked_checkpoint(Path(test_model.hf_dir), caches / "local")
    (folder / "README.md").write_text("one\n")
    (folder / ".notes").write_text("hidden\n")
    resolved = pin_source(_spec({"path": str(folder)}, engine="vllm").source)
    model_files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".json", ".txt", ".jinja", ".model")]
    assert (resolved.kind, resolved.folder, resolved.commit) == ("hf_dir", str(folder), None)
    assert resolved.source_id == local_source_id(model_files) and not resolved.on_hub
    (folder / "README.md").write_text("two\n")  # not a model file: the id stays
    assert pin_source(_spec({"path": str(folder)}).source).source_id == resolved.source_id

    loads = hf_checkpoint_files(resolved, None)
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert loads.path == folder and loads.mount_root is None
    assert [Path(f["path"]).name for f in loads.files] == names
    for f in loads.files:
        assert f["sha256"] == hub.sha256_of(Path(f["path"])) and f["bytes"] == Path(f["path"]).stat().st_size


def test_a_local_gguf_is_pinned_by_its_sha256_and_a_split_set_needs_every_part(test_model, caches):
    gguf = Path(test_model.gguf)
    resolved = pin_source(_spec({"gguf": str(gguf)}).source)
    assert resolved.gguf_files == [str(gguf)] and resolved.source_id == hub.sha256_of(gguf)
    loads = source_gguf_files(resolved, None)
    assert loads.path == gguf
    assert loads.files == [{"path": str(gguf), "bytes": gguf.stat().st_size, "sha256": resolved.source_id}]

    first = caches / "big-00001-of-00002.gguf"
    os.symlink(gguf, first)
    with pytest.raises(hub.HubError, match="big-00002-of-00002.gguf"):
        pin_source(_spec({"gguf": str(first)}).source)


def test_prepared_to_json_and_the_report(test_model, tmp_path):
    gguf = Path(test_model.gguf)
    facts = gguf_facts(gguf)
    plan = make_plan(_spec({"gguf": str(gguf)}), facts, CPU)
    resolved = ResolvedSource("gguf_file", None, None, None, "f" * 64, None, [str(gguf)])
    files = [
        {"path": str(tmp_path / "smollm2-F16.gguf"), "bytes": 1010, "sha256": "a" * 64},
        {"path": str(tmp_path / "smollm2-Q8_0.gguf"), "bytes": 495, "sha256": "b" * 64},
    ]
    parts = [tmp_path / "x-00001-of-00002.gguf", tmp_path / "x-00002-of-00002.gguf"]
    prepared = Prepared(
        name="smollm2",
        engine=plan.engine,
        format="gguf",
        quantization="Q8_0",
        source=resolved.provenance(),
        source_revision=resolved.source_id,
        artifact_path=parts,
        files=files,
        cached=False,
        downloaded_bytes=0,
        resumed_bytes=0,
        built=["F16", "Q8_0"],
        predicted_bytes={"F16": 1000, "Q8_0": 500},
        plan=plan,
        facts=facts.summary(),
        build_steps=[{"what": "llama-quantize", "command": ["llama-quantize"], "exit_code": 0, "seconds": 1.5}],
    )
    out = json.loads(json.dumps(prepared.to_json()))
    assert list(out) == [
        "name",
        "engine",
        "format",
        "quantization",
        "source",
        "source_revision",
        "artifact_path",
        "mount_root",
        "files",
        "cached",
        "downloaded_bytes",
        "resumed_bytes",
        "built",
        "build_steps",
        "predicted_bytes",
        "plan",
        "source_files",
        "toolchain",
    ]
    assert out["source"] == {"kind": "gguf_file", "source_id": "f" * 64, "gguf_files": [str(gguf)]}
    assert out["artifact_path"] == [str(p) for p in parts] and out["mount_root"] is None
    assert out["build_steps"][0]["exit_code"] == 0 and out["files"] == files
    assert out["plan"] == plan_json(plan)
    assert out["plan"]["artifact"]["format"] == "gguf" and out["plan"]["decision"]["trace"]
    assert {k: out["plan"][k] for k in plan.to_json()} == json.loads(json.dumps(plan.to_json()))

    report = render_report(prepared)
    assert report.startswith("# Prepared `smollm2`")
    assert f"- **source**: gguf_file `{gguf}` → `{'f' * 64}`" in report
    assert "built: F16, Q8_0" in report
    assert f"| `smollm2-F16.gguf` | 1010 | 1000 (+1.00%) | `{'a' * 64}` |" in report
    assert f"| `smollm2-Q8_0.gguf` | 495 | 500 (-1.00%) | `{'b' * 64}` |" in report
    assert f"| architecture | `{facts.architecture}` |" in report
    assert f"## Decision: {plan.engine}" in report and "## Plan" in report
