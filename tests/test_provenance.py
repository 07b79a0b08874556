"""The provenance record (cortex/provenance.py) without Prefect: built from a real prepared GGUF
(SmolLM2, pinned and hashed as the prepare flow does), its real plan and launch; what changed
between two records, in words; and how records are kept on disk (atomically, the previous one
kept, an unreadable or other-version one kept byte for byte and said so)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cortex import hub
from cortex.facts import gguf_facts
from cortex.hardware import Inventory
from cortex.launch import build_launch
from cortex.plan import make_plan
from cortex.prepared import Prepared, pin_source, source_file_records, source_gguf_files
from cortex.probe import CheckResult, SmokeResult
from cortex.provenance import (
    ProvenanceError,
    ProvenanceRecord,
    build_record,
    describe_changes,
    keep_record,
    previous_path,
    read_record,
    read_record_json,
    record_markdown,
    record_path,
)
from cortex.quality import QualityReport
from cortex.runtime.base import EngineIdentity
from cortex.runtime.rollout import BenchmarkSummary, DeployResult, LevelSummary
from cortex.spec import ModelSpec

CPU = Inventory(cpu_cores=8, ram_bytes=32 * 2**30, source="declared")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _record(gguf: Path, context: int = 1024, *extra_args: str, reused: bool = False) -> ProvenanceRecord:
    """The record of a deploy of the SmolLM2 GGUF as it is, made the way the deploy flow makes it."""
    spec = ModelSpec.model_validate(
        {
            "name": "smollm2",
            "source": {"gguf": str(gguf)},
            "resources": {"concurrency": 1, "context_length": context},
            "llamacpp": {"extra_args": list(extra_args)},
        }
    )
    resolved = pin_source(spec.source)
    plan = make_plan(spec, gguf_facts(gguf), CPU)
    loads = source_gguf_files(resolved, None)
    prepared = Prepared(
        name=spec.name,
        engine=plan.engine,
        format=plan.artifact.format,
        quantization=plan.artifact.quantization.upper(),
        source=resolved.provenance(),
        source_revision=resolved.source_id,
        artifact_path=loads.path,
        files=loads.files,
        cached=True,
        downloaded_bytes=0,
        resumed_bytes=0,
        built=[],
        predicted_bytes={},
        plan=plan,
        source_files=source_file_records(resolved, None),
        toolchain=loads.toolchain,
    )
    launch = build_launch(spec, plan, loads.path)
    smoke = SmokeResult(
        endpoint="http://127.0.0.1:1",
        model="smollm2",
        task="generate",
        passed=True,
        checks=[CheckResult(name="chat", passed=True, detail="ok", seconds=0.1)],
    )
    result = DeployResult(
        name="smollm2",
        engine=plan.engine,
        runtime="process",
        endpoint="http://127.0.0.1:1",
        replica=launch.name,
        smoke=smoke,
        reused=reused,
        benchmark=BenchmarkSummary(
            levels=[
                LevelSummary(concurrency=1, output_tokens_per_s=140.0, requests_per_s=1.0, ttft_ms_p50=20.0, errors=0)
            ]
        ),
    )
    server = Path("/usr/bin/true")  # stands for the program the process runtime ran
    identity = EngineIdentity(program=str(server), program_sha256=hub.verified_digest(server))
    return build_record(prepared, launch, result, identity, memory={"engine": "llamacpp", "warnings": []})


def test_the_record_holds_what_made_the_deployment(test_model, home: Path) -> None:
    gguf = Path(test_model.gguf)
    record = _record(gguf)
    digest = hub.sha256_of(gguf)
    assert record.schema_version == 1 and record.name == "smollm2"
    assert record.source.kind == "gguf_file" and record.source.source_id == digest
    assert [(f.name, f.bytes, f.sha256) for f in record.source.files] == [(gguf.name, gguf.stat().st_size, digest)]
    assert record.artifact.format == "gguf" and record.artifact.quantization == "Q4_1"
    assert record.artifact.gguf_sha256 == digest
    assert record.toolchain is None  # a GGUF used as it is: no toolchain made it
    assert record.engine.engine == "llamacpp" and record.engine.image == record.launch["image"]
    assert record.engine.program == "/usr/bin/true" and len(record.engine.program_sha256 or "") == 64
    assert record.launch["command"][:1] == ["llama-server"] and "-c" in record.launch["command"]
    assert record.plan["context"] == 1024 and record.plan["artifact"]["quantization"] == "Q4_1"
    assert record.smoke.passed and record.benchmark and record.memory == {"engine": "llamacpp", "warnings": []}

    assert keep_record(record) == ["first record"]
    stored = json.loads(record_path("smollm2").read_text())
    assert stored == record.to_json() and stored["schema_version"] == 1
    assert read_record("smollm2") == record and read_record_json("smollm2") == stored
    assert not previous_path("smollm2").exists()
    markdown = record_markdown(record, ["first record"])
    assert "- first record" in markdown and f"`{digest}`" in markdown and "c=1: 140.0 tok/s" in markdown


def test_what_changed_is_said_in_words(test_model, home: Path) -> None:
    gguf = Path(test_model.gguf)
    old = _record(gguf)
    assert describe_changes(None, old) == ["first record"]
    assert describe_changes(old, old) == []
    assert describe_changes(old, _record(gguf)) == []  # the same deploy again: nothing changed

    # A real re-plan: twice the context, with a flag added by extra_args.
    bigger = _record(gguf, 2048, "--check-tensors")
    changes = describe_changes(old, bigger)
    assert "launch: -c 1024→2048" in changes and "launch: --check-tensors added" in changes
    assert "plan: context 1024→2048" in changes
    kv = next(c for c in changes if c.startswith("plan: devices[cpu].kv_cache_bytes"))
    assert kv == "plan: devices[cpu].kv_cache_bytes 22.50 MiB→45.00 MiB"
    assert describe_changes(bigger, old)[:2] == ["launch: -c 2048→1024", "launch: --check-tensors removed"]

    # The host's free memory is not the plan's choice: a capacity that moved is no change.
    plan = json.loads(json.dumps(old.plan))
    plan["devices"][0]["capacity_bytes"] += 2**30
    assert describe_changes(old, old.model_copy(update={"plan": plan})) == []

    # A new Hub commit with a changed file, a new toolchain, another quant type, a moved image.
    a, b, sha_a, sha_b = "a" * 40, "b" * 40, "1" * 64, "2" * 64
    hub_old = old.model_copy(
        update={
            "source": old.source.model_copy(update={"kind": "hf_repo", "repo": "acme/smol", "commit": a}),
            "toolchain": "0.3.36-0c1e57098",
            "engine": old.engine.model_copy(update={"image_id": "sha256:" + sha_a}),
        }
    )
    files = [f.model_copy(update={"sha256": sha_b}) for f in old.source.files]
    plan = json.loads(json.dumps(old.plan))
    plan["artifact"]["quantization"] = "Q6_K"
    hub_new = hub_old.model_copy(
        update={
            "source": hub_old.source.model_copy(update={"commit": b, "files": files}),
            "artifact": old.artifact.model_copy(update={"quantization": "Q6_K", "files": files}),
            "toolchain": "0.3.40-1234567",
            "engine": hub_old.engine.model_copy(update={"image_id": "sha256:" + sha_b}),
            "plan": plan,
        }
    )
    assert describe_changes(hub_old, hub_new) == [
        f"Hub commit {a[:12]}→{b[:12]}",
        f"source file {gguf.name} sha256 {old.source.files[0].sha256[:12]}→{sha_b[:12]}",
        "artifact gguf Q4_1→gguf Q6_K",
        f"GGUF sha256 {old.artifact.gguf_sha256[:12]}→{sha_b[:12]}",
        "toolchain 0.3.36-0c1e57098→0.3.40-1234567",
        f"engine image id {sha_a[:12]}→{sha_b[:12]}",
        "plan: quant Q4_1→Q6_K",
    ]


def test_records_are_kept_with_the_previous_one(test_model, home: Path) -> None:
    gguf = Path(test_model.gguf)
    first, second = _record(gguf), _record(gguf, 2048)
    keep_record(first)
    assert "plan: context 1024→2048" in keep_record(second)
    assert read_record("smollm2") == second
    assert read_record("smollm2", previous_path("smollm2")) == first

    # A file this Cortex cannot read as a record: kept byte for byte as the previous one, and said.
    for bad, why in ((b"{not json", "not JSON"), (json.dumps({"schema_version": 2}).encode(), "schema_version 2")):
        record_path("smollm2").write_bytes(bad)
        with pytest.raises(ProvenanceError, match=why):
            read_record("smollm2")
        [note] = keep_record(first)
        assert note.startswith("the previous record could not be compared") and why in note
        assert "smollm2.prev.json" in note and previous_path("smollm2").read_bytes() == bad
        assert read_record("smollm2") == first
    record_path("smollm2").write_bytes(b"{not json")
    assert "is not JSON" in read_record_json("smollm2")["problem"]


def test_a_reused_replica_keeps_its_quality_check(test_model, home: Path) -> None:
    gguf = Path(test_model.gguf)
    quality = QualityReport(
        reference_label="F16",
        candidate_label="Q4_1",
        prompts=4,
        tokens_per_prompt=16,
        positions=64,
        agreements=60,
        top1_agreement=60 / 64,
        identical_continuations=0.5,
        mean_first_divergence=8.0,
    )
    keep_record(_record(gguf).model_copy(update={"quality": quality}))
    assert keep_record(_record(gguf, reused=True)) == []
    assert read_record("smollm2").quality == quality  # not measured again, still true of the replica
