"""prepare_model(spec_path): the exact files the chosen engine will load, verified and cached.

    resolve the source   (revision -> commit sha; local files -> sha256)
    inspect + plan       (facts from config / GGUF header; engine, artifact type and size;
                          an architecture the converter does not know fails here, before
                          any weights are downloaded)
    check space          (the download and the GGUF files to build, summed per disk)
    download             (only the files the plan needs; resumable; sha256-verified)
    re-plan              (HF repos: exact facts from the downloaded weights)
    build                (GGUF plans from HF weights: convert, then quantize; cached by
                          (source, quant type, toolchain version))
    report               (markdown: facts, decision trace, plan; table: path, bytes, sha256)

Run it with `cortex prepare SPEC`; the deploy flow calls it as a subflow.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from tasks.prepare import (
    Prepared,
    ResolvedSource,
    build_gguf_artifacts,
    check_space,
    download_weights,
    hf_files,
    inspect_model,
    plan_model,
    publish_report,
    resolve_source,
)


@flow(name="prepare-model")
def prepare_model(spec_path: str) -> Prepared:
    """Prepare the weights the spec at `spec_path` needs; see the module docstring."""
    from cortex.quant import predict_gguf_bytes
    from cortex.specfile import load_spec

    logger = get_run_logger()
    spec = load_spec(spec_path)
    resolved = resolve_source(spec)

    snapshot = None
    if resolved.kind == "gguf_repo":  # the facts are in the file itself: fetch it first
        snapshot = download_weights(spec, resolved)
        resolved.gguf_files = [str(snapshot.path(f.path)) for f in snapshot.files]
    facts = inspect_model(resolved)
    plan = plan_model(spec, facts)

    if resolved.kind == "hf_repo":
        check_space(spec, resolved, facts, plan)
        snapshot = download_weights(spec, resolved)
        facts = inspect_model(resolved)  # now with the weights: exact parameter counts and sizes
        replanned = plan_model(spec, facts, check_converter=False)
        if (replanned.engine, replanned.artifact.quantization) != (plan.engine, plan.artifact.quantization):
            logger.warning("with the exact weights the plan changed from %s %s to %s %s", plan.engine,
                           plan.artifact.quantization, replanned.engine, replanned.artifact.quantization)
        plan = replanned

    downloaded = snapshot.downloaded_bytes if snapshot else 0
    resumed = snapshot.resumed_bytes if snapshot else 0
    quant = plan.artifact.quantization.upper()
    predicted: dict[str, int] = {}
    built: list[str] = []
    mount_root = None
    build_steps: list[dict] = []

    if plan.artifact.format == "gguf" and facts.source_format == "hf":
        meta = facts.metadata_bytes or 0
        for q in dict.fromkeys([quant if quant in ("F16", "BF16", "F32") else "F16", quant]):
            predicted[q] = predict_gguf_bytes(facts.tensors, q, metadata_bytes=meta, n_gqa=facts.n_gqa,
                                              n_expert=max(1, facts.n_experts))
        artifacts, built = build_gguf_artifacts(spec, resolved, facts, plan, predicted)
        build_steps = [step for a in artifacts if a.key.quantization.upper() in built for step in a.steps]
        files = [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for a in artifacts for f in a.files]
        final = artifacts[-1]
        artifact_path: Path | list[Path] = (
            [Path(f.path) for f in final.files] if len(final.files) > 1 else final.model_file)
        source_revision = resolved.commit or resolved.source_id
    elif plan.artifact.format == "gguf":  # a GGUF source is used as it is
        if facts.dtype and facts.dtype.upper() != quant:
            logger.warning("the plan names %s but the GGUF file is %s; the file is used as it is", quant, facts.dtype)
        paths = [Path(p) for p in resolved.gguf_files]
        sha = {snapshot.path(f.path): f.sha256 for f in snapshot.files} if snapshot else {}
        from cortex.hub import verified_digest

        files = [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha.get(p) or verified_digest(p)} for p in paths]
        artifact_path = paths if len(paths) > 1 else paths[0]
        source_revision = resolved.commit or resolved.source_id
    else:  # vLLM loads the HF checkpoint itself
        folder = Path(resolved.folder)
        files = hf_files(folder, snapshot)
        artifact_path = folder
        if snapshot is not None:
            mount_root = folder.parent.parent  # snapshots/<sha>/ links into ../../blobs/
        source_revision = resolved.commit or resolved.source_id

    prepared = Prepared(
        name=spec.name, engine=plan.engine, format=plan.artifact.format, quantization=quant,
        source=resolved.provenance(), source_revision=source_revision, artifact_path=artifact_path,
        files=files, cached=downloaded == 0 and not built, downloaded_bytes=downloaded, resumed_bytes=resumed,
        built=built, predicted_bytes=predicted or {quant: plan.artifact.predicted_bytes}, plan=plan,
        facts=facts.summary(), mount_root=mount_root, build_steps=build_steps,
    )
    publish_report(spec, facts, plan, prepared)
    logger.info("prepared %s: %s %s at %s (%s)", spec.name, prepared.format, quant, artifact_path,
                "from the cache" if prepared.cached else f"downloaded {downloaded} bytes, built {built or 'nothing'}")
    return prepared


__all__ = ["prepare_model", "Prepared", "ResolvedSource"]
