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

from prefect import flow, get_run_logger

from cortex.artifacts import predict_build_bytes
from cortex.prepared import (
    Prepared,
    build_steps,
    built_gguf_files,
    hf_checkpoint_files,
    source_file_records,
    source_gguf_files,
)
from cortex.specfile import load_spec
from tasks.prepare import (
    build_gguf_artifacts,
    check_space,
    download_weights,
    inspect_model,
    plan_model,
    publish_report,
    resolve_source,
)


@flow(name="prepare-model")
def prepare_model(spec_path: str) -> Prepared:
    """Prepare the weights the spec at `spec_path` needs; see the module docstring."""
    logger = get_run_logger()
    spec = load_spec(spec_path)
    resolved = resolve_source(spec)

    snapshot = None
    if resolved.kind == "gguf_repo":  # the facts are in the file itself: fetch it first
        snapshot = download_weights(spec, resolved)
        assert snapshot is not None, "a Hub source always has a snapshot"
        resolved.gguf_files = [str(snapshot.path(f.path)) for f in snapshot.files]
    facts = inspect_model(resolved)
    plan = plan_model(spec, facts)

    if resolved.kind == "hf_repo":
        check_space(spec, resolved, facts, plan)
        snapshot = download_weights(spec, resolved)
        facts = inspect_model(resolved)  # now with the weights: exact parameter counts and sizes
        replanned = plan_model(spec, facts, check_converter=False)
        if (replanned.engine, replanned.artifact.quantization) != (plan.engine, plan.artifact.quantization):
            logger.warning(
                "with the exact weights the plan changed from %s %s to %s %s",
                plan.engine,
                plan.artifact.quantization,
                replanned.engine,
                replanned.artifact.quantization,
            )
        plan = replanned

    downloaded = snapshot.downloaded_bytes if snapshot else 0
    resumed = snapshot.resumed_bytes if snapshot else 0
    quant = plan.artifact.quantization.upper()
    predicted = {quant: plan.artifact.predicted_bytes}
    built: list[str] = []
    steps: list[dict] = []

    if plan.artifact.convert_from == "hf":
        predicted = predict_build_bytes(facts, quant)
        artifacts, built = build_gguf_artifacts(spec, resolved, facts, plan, predicted)
        loads = built_gguf_files(artifacts)
        steps = build_steps(artifacts, built)
    elif plan.artifact.format == "gguf":  # a GGUF source is used as it is
        if facts.dtype and facts.dtype.upper() != quant:
            logger.warning("the plan names %s but the GGUF file is %s; the file is used as it is", quant, facts.dtype)
        loads = source_gguf_files(resolved, snapshot)
    else:  # vLLM loads the HF checkpoint itself
        loads = hf_checkpoint_files(resolved, snapshot)

    prepared = Prepared(
        name=spec.name,
        engine=plan.engine,
        format=plan.artifact.format,
        quantization=quant,
        source=resolved.provenance(),
        source_revision=resolved.source_id,
        artifact_path=loads.path,
        files=loads.files,
        cached=downloaded == 0 and not built,
        downloaded_bytes=downloaded,
        resumed_bytes=resumed,
        built=built,
        predicted_bytes=predicted,
        plan=plan,
        facts=facts.summary(),
        mount_root=loads.mount_root,
        build_steps=steps,
        source_files=source_file_records(resolved, snapshot),
        toolchain=loads.toolchain,
    )
    publish_report(prepared)
    logger.info(
        "prepared %s: %s %s at %s (%s)",
        spec.name,
        prepared.format,
        quant,
        loads.path,
        "from the cache" if prepared.cached else f"downloaded {downloaded} bytes, built {built or 'nothing'}",
    )
    return prepared


__all__ = ["prepare_model"]
