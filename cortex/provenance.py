"""The provenance record of a deployment: exactly what runs, where it came from, how it was
started and how it did, kept beside the deployment's other state and compared with the last one.

    build_record(...)            -> ProvenanceRecord   the Hub commit and every source file's sha256,
                                                       the loaded GGUF's sha256 and quant type, the
                                                       toolchain, the engine version and image id (or
                                                       program sha256), the full launch, the plan, the
                                                       smoke / benchmark / quality results, planned
                                                       against actual memory
    describe_changes(old, new)   -> list[str]          what changed, in words ("Hub commit abc→def")
    keep_record(record)          -> list[str]          write it, keep the one it replaces, say what changed

One record per served model name, in `<CORTEX_HOME>/provenance/<name>.json`, written atomically
(cortex.fileio); the record it replaces is kept as `<name>.prev.json`. One previous record, not a
history: a redeploy compares with the last deployment only, every run's record stays in Prefect as
the `provenance-<model>` artifact (its versions are the history), and a folder of records that
only grows would need its own pruning. A retired model keeps its record, so deploying it again
says what changed since it last ran.

The record is schema-versioned (`schema_version`): a file of another version, or one that is not
a record, is never overwritten without being kept as the previous record, and the change list
says it could not be compared.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from cortex.fileio import atomic_write_bytes, atomic_write_json
from cortex.launch import LaunchSpec
from cortex.prepared import FileRecord, Prepared, plan_json
from cortex.probe import SmokeResult
from cortex.quality import QualityReport
from cortex.runtime.base import EngineIdentity
from cortex.runtime.rollout import BenchmarkSummary, DeployResult
from cortex.spec import format_bytes

SCHEMA_VERSION = 1
ARROW = "→"


class ProvenanceError(Exception):
    """A stored record cannot be read as a provenance record of this schema version."""


class FileDigest(BaseModel):
    name: str  # relative to the folder the files share (a snapshot's file path, a GGUF's name)
    path: str
    bytes: int
    sha256: str


class SourceRecord(BaseModel):
    kind: str  # hf_repo | hf_dir | gguf_file | gguf_repo
    repo: str | None = None
    revision: str | None = None  # as the spec names it
    commit: str | None = None  # what the revision resolved to (Hub sources)
    source_id: str  # the commit, or the sha256 of the local files
    files: list[FileDigest] = Field(default_factory=list)


class ArtifactRecord(BaseModel):
    format: str  # gguf | hf
    quantization: str
    files: list[FileDigest] = Field(default_factory=list)  # what the engine loads

    @property
    def gguf_sha256(self) -> str | None:
        """The sha256 of the GGUF the engine loads (its first part, for a split set)."""
        return self.files[0].sha256 if self.format == "gguf" and self.files else None


class EngineRecord(BaseModel):
    engine: str  # llamacpp | vllm
    version: str
    image: str  # the launch's image tag
    image_id: str | None = None  # docker: the image's id on the host
    program: str | None = None  # process: the program that ran
    program_sha256: str | None = None


class ProvenanceRecord(BaseModel):
    """Everything that made one deployment what it is. `to_json()` is what `cortex status --json`
    shows under `provenance` and what the file holds."""

    schema_version: Literal[1] = 1  # SCHEMA_VERSION
    name: str  # the served model name
    replica: str
    runtime: str
    endpoint: str
    recorded_at: str
    reused: bool = False  # the same launch already served: tested again, not restarted
    spec_path: str | None = None
    spec_sha256: str | None = None
    source: SourceRecord
    artifact: ArtifactRecord
    toolchain: str | None = None  # the llama.cpp toolchain that built the GGUF; None: nothing was built
    engine: EngineRecord
    launch: dict[str, Any]  # LaunchSpec.to_json(): image, command (every flag), env (secrets by name), mounts
    plan: dict[str, Any]  # cortex.prepared.plan_json: the plan with its artifact and decision trace
    smoke: SmokeResult
    benchmark: BenchmarkSummary | None = None
    quality: QualityReport | None = None
    memory: dict[str, Any] | None = None  # cortex.actual.MemoryComparison.to_json(): planned against actual

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _digests(records: list[FileRecord]) -> list[FileDigest]:
    paths = [Path(r["path"]) for r in records]
    if not paths:
        return []
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return [
        FileDigest(name=str(p.relative_to(root)), path=str(p), bytes=int(r["bytes"]), sha256=r["sha256"])
        for p, r in zip(paths, records)
    ]


def build_record(
    prepared: Prepared,
    launch: LaunchSpec,
    result: DeployResult,
    identity: EngineIdentity,
    *,
    memory: dict[str, Any] | None = None,
    spec_path: str | None = None,
    spec_sha256: str | None = None,
    recorded_at: str | None = None,
) -> ProvenanceRecord:
    """The record of a finished deploy: what `prepare` made (`prepared`), how it was started
    (`launch`, and `identity` from the runtime), what the rollout measured (`result`), and the
    memory comparison kept with the replica (cortex.actual)."""
    path = prepared.artifact_path
    loaded = {str(p) for p in path} if isinstance(path, list) else {str(path)}
    artifact_files = [f for f in prepared.files if f["path"] in loaded]
    if not artifact_files:  # an HF folder: the engine loads every file prepared for it
        artifact_files = prepared.files
    src = prepared.source
    return ProvenanceRecord(
        name=result.name,
        replica=result.replica,
        runtime=result.runtime,
        endpoint=result.endpoint,
        recorded_at=recorded_at or datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        reused=result.reused,
        spec_path=spec_path,
        spec_sha256=spec_sha256,
        source=SourceRecord(
            kind=src["kind"],
            repo=src.get("repo"),
            revision=src.get("revision"),
            commit=src.get("commit"),
            source_id=prepared.source_revision,
            files=_digests(prepared.source_files or prepared.files),
        ),
        artifact=ArtifactRecord(
            format=prepared.format, quantization=prepared.quantization, files=_digests(artifact_files)
        ),
        toolchain=prepared.toolchain,
        engine=EngineRecord(
            engine=launch.engine,
            version=launch.engine_version,
            image=launch.image,
            image_id=identity.image_id,
            program=identity.program,
            program_sha256=identity.program_sha256,
        ),
        launch=launch.to_json(),
        plan=json.loads(json.dumps(plan_json(prepared.plan), default=str)),
        smoke=result.smoke,
        benchmark=result.benchmark,
        quality=result.quality,
        memory=memory,
    )


# ----------------------------------------------------------------------------- what changed


def _short(value: Any) -> str:
    """A value as the change list shows it: digests cut to 12 characters, None as "none"."""
    if value is None:
        return "none"
    text = str(value).removeprefix("sha256:")
    if len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text):
        return text[:12]
    return text


def _changed(what: str, old: Any, new: Any) -> list[str]:
    return [] if old == new else [f"{what} {_short(old)}{ARROW}{_short(new)}"]


def _file_changes(what: str, old: list[FileDigest], new: list[FileDigest]) -> list[str]:
    before, after = {f.name: f.sha256 for f in old}, {f.name: f.sha256 for f in new}
    out = []
    for name in sorted(before.keys() | after.keys()):
        if name not in before:
            out.append(f"{what} {name} added (sha256 {_short(after[name])})")
        elif name not in after:
            out.append(f"{what} {name} removed")
        elif before[name] != after[name]:
            out.append(f"{what} {name} sha256 {_short(before[name])}{ARROW}{_short(after[name])}")
    return out


def _source_changes(old: SourceRecord, new: SourceRecord) -> list[str]:
    out = _changed("source", old.kind, new.kind) + _changed("Hub repo", old.repo, new.repo)
    out += _changed("revision", old.revision, new.revision)
    if old.commit or new.commit:
        out += _changed("Hub commit", old.commit, new.commit)
    else:
        out += _changed("source sha256", old.source_id, new.source_id)
    return out + _file_changes("source file", old.files, new.files)


def _artifact_changes(old: ArtifactRecord, new: ArtifactRecord) -> list[str]:
    out = _changed("artifact", f"{old.format} {old.quantization}", f"{new.format} {new.quantization}")
    if old.gguf_sha256 or new.gguf_sha256:
        out += _changed("GGUF sha256", old.gguf_sha256, new.gguf_sha256)
    return out


def _engine_changes(old: EngineRecord, new: EngineRecord) -> list[str]:
    out = _changed("engine", old.engine, new.engine) + _changed("engine version", old.version, new.version)
    out += _changed("engine image", old.image, new.image) + _changed("engine image id", old.image_id, new.image_id)
    out += _changed("engine program", old.program, new.program)
    return out + _changed("engine program sha256", old.program_sha256, new.program_sha256)


def _flags(command: list[str]) -> dict[str, str]:
    """argv as flag -> its values (the words up to the next flag); the words before the first
    flag (the program) under ""."""
    flags: dict[str, list[str]] = {"": []}
    current = ""
    for word in map(str, command):
        if word.startswith("-") and len(word) > 1 and not _is_number(word):
            current, _, value = word.partition("=")  # --flag=value is --flag value
            flags.setdefault(current, [])
            if value:
                flags[current].append(value)
        else:
            flags[current].append(word)
    return {k: " ".join(v) for k, v in flags.items()}


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _launch_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    before, after = _flags(old.get("command") or []), _flags(new.get("command") or [])
    out = []
    for flag in [*before, *(f for f in after if f not in before)]:
        label = flag or "program"
        if flag not in after:
            out.append(f"launch: {label} removed")
        elif flag not in before:
            out.append(f"launch: {label} {after[flag]} added".replace("  ", " "))
        elif before[flag] != after[flag]:
            out.append(f"launch: {label} {before[flag] or '(set)'}{ARROW}{after[flag] or '(set)'}")
    old_env, new_env = old.get("env") or {}, new.get("env") or {}
    for key in sorted(old_env.keys() | new_env.keys()):
        out += _changed(f"launch: env {key}", old_env.get(key), new_env.get(key))
    return out + _changed("launch: gpus", old.get("gpus"), new.get("gpus"))


# Plan keys the change list leaves out: explanations, not settings (the decision's engine is
# the plan's `engine`, the quant type its artifact's), and each device's capacity, which is the
# host's free memory at planning time (it moves between any two runs; what the plan does with
# it shows in the plan's own choices)
_PLAN_PROSE = {"decision", "warnings", "suggestions", "shortfall", "quantization"}
_PLAN_HOST_STATE = {"capacity_bytes"}
_PLAN_WORDS = {"artifact.quantization": "quant", "artifact.format": "format"}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not prefix and key in _PLAN_PROSE:
                continue
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "device" in v for v in value):
        out = {}
        for item in value:
            kept = {k: v for k, v in item.items() if k != "device" and k not in _PLAN_HOST_STATE}
            out.update(_flatten(kept, f"{prefix}[{item['device']}]"))
        return out
    return {prefix: value}


def _plan_value(key: str, value: Any) -> Any:
    if key.endswith("_bytes") and isinstance(value, int):
        return format_bytes(value)
    return value


def _plan_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    before, after = _flatten(old), _flatten(new)
    out = []
    for key in [*before, *(k for k in after if k not in before)]:
        if before.get(key) != after.get(key):
            word = _PLAN_WORDS.get(key, key)
            out += _changed(f"plan: {word}", _plan_value(key, before.get(key)), _plan_value(key, after.get(key)))
    return out


def describe_changes(old: ProvenanceRecord | None, new: ProvenanceRecord) -> list[str]:
    """What makes `new` a different deployment from `old`, one line per change, in the order
    source, artifact, toolchain, engine, runtime, spec file, launch, plan; ["first record"]
    without an old one, [] when nothing that decides the deployment changed (the results of
    its tests are measured again every time and are not changes)."""
    if old is None:
        return ["first record"]
    out = _source_changes(old.source, new.source) + _artifact_changes(old.artifact, new.artifact)
    out += _changed("toolchain", old.toolchain, new.toolchain) + _engine_changes(old.engine, new.engine)
    out += _changed("runtime", old.runtime, new.runtime)
    if old.spec_sha256 and new.spec_sha256:
        out += _changed("spec file sha256", old.spec_sha256, new.spec_sha256)
    return out + _launch_changes(old.launch, new.launch) + _plan_changes(old.plan, new.plan)


# ----------------------------------------------------------------------------- on disk


def provenance_dir() -> Path:
    from cortex.settings import Settings

    return Path(Settings.load().home) / "provenance"


def record_path(name: str) -> Path:
    return provenance_dir() / f"{name}.json"


def previous_path(name: str) -> Path:
    return provenance_dir() / f"{name}.prev.json"


def read_record_json(name: str) -> dict[str, Any] | None:
    """The model's record as stored (any schema version), for `cortex status --json`; None if
    there is none; {"problem": ...} if the file is not JSON."""
    path = record_path(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as exc:
        return {"problem": f"{path} is not JSON ({exc}); the next deploy keeps it as {previous_path(name).name}"}
    return data


def replica_version(model: str, replica: str, host: str | None = None) -> tuple[str | None, str | None]:
    """(spec sha256, source id) of the deployment `replica` of `model`, from the model's record;
    (None, None) when the record is missing, unreadable or of another replica (a newer deploy).
    On a fleet `host`, the record of another instance of the same launch counts: the host keeps
    one record per model, of its last deploy, and instances of one launch run the same version."""
    from cortex.runtime.rollout import same_launch

    data = read_record_json(model)
    if not data:
        return None, None
    recorded = data.get("replica")
    if recorded != replica and not (isinstance(recorded, str) and host and same_launch(recorded, replica, host)):
        return None, None
    source = data.get("source")
    return data.get("spec_sha256"), source.get("source_id") if isinstance(source, dict) else None


def read_record(name: str, path: Path | None = None) -> ProvenanceRecord | None:
    """The model's current record (or the one at `path`); None if there is none;
    ProvenanceError if the file is not a record of this schema version."""
    path = path or record_path(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProvenanceError(f"{path}: not JSON ({exc})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ProvenanceError(
            f"{path}: schema_version {version!r}, this Cortex reads version {SCHEMA_VERSION} "
            "(a record written by another Cortex version)"
        )
    try:
        return ProvenanceRecord.model_validate(data)
    except ValidationError as exc:
        raise ProvenanceError(
            f"{path}: not a provenance record: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}"
        ) from None


def keep_record(record: ProvenanceRecord) -> list[str]:
    """Write `record` as its model's current record, keep the one it replaces as
    `<name>.prev.json` (byte for byte, readable or not), and return what changed
    (describe_changes). A deploy that reused the running replica carries the quality check
    over from the record of that replica (it was not run again)."""
    path = record_path(record.name)
    notes: list[str] = []
    try:
        previous = read_record(record.name)
    except ProvenanceError as exc:
        previous = None
        notes.append(
            f"the previous record could not be compared ({exc}); it is kept as {previous_path(record.name).name}"
        )
    if previous is not None and record.reused and previous.replica == record.replica and record.quality is None:
        record = record.model_copy(update={"quality": previous.quality})
    if path.exists():
        atomic_write_bytes(previous_path(record.name), path.read_bytes())
    atomic_write_json(path, record.to_json(), newline=True)
    return notes or describe_changes(previous, record)


def record_markdown(record: ProvenanceRecord, changes: list[str]) -> str:
    """The record as a Prefect markdown artifact: what changed, the facts, then the whole JSON."""
    src = record.source
    origin = f"{src.repo}@{src.revision} (commit `{src.commit}`)" if src.repo else f"{src.kind} `{src.source_id}`"
    bench = (
        ", ".join(f"c={lv.concurrency}: {lv.output_tokens_per_s:.1f} tok/s" for lv in record.benchmark.levels)
        if record.benchmark
        else "not run"
    )
    quality = (
        f"top-1 agreement {record.quality.top1_agreement:.1%} with {record.quality.reference_label}"
        if record.quality
        else "not run"
    )
    memory = record.memory or {}
    rows = [
        ("source", origin),
        ("artifact", f"{record.artifact.format} {record.artifact.quantization}"),
        ("GGUF sha256", f"`{record.artifact.gguf_sha256}`" if record.artifact.gguf_sha256 else "-"),
        ("toolchain", record.toolchain or "-"),
        ("engine", f"{record.engine.engine} {record.engine.version}, image `{record.engine.image}`"),
        ("image id / program", f"`{record.engine.image_id or record.engine.program}`"),
        ("program sha256", f"`{record.engine.program_sha256}`" if record.engine.program_sha256 else "-"),
        ("replica", f"{record.replica} ({record.runtime}) at {record.endpoint}"),
        ("smoke tests", "passed" if record.smoke.passed else "FAILED"),
        ("benchmark", bench),
        ("quality", quality),
        ("memory", "; ".join(memory.get("warnings", [])) or ("as planned" if memory else "not compared")),
    ]
    lines = [f"## Provenance of `{record.name}`", "", "### What changed", ""]
    lines += [f"- {c}" for c in changes] or ["- nothing that decides the deployment"]
    lines += ["", "| | |", "|---|---|", *(f"| {k} | {v.replace('|', '/')} |" for k, v in rows)]
    lines += ["", "```json", json.dumps(record.to_json(), indent=2), "```", ""]
    return "\n".join(lines)
