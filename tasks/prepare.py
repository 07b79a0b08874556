"""Prefect tasks of `prepare_model`: each wraps functions of cortex.hub, cortex.facts,
cortex.plan and cortex.artifacts and adds only what Prefect is for: retries where retrying
helps (the network: `HubUnreachable`), none where it does not (a missing revision, no disk
space, a converter error); progress artifacts; converter and llama-quantize output streamed
into the run's logs; the report (markdown) and the files table.

The Hub token is looked up inside the tasks that need it (HF_TOKEN, else the Prefect Secret
block named by CORTEX_HF_TOKEN_BLOCK, default `hf-token`). It is never a task or flow
parameter, so Prefect records it nowhere, and nothing here logs it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact

from cortex import hub
from cortex.artifacts import Artifact, build_gguf, gguf_architecture_for, local_source_id
from cortex.settings import Settings
from tasks.common import TASK_OPTIONS, artifact_key


def _retry_if_unreachable(task, task_run, state) -> bool:
    """Retry only what a later attempt can fix: the Hub unreachable, rate limiting, 5xx."""
    try:
        state.result()
    except hub.HubUnreachable:
        return True
    except Exception:
        return False
    return False


NETWORK: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": _retry_if_unreachable}


def hub_token() -> hub.HubToken | None:
    """HF_TOKEN, else the Prefect Secret block `$CORTEX_HF_TOKEN_BLOCK` (default `hf-token`), else None."""
    token = hub.token_from_env()
    if token is not None:
        return token
    from prefect.blocks.system import Secret

    name = Settings.load().hf_token_block
    try:
        value = Secret.load(name, _sync=True).get()
    except ValueError:  # no such block: public repos need no token
        return None
    return hub.HubToken(str(value), f"Prefect Secret block {name!r}") if value else None


# --- what the flow passes between tasks -----------------------------------------------------


@dataclass
class ResolvedSource:
    kind: str  # hf_repo | hf_dir | gguf_file | gguf_repo
    repo: str | None
    revision: str | None
    commit: str | None  # Hub sources
    source_id: str  # commit sha, or sha256 of the local weights
    folder: str | None  # HF checkpoint folder (a Hub snapshot or the local folder)
    gguf_files: list[str] = field(default_factory=list)  # GGUF sources, once on disk

    def provenance(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}


@dataclass
class Prepared:
    """What `prepare_model` produced: the exact files the engine loads, and how they were made."""

    name: str
    engine: str
    format: str  # hf | gguf
    quantization: str
    source: dict[str, Any]
    source_revision: str  # the commit sha, or the GGUF's sha256 (local files)
    artifact_path: Path | list[Path]  # the HF folder, the GGUF file, or a GGUF split set (all parts)
    files: list[dict[str, Any]]  # {path, bytes, sha256}
    cached: bool  # nothing was downloaded or built
    downloaded_bytes: int
    resumed_bytes: int
    built: list[str]  # quant types built by this run
    predicted_bytes: dict[str, int]
    plan: Any = field(repr=False)  # cortex.plan.Plan
    facts: dict[str, Any] = field(default_factory=dict, repr=False)
    mount_root: Path | None = None  # Hub snapshots are links into ../../blobs: mount this folder
    # The tool runs that built this run's artifacts: {what, command, exit_code, seconds} each
    # (convert_hf_to_gguf, then llama-quantize); empty when everything came from the cache.
    build_steps: list[dict[str, Any]] = field(default_factory=list)

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
        }


def plan_json(plan: Any) -> dict[str, Any]:
    out = dict(plan.to_json())
    artifact = getattr(plan, "artifact", None)
    decision = getattr(plan, "decision", None)
    if artifact is not None and "artifact" not in out:
        out["artifact"] = asdict(artifact)
    if decision is not None and "decision" not in out:
        out["decision"] = decision.to_json()
    return out


# --- small files an HF checkpoint's facts come from ------------------------------------------

SMALL_HF_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", "special_tokens_map.json")


@task(name="resolve-source", **TASK_OPTIONS, **NETWORK)
def resolve_source(spec) -> ResolvedSource:
    """Pin the source: a Hub revision to its commit sha (and fetch the few small files the facts
    come from), a local folder or GGUF to the sha256 of its files."""
    logger = get_run_logger()
    src = spec.source
    kind = src.kind
    if kind in ("hf_repo", "gguf_repo"):
        token = hub_token()
        commit = hub.resolve_revision(src.repo, src.revision, token=token)
        logger.info("%s@%s is commit %s", src.repo, src.revision, commit)
        folder = None
        if kind == "hf_repo":
            listed = {f.path for f in hub.list_files(src.repo, commit, token=token)}
            small = [n for n in SMALL_HF_FILES if n in listed]
            if "config.json" not in small:
                raise hub.HubError(f"{src.repo}@{commit[:12]} has no config.json: not an HF checkpoint "
                                   "(for a GGUF repo, set source.gguf)")
            folder = str(hub.fetch(src.repo, commit, only=small, token=token).folder)
        return ResolvedSource(kind, src.repo, src.revision, commit, commit, folder)
    if kind == "hf_dir":
        folder = Path(src.path)
        needed = [folder / n for n in (f.name for f in folder.iterdir())
                  if n.endswith((".safetensors", ".json", ".model", ".txt", ".jinja")) and (folder / n).is_file()]
        source_id = local_source_id(needed)
        logger.info("%s: %d files, id %s", folder, len(needed), source_id[:16])
        return ResolvedSource(kind, None, None, None, source_id, str(folder))
    first = Path(src.gguf)
    parts = [first.with_name(n) for n in hub.gguf_split_parts(first.name)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise hub.HubError(f"GGUF file(s) not found: {', '.join(missing)}")
    source_id = local_source_id(parts)
    logger.info("%s: sha256 %s", first, source_id)
    return ResolvedSource(kind, None, None, None, source_id, None, [str(p) for p in parts])


@task(name="inspect-model", **TASK_OPTIONS)
def inspect_model(resolved: ResolvedSource):
    """ModelFacts from what is on disk: config (+ weights once downloaded) or the GGUF header."""
    from cortex.facts import gguf_facts, hf_dir_facts

    if resolved.gguf_files:
        return gguf_facts(Path(resolved.gguf_files[0]))
    return hf_dir_facts(Path(resolved.folder))


@task(name="plan", **TASK_OPTIONS)
def plan_model(spec, facts, *, check_converter: bool = True):
    """The plan (engine, artifact format and quantization, memory), and, when it needs a GGUF
    made from an HF checkpoint, the check that this toolchain's converter knows the architecture:
    that fails here, before any weights are downloaded."""
    from cortex import hardware
    from cortex.plan import make_plan
    from cortex.toolchain import find_toolchain

    logger = get_run_logger()
    inventory = hardware.resolve(hardware.detect(), spec.resources.gpus, spec.resources.gpu_memory)
    plan = make_plan(spec, facts, inventory)
    logger.info("plan: engine %s, %s %s, predicted %d bytes", plan.engine, plan.artifact.format,
                plan.artifact.quantization, plan.artifact.predicted_bytes)
    if check_converter and plan.artifact.format == "gguf" and facts.source_format == "hf":
        toolchain = find_toolchain()
        arch = gguf_architecture_for([facts.architecture], toolchain.version)
        logger.info("convert_hf_to_gguf.py (llama.cpp %s) converts %s to GGUF architecture %r",
                    toolchain.version, facts.architecture, arch)
    return plan


class _Progress:
    """A Prefect progress artifact updated at most once a second."""

    def __init__(self, key: str, description: str) -> None:
        self.id = create_progress_artifact(progress=0.0, key=key, description=description)
        self.last = 0.0

    def set(self, percent: float, description: str | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= 1.0:
            self.last = now
            update_progress_artifact(self.id, progress=max(0.0, min(100.0, percent)), description=description)


@task(name="check-space", **TASK_OPTIONS)
def check_space(spec, resolved: ResolvedSource, facts, plan) -> None:
    """Before any download: room for the files still to fetch and for the GGUF files the plan
    will build (F16 and the quantized file), summed per disk."""
    from cortex.artifacts import ArtifactKey, ArtifactStore
    from cortex.quant import predict_gguf_bytes
    from cortex.toolchain import find_toolchain

    needs = []
    if resolved.kind in ("hf_repo", "gguf_repo"):
        src = spec.source
        listing = hub.list_files(src.repo, resolved.commit)
        wanted = hub.needed_files(listing, gguf=src.gguf if resolved.kind == "gguf_repo" else None, include=src.include)
        needs.append((hub.hub_cache_dir(), hub.bytes_to_fetch(src.repo, resolved.commit, wanted), "the download"))
    if plan.artifact.format == "gguf" and facts.source_format == "hf":
        store, version = ArtifactStore(), find_toolchain().version
        quant = plan.artifact.quantization.upper()
        for q in dict.fromkeys([quant if quant in ("F16", "BF16", "F32") else "F16", quant]):
            if store.get(ArtifactKey(resolved.source_id, q, version)) is None:
                size = predict_gguf_bytes(facts.tensors, q, metadata_bytes=facts.metadata_bytes or 0,
                                          n_gqa=facts.n_gqa, n_expert=max(1, facts.n_experts))
                needs.append((store.root, size, f"the {q} GGUF"))
    hub.check_space_for(needs)


@task(name="download-weights", **TASK_OPTIONS, **NETWORK)
def download_weights(spec, resolved: ResolvedSource) -> hub.RepoSnapshot | None:
    """Fetch the weights the plan needs (resumable, verified); nothing for local sources."""
    if resolved.kind not in ("hf_repo", "gguf_repo"):
        return None
    logger = get_run_logger()
    src = spec.source
    token = hub_token()
    listing = hub.list_files(src.repo, resolved.commit, token=token)
    wanted = hub.needed_files(listing, gguf=src.gguf if resolved.kind == "gguf_repo" else None, include=src.include)
    total = sum(f.size for f in wanted) or 1
    progress = _Progress(artifact_key("prepare", spec.name, "download"),
                         f"Download of {src.repo}@{resolved.commit[:12]} ({total} bytes, {len(wanted)} files)")
    done: dict[str, int] = {}

    def report(name: str, got: int, size: int) -> None:
        done[name] = got
        progress.set(100.0 * sum(done.values()) / total, f"{name}: {got}/{size} bytes")

    snap = hub.fetch(src.repo, resolved.commit, gguf=src.gguf if resolved.kind == "gguf_repo" else None,
                     include=src.include, token=token, progress=report)
    progress.set(100.0, f"{len(snap.files)} files verified; {snap.downloaded_bytes} bytes downloaded, "
                        f"{snap.resumed_bytes} resumed", force=True)
    if snap.refetched:
        logger.warning("re-fetched after failing verification: %s", ", ".join(snap.refetched))
    logger.info("%s@%s: %d files verified (%d bytes downloaded, %d resumed)", src.repo, resolved.commit[:12],
                len(snap.files), snap.downloaded_bytes, snap.resumed_bytes)
    return snap


@task(name="build-gguf", **TASK_OPTIONS)  # no retries: a converter error repeats itself
def build_gguf_artifacts(spec, resolved: ResolvedSource, facts, plan, predicted: dict[str, int]) -> tuple[list[Artifact], list[str]]:
    """Convert (and quantize) the HF checkpoint into the artifact cache; cached artifacts are reused."""
    from cortex.toolchain import find_toolchain

    logger = get_run_logger()
    toolchain = find_toolchain()
    quant = plan.artifact.quantization.upper()
    arch = gguf_architecture_for([facts.architecture], toolchain.version)
    steps = 1 if quant in ("F16", "BF16", "F32") else 2
    progress = _Progress(artifact_key("prepare", spec.name, "build"),
                         f"GGUF {quant} for {spec.name} with llama.cpp {toolchain.version}")
    built: list[str] = []
    seen: list[str] = []

    def on_step(name: str, artifact: Artifact, now: bool) -> None:
        seen.append(name)
        if now:
            built.append(name)
        logger.info("%s %s: %s (%d bytes)", "built" if now else "cached", name, artifact.model_file,
                    artifact.total_bytes)
        progress.set(100.0 * len(seen) / steps, f"{name} {'built' if now else 'from the cache'}", force=True)

    folder = Path(resolved.folder)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) or sum(
        p.stat().st_size for p in folder.glob("*.bin"))
    model_name = (spec.source.repo or folder.name).rsplit("/", 1)[-1]
    artifacts = build_gguf(
        folder, source_id=resolved.source_id, quantization=quant, toolchain=toolchain, model_name=model_name,
        architecture=arch, source=resolved.provenance(), weights_bytes=weights, predicted_bytes=predicted,
        log=lambda line: logger.info("%s", line), on_step=on_step,
    )
    progress.set(100.0, f"{quant} ready", force=True)
    return artifacts, built


def _sha256_for(path: Path, known: str | None) -> str:
    return known or hub.verified_digest(path)


def hf_files(folder: Path, snapshot: hub.RepoSnapshot | None) -> list[dict[str, Any]]:
    """The files of an HF artifact with bytes and sha256 (the Hub's sha256 where it lists one)."""
    if snapshot is not None:
        return [{"path": str(snapshot.path(f.path)), "bytes": f.size,
                 "sha256": _sha256_for(snapshot.path(f.path), f.sha256)} for f in snapshot.files]
    return [{"path": str(p), "bytes": p.stat().st_size, "sha256": hub.verified_digest(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]


@task(name="report", **TASK_OPTIONS)
def publish_report(spec, facts, plan, prepared: Prepared) -> None:
    """A markdown artifact (facts, decision trace, plan, files) and a table artifact of the files."""
    create_table_artifact(
        key=artifact_key("prepare", spec.name, "files"),
        table=[{"path": f["path"], "bytes": f["bytes"], "sha256": f["sha256"]} for f in prepared.files],
        description=f"Files {spec.name} loads ({prepared.engine}, {prepared.format} {prepared.quantization}); "
                    f"source {prepared.source_revision}",
    )
    create_markdown_artifact(
        key=artifact_key("prepare", spec.name, "report"),
        markdown=render_report(spec, facts, plan, prepared),
        description=f"Prepared {spec.name}: facts, decision, plan, files",
    )


def render_report(spec, facts, plan, prepared: Prepared) -> str:
    pj = plan_json(plan)
    lines = [f"# Prepared `{spec.name}`", ""]
    src = prepared.source
    origin = (f"{src['repo']}@{src.get('revision')}" if src.get("repo")
              else src.get("folder") or ", ".join(src.get("gguf_files", [])))
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
    summary = facts.summary() if hasattr(facts, "summary") else dict(facts)
    for k, v in summary.items():
        if v not in (None, [], {}, 0) or k in ("n_experts",):
            lines.append(f"| {k} | `{json.dumps(v) if not isinstance(v, str) else v}` |")
    decision = pj.get("decision") or {}
    lines += ["", f"## Decision: {decision.get('engine', plan.engine)}", "",
              "| rule | question | matched | reason |", "|---|---|---|---|"]
    for r in decision.get("trace", []):
        lines.append(f"| {r.get('rule')} | {r.get('question')} | {'yes' if r.get('matched') else 'no'} | "
                     f"{str(r.get('reason', '')).replace('|', '/')} |")
    if decision.get("why_not"):
        lines += ["", f"Why not the other engine: {decision['why_not']}"]
    lines += ["", "## Plan", "", "```json", json.dumps(pj, indent=2, default=str), "```", ""]
    return "\n".join(lines)
