"""Prefect tasks of `prepare_model`: each wraps functions of cortex.prepared, cortex.hub,
cortex.plan and cortex.artifacts and adds only what Prefect is for: retries where retrying
helps (the network: `HubUnreachable`), none where it does not (a missing revision, no disk
space, a converter error); progress artifacts; converter and llama-quantize output streamed
into the run's logs; the report (markdown) and the files table.

The Hub token is looked up inside the tasks that need it (HF_TOKEN, else the Prefect Secret
block named by CORTEX_HF_TOKEN_BLOCK, default `hf-token`). It is never a task or flow
parameter, so Prefect records it nowhere, and nothing here logs it.
"""

from __future__ import annotations

from typing import Any, cast

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cortex import hub
from cortex.artifacts import Artifact, gguf_architecture_for, gguf_build_types
from cortex.facts import ModelFacts
from cortex.plan import Plan, make_plan
from cortex.prepared import (
    Prepared,
    ResolvedSource,
    build_source_gguf,
    hub_files_needed,
    pin_source,
    render_report,
    source_facts,
    space_needed,
)
from cortex.settings import Settings
from cortex.spec import ModelSpec
from tasks.common import TASK_OPTIONS, ProgressArtifact, artifact_key


def _retry_if_unreachable(task, task_run, state) -> bool:
    """Retry only what a later attempt can fix: the Hub unreachable, rate limiting, 5xx."""
    try:
        state.result()
    except hub.HubUnreachable:
        return True
    except Exception:
        return False
    return False


NETWORK: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": _retry_if_unreachable,
}


def hub_token() -> hub.HubToken | None:
    """HF_TOKEN, else the Prefect Secret block `$CORTEX_HF_TOKEN_BLOCK` (default `hf-token`), else None."""
    token = hub.token_from_env()
    if token is not None:
        return token
    from prefect.blocks.system import Secret

    name = Settings.load().hf_token_block
    try:
        block = cast(Secret, Secret.load(name, _sync=True))  # type: ignore[call-arg]  # sync in a task thread
        value = block.get()
    except ValueError:  # no such block: public repos need no token
        return None
    return hub.HubToken(str(value), f"Prefect Secret block {name!r}") if value else None


@task(name="resolve-source", **TASK_OPTIONS, **NETWORK)
def resolve_source(spec: ModelSpec) -> ResolvedSource:
    """Pin the source: a Hub revision to its commit sha (and fetch the few small files the facts
    come from), a local folder or GGUF to the sha256 of its files."""
    logger = get_run_logger()
    token = hub_token() if spec.source.kind in ("hf_repo", "gguf_repo") else None
    return pin_source(spec.source, token=token, log=lambda line: logger.info("%s", line))


@task(name="inspect-model", **TASK_OPTIONS)
def inspect_model(resolved: ResolvedSource) -> ModelFacts:
    """ModelFacts from what is on disk: config (+ weights once downloaded) or the GGUF header."""
    return source_facts(resolved)


@task(name="plan", **TASK_OPTIONS)
def plan_model(spec: ModelSpec, facts: ModelFacts, *, check_converter: bool = True) -> Plan:
    """The plan (engine, artifact format and quantization, memory), and, when it needs a GGUF
    made from an HF checkpoint, the check that this toolchain's converter knows the architecture:
    that fails here, before any weights are downloaded."""
    from cortex import hardware
    from cortex.toolchain import find_toolchain

    logger = get_run_logger()
    inventory = hardware.resolve(hardware.detect(), spec.resources.gpus, spec.resources.gpu_memory)
    plan = make_plan(spec, facts, inventory)
    logger.info(
        "plan: engine %s, %s %s, predicted %d bytes",
        plan.engine,
        plan.artifact.format,
        plan.artifact.quantization,
        plan.artifact.predicted_bytes,
    )
    if check_converter and plan.artifact.convert_from == "hf":
        toolchain = find_toolchain()
        arch = gguf_architecture_for([facts.architecture], toolchain.version)
        logger.info(
            "convert_hf_to_gguf.py (llama.cpp %s) converts %s to GGUF architecture %r",
            toolchain.version,
            facts.architecture,
            arch,
        )
    return plan


@task(name="check-space", **TASK_OPTIONS)
def check_space(spec: ModelSpec, resolved: ResolvedSource, facts: ModelFacts, plan: Plan) -> None:
    """Before any download: room for the files still to fetch and for the GGUF files the plan
    will build (F16 and the quantized file), summed per disk."""
    hub.check_space_for(space_needed(spec.source, resolved, facts, plan))


@task(name="download-weights", **TASK_OPTIONS, **NETWORK)
def download_weights(spec: ModelSpec, resolved: ResolvedSource) -> hub.RepoSnapshot | None:
    """Fetch the weights the plan needs (resumable, verified); nothing for local sources."""
    if not resolved.on_hub:
        return None
    logger = get_run_logger()
    src = spec.source
    repo, commit = resolved.hub_pin()
    token = hub_token()
    wanted = hub_files_needed(src, commit, token=token)
    # the files still to fetch, whole: a resumed file's bar starts at the bytes already on disk
    todo = [f for f in wanted if hub.bytes_to_fetch(repo, commit, [f])]
    total = sum(f.size for f in todo)
    progress = ProgressArtifact(
        artifact_key("prepare", spec.name, "download"),
        f"Download of {repo}@{commit[:12]}: {len(todo)} of {len(wanted)} files to fetch ({total} bytes)",
        total=total,
        unit="bytes",
    )
    snap = hub.fetch(repo, commit, gguf=src.gguf, include=src.include, token=token, progress=progress.reporter())
    progress.finish(
        f"{len(snap.files)} files verified; {snap.downloaded_bytes} bytes downloaded, {snap.resumed_bytes} resumed"
    )
    if snap.refetched:
        logger.warning("re-fetched after failing verification: %s", ", ".join(snap.refetched))
    logger.info(
        "%s@%s: %d files verified (%d bytes downloaded, %d resumed)",
        repo,
        commit[:12],
        len(snap.files),
        snap.downloaded_bytes,
        snap.resumed_bytes,
    )
    return snap


@task(name="build-gguf", **TASK_OPTIONS)  # no retries: a converter error repeats itself
def build_gguf_artifacts(
    spec: ModelSpec, resolved: ResolvedSource, facts: ModelFacts, plan: Plan, predicted: dict[str, int]
) -> tuple[list[Artifact], list[str]]:
    """Convert (and quantize) the HF checkpoint into the artifact cache; cached artifacts are reused."""
    from cortex.toolchain import find_toolchain

    logger = get_run_logger()
    toolchain = find_toolchain()
    quant = plan.artifact.quantization.upper()
    progress = ProgressArtifact(
        artifact_key("prepare", spec.name, "build"),
        f"GGUF {quant} for {spec.name} with llama.cpp {toolchain.version}",
        parts=len(gguf_build_types(quant)),
    )
    built: list[str] = []

    def on_step(name: str, artifact: Artifact, now: bool) -> None:
        if now:
            built.append(name)
        logger.info(
            "%s %s: %s (%d bytes)", "built" if now else "cached", name, artifact.model_file, artifact.total_bytes
        )
        if not now:
            progress.part_done(name, "from the cache")

    artifacts = build_source_gguf(
        resolved,
        facts,
        quant,
        toolchain=toolchain,
        predicted_bytes=predicted,
        log=lambda line: logger.info("%s", line),
        on_step=on_step,
        progress=progress.reporter(),
    )
    progress.finish(f"{quant} ready")
    return artifacts, built


@task(name="report", **TASK_OPTIONS)
def publish_report(prepared: Prepared) -> None:
    """A markdown artifact (facts, decision trace, plan, files) and a table artifact of the files."""
    create_table_artifact(
        key=artifact_key("prepare", prepared.name, "files"),
        table=[{"path": f["path"], "bytes": f["bytes"], "sha256": f["sha256"]} for f in prepared.files],
        description=f"Files {prepared.name} loads ({prepared.engine}, {prepared.format} {prepared.quantization}); "
        f"source {prepared.source_revision}",
    )
    create_markdown_artifact(
        key=artifact_key("prepare", prepared.name, "report"),
        markdown=render_report(prepared),
        description=f"Prepared {prepared.name}: facts, decision, plan, files",
    )
