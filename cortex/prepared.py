"""What preparing a model produces, and the steps of the prepare flow that are not Prefect's job.

`ResolvedSource` is a spec's source pinned to an id (a Hub commit sha, or the sha256 of local
files); `pin_source` makes one. `Prepared` is the result: the exact files the engine loads,
with their sha256s, and how they were made (downloaded, built, or found in the caches). The
prepare-model flow (flows/prepare.py) returns it, the deploy flow launches from it, and
`cortex prepare --json` prints `Prepared.to_json()`; `render_report` is its markdown report.

The files an engine loads (`EngineFiles`) come from one of three places: a GGUF built from an
HF checkpoint (`built_gguf_files`), a GGUF source used as it is (`source_gguf_files`), or an HF
checkpoint that vLLM loads itself (`hf_checkpoint_files`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cortex import hub
from cortex.artifacts import (
    Artifact,
    ArtifactKey,
    ArtifactStore,
    Log,
    build_gguf,
    gguf_architecture_for,
    local_hf_files,
    local_source_id,
    predict_build_bytes,
    source_origin,
)
from cortex.facts import ModelFacts, gguf_facts, hf_dir_facts
from cortex.plan import Plan
from cortex.progress import Reporter
from cortex.spec import Source

SourceKind = Literal["hf_repo", "hf_dir", "gguf_file", "gguf_repo"]
FileRecord = dict[str, Any]  # {path, bytes, sha256}


# --- the pinned source ------------------------------------------------------------------------


@dataclass
class ResolvedSource:
    kind: SourceKind
    repo: str | None  # Hub sources
    revision: str | None  # as the spec names it (a branch, tag or sha); Hub sources
    commit: str | None  # what `revision` resolved to; Hub sources
    source_id: str  # the commit sha, or the sha256 of the local weights
    folder: str | None  # HF checkpoint folder (a Hub snapshot or the local folder)
    gguf_files: list[str] = field(default_factory=list)  # GGUF sources, once on disk

    @property
    def on_hub(self) -> bool:
        return self.kind in ("hf_repo", "gguf_repo")

    def hub_pin(self) -> tuple[str, str]:
        """(repo, commit) of a Hub source: what every download and cache lookup is keyed by."""
        if not self.on_hub or self.repo is None or self.commit is None:
            raise ValueError(f"this {self.kind} source is not a Hub repo pinned to a commit")
        return self.repo, self.commit

    def provenance(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}

    def hf_folder(self) -> Path:
        """The HF checkpoint folder; only HF sources (a Hub repo once fetched, a local folder) have one."""
        if self.folder is None:
            raise ValueError(f"this {self.kind} source has no HF checkpoint folder")
        return Path(self.folder)


def pin_source(source: Source, *, token: hub.HubToken | None = None, log: Log = lambda line: None) -> ResolvedSource:
    """Pin `source`: a Hub revision to its commit sha (and, for an HF repo, fetch the few small
    files the facts come from), a local folder or GGUF to the sha256 of its files."""
    kind = source.kind
    if kind in ("hf_repo", "gguf_repo"):
        repo = source.repo
        assert repo is not None  # Source.kind says so
        commit = hub.resolve_revision(repo, source.revision, token=token)
        log(f"{repo}@{source.revision} is commit {commit}")
        folder = None
        if kind == "hf_repo":
            small = hub.small_hf_files(repo, commit, hub.list_files(repo, commit, token=token))
            folder = str(hub.fetch(repo, commit, only=small, token=token).folder)
        return ResolvedSource(kind, repo, source.revision, commit, commit, folder)
    if kind == "hf_dir":
        assert source.path is not None  # Source.kind says so
        local = Path(source.path)
        needed = local_hf_files(local)
        source_id = local_source_id(needed)
        log(f"{local}: {len(needed)} files, id {source_id[:16]}")
        return ResolvedSource(kind, None, None, None, source_id, str(local))
    assert source.gguf is not None  # Source.kind "gguf_file": its validator requires one source
    first = Path(source.gguf)
    parts = hub.local_gguf_parts(first)
    source_id = local_source_id(parts)
    log(f"{first}: sha256 {source_id}")
    return ResolvedSource(kind, None, None, None, source_id, None, [str(p) for p in parts])


def source_facts(resolved: ResolvedSource) -> ModelFacts:
    """ModelFacts from what is on disk: config (+ weights once downloaded) or the GGUF header."""
    if resolved.gguf_files:
        return gguf_facts(Path(resolved.gguf_files[0]))
    return hf_dir_facts(resolved.hf_folder())


def hub_files_needed(source: Source, commit: str, *, token: hub.HubToken | None = None) -> list[hub.RemoteFile]:
    """The files of a Hub source the engine needs: its GGUF file (or split set), the files
    matching `include`, or the checkpoint's weights, config and tokenizer (hub.needed_files)."""
    if source.repo is None:
        raise ValueError("not a Hub source: it names no `repo`")
    return hub.needed_files(hub.list_files(source.repo, commit, token=token), gguf=source.gguf, include=source.include)


def space_needed(
    source: Source, resolved: ResolvedSource, facts: ModelFacts, plan: Plan
) -> list[tuple[Path, int, str]]:
    """(where, bytes, what) of each write still to come, for hub.check_space_for: the files
    still to download, and each GGUF file the plan will build that is not in the artifact cache."""
    from cortex.toolchain import find_toolchain

    needs = []
    if resolved.on_hub:
        repo, commit = resolved.hub_pin()
        wanted = hub_files_needed(source, commit)
        needs.append((hub.hub_cache_dir(), hub.bytes_to_fetch(repo, commit, wanted), "the download"))
    if plan.artifact.convert_from == "hf":
        store, version = ArtifactStore(), find_toolchain().version
        for q, size in predict_build_bytes(facts, plan.artifact.quantization).items():
            if store.get(ArtifactKey(resolved.source_id, q, version)) is None:
                needs.append((store.root, size, f"the {q} GGUF"))
    return needs


# --- the files an engine loads ----------------------------------------------------------------


@dataclass
class EngineFiles:
    """What an engine is pointed at (`path`: an HF folder, a GGUF file, or every part of a split
    GGUF) and every file prepared for it."""

    path: Path | list[Path]
    files: list[FileRecord]
    mount_root: Path | None = None  # Hub snapshots are links into ../../blobs: mount this folder
    toolchain: str | None = None  # the llama.cpp toolchain that built the GGUF; None: nothing was built


def file_records(paths: Iterable[Path], snapshot: hub.RepoSnapshot | None = None) -> list[FileRecord]:
    """{path, bytes, sha256} of each file: the Hub's sha256 where the snapshot lists one, else
    the file's own (computed once, then kept while the file is unchanged)."""
    known = {snapshot.path(f.path): f.sha256 for f in snapshot.files} if snapshot else {}
    return [
        {"path": str(p), "bytes": p.stat().st_size, "sha256": known.get(p) or hub.verified_digest(p)} for p in paths
    ]


def build_source_gguf(
    resolved: ResolvedSource,
    facts: ModelFacts,
    quantization: str,
    *,
    toolchain,
    predicted_bytes: dict[str, int],
    log: Log = lambda line: None,
    on_step: Callable[[str, Artifact, bool], None] = lambda step, artifact, built: None,
    progress: Reporter | None = None,
) -> list[Artifact]:
    """cortex.artifacts.build_gguf on the HF checkpoint of `resolved` (its folder on disk)."""
    folder = resolved.hf_folder()
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) or sum(
        p.stat().st_size for p in folder.glob("*.bin")
    )
    return build_gguf(
        folder,
        source_id=resolved.source_id,
        quantization=quantization,
        toolchain=toolchain,
        model_name=(resolved.repo or folder.name).rsplit("/", 1)[-1],
        architecture=gguf_architecture_for([facts.architecture], toolchain.version),
        source=resolved.provenance(),
        weights_bytes=weights,
        predicted_bytes=predicted_bytes,
        log=log,
        on_step=on_step,
        progress=progress,
    )


def built_gguf_files(artifacts: list[Artifact]) -> EngineFiles:
    """The last artifact of a build is what the engine loads; the files list every artifact."""
    final = artifacts[-1]
    path = [Path(f.path) for f in final.files] if len(final.files) > 1 else final.model_file
    return EngineFiles(path, [asdict(f) for a in artifacts for f in a.files], toolchain=final.key.toolchain_version)


def source_file_records(resolved: ResolvedSource, snapshot: hub.RepoSnapshot | None) -> list[FileRecord]:
    """{path, bytes, sha256} of every file of the source as it was taken: the Hub snapshot's
    files, a local checkpoint's weights, configs and tokenizer, or the GGUF file(s)."""
    if snapshot is not None:
        return file_records([snapshot.path(f.path) for f in snapshot.files], snapshot)
    if resolved.gguf_files:
        return file_records(Path(p) for p in resolved.gguf_files)
    return file_records(sorted(local_hf_files(resolved.hf_folder())))


def build_steps(artifacts: list[Artifact], built: list[str]) -> list[dict[str, Any]]:
    """The tool runs of the artifacts built now (not those that came from the cache)."""
    return [step for a in artifacts if a.key.quantization.upper() in built for step in a.steps]


def source_gguf_files(resolved: ResolvedSource, snapshot: hub.RepoSnapshot | None) -> EngineFiles:
    """A GGUF source, used as it is."""
    paths = [Path(p) for p in resolved.gguf_files]
    return EngineFiles(paths if len(paths) > 1 else paths[0], file_records(paths, snapshot))


def hf_checkpoint_files(resolved: ResolvedSource, snapshot: hub.RepoSnapshot | None) -> EngineFiles:
    """The HF checkpoint folder vLLM loads itself: the snapshot's files, or a local folder's."""
    folder = resolved.hf_folder()
    if snapshot is None:
        paths = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
        return EngineFiles(folder, file_records(paths))
    # snapshots/<sha>/ holds links into ../../blobs/: a container needs both
    return EngineFiles(
        folder, file_records([snapshot.path(f.path) for f in snapshot.files], snapshot), mount_root=folder.parent.parent
    )


# --- the result -------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What `prepare_model` produced: the exact files the engine loads, and how they were made."""

    name: str
    engine: str
    format: str  # hf | gguf
    quantization: str
    source: dict[str, Any]  # ResolvedSource.provenance()
    source_revision: str  # the commit sha, or the GGUF's sha256 (local files)
    artifact_path: Path | list[Path]  # the HF folder, the GGUF file, or a GGUF split set (all parts)
    files: list[FileRecord]
    cached: bool  # nothing was downloaded or built
    downloaded_bytes: int
    resumed_bytes: int
    built: list[str]  # quant types built by this run
    predicted_bytes: dict[str, int]
    plan: Plan = field(repr=False)
    facts: dict[str, Any] = field(default_factory=dict, repr=False)  # ModelFacts.summary()
    mount_root: Path | None = None  # Hub snapshots are links into ../../blobs: mount this folder
    # The tool runs that built this run's artifacts: {what, command, exit_code, seconds} each
    # (convert_hf_to_gguf, then llama-quantize); empty when everything came from the cache.
    build_steps: list[dict[str, Any]] = field(default_factory=list)
    # every file of the source as it was taken (cortex.provenance records their sha256s)
    source_files: list[FileRecord] = field(default_factory=list)
    toolchain: str | None = None  # the llama.cpp toolchain that built the GGUF; None: nothing was built

    def to_json(self) -> dict[str, Any]:
        path = self.artifact_path
        return {
            "name": self.name,
            "engine": self.engine,
            "format": self.format,
            "quantization": self.quantization,
            "source": self.source,
            "source_revision": self.source_revision,
            "artifact_path": [str(p) for p in path] if isinstance(path, list) else str(path),
            "mount_root": str(self.mount_root) if self.mount_root else None,
            "files": self.files,
            "cached": self.cached,
            "downloaded_bytes": self.downloaded_bytes,
            "resumed_bytes": self.resumed_bytes,
            "built": self.built,
            "build_steps": self.build_steps,
            "predicted_bytes": self.predicted_bytes,
            "plan": plan_json(self.plan),
            "source_files": self.source_files,
            "toolchain": self.toolchain,
        }


def plan_json(plan: Plan) -> dict[str, Any]:
    """Plan.to_json() with the artifact and the decision (trace and why-not) added."""
    out = dict(plan.to_json())
    out.setdefault("artifact", asdict(plan.artifact))
    out.setdefault("decision", plan.decision.to_json())
    return out


def render_report(prepared: Prepared) -> str:
    """Markdown: the source, the files (with predicted sizes), the facts, the decision trace, the plan."""
    pj = plan_json(prepared.plan)
    lines = [f"# Prepared `{prepared.name}`", ""]
    if prepared.plan.unsafe_extra_args:
        lines += [
            "## ⚠️ UNSAFE extra_args",
            "",
            "**The spec sets `unsafe_extra_args: true`, so these flags reach the engine although the "
            "allow-list refuses them:**",
            "",
            *[f"- **`{flag.partition(' ')[0]}`** {flag.partition(' ')[2]}" for flag in prepared.plan.unsafe_extra_args],
            "",
        ]
    src = prepared.source
    origin = f"{src['repo']}@{src.get('revision')}" if src.get("repo") else source_origin(src)
    lines += [
        f"- **source**: {src.get('kind')} `{origin}` → `{prepared.source_revision}`",
        f"- **engine**: {prepared.engine}; **artifact**: {prepared.format} {prepared.quantization}",
        f"- **cached**: {'yes, nothing downloaded or built' if prepared.cached else 'no'}; downloaded "
        f"{prepared.downloaded_bytes} bytes ({prepared.resumed_bytes} resumed); built: {', '.join(prepared.built) or 'nothing'}",
        "",
        "## Files",
        "",
        "| file | bytes | predicted | sha256 |",
        "|---|---:|---:|---|",
    ]
    for f in prepared.files:
        name = Path(f["path"]).name
        quant = next((q for q in prepared.predicted_bytes if name.endswith(f"-{q}.gguf")), None)
        pred = prepared.predicted_bytes.get(quant) if quant else None
        pred_s = f"{pred} ({100.0 * (f['bytes'] - pred) / pred:+.2f}%)" if pred else ""
        lines.append(f"| `{name}` | {f['bytes']} | {pred_s} | `{f['sha256']}` |")
    lines += ["", "## Facts", "", "| fact | value |", "|---|---|"]
    for k, v in prepared.facts.items():
        if v not in (None, [], {}, 0) or k in ("n_experts",):
            lines.append(f"| {k} | `{json.dumps(v) if not isinstance(v, str) else v}` |")
    decision = pj.get("decision") or {}
    lines += [
        "",
        f"## Decision: {decision.get('engine', prepared.plan.engine)}",
        "",
        "| rule | question | matched | reason |",
        "|---|---|---|---|",
    ]
    for r in decision.get("trace", []):
        lines.append(
            f"| {r.get('rule')} | {r.get('question')} | {'yes' if r.get('matched') else 'no'} | "
            f"{str(r.get('reason', '')).replace('|', '/')} |"
        )
    if decision.get("why_not"):
        lines += ["", f"Why not the other engine: {decision['why_not']}"]
    lines += ["", "## Plan", "", "```json", json.dumps(pj, indent=2, default=str), "```", ""]
    return "\n".join(lines)
