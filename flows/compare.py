"""compare_engines(spec_path): the seed's migration check, "start and benchmark, compare vs
llama.cpp, archive the old one if satisfied", as one flow.

    deploy and benchmark     per engine in turn: the deploy-model flow on the spec with `engine:`
                             pinned, served as <name>-llamacpp and <name>-vllm (no gateway route),
                             then the spec's `benchmark` load on it before the next side starts
                             (on a CPU host an idle engine still competes for the cores), gates
                             evaluated
    agreement                greedy top-1 agreement of llama.cpp with vLLM (the HF checkpoint)
    judge                    the winner by the spec's gates, held against the rules' choice
    retire both              the side-by-side replicas are always stopped at the end
    promote (if asked)       the spec deployed under its real name with `engine:` pinned to the
                             winner: the usual gated deploy, replacing the model's old replica

What is compared and decided lives in `cortex.compare_engines`; this flow only orchestrates it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cortex.actual import MemoryComparison, read_memory_record
from cortex.bench import BenchmarkSettings, evaluate_gates
from cortex.compare_engines import (
    ENGINES,
    REFERENCE,
    CompareError,
    Engine,
    EngineComparison,
    EngineRun,
    artifact_label,
    hour_price,
    judge_comparison,
    pinned_spec,
    rules_choice,
    side_by_side_spec,
    write_spec,
)
from cortex.pipeline import plan_spec
from cortex.quality import QUALITY_DEFAULTS
from cortex.runtime import Replica, RuntimeKind, get_runtime
from cortex.settings import Settings
from cortex.specfile import load_spec
from flows.deploy import deploy_model, retire_model
from tasks.benchmark import greedy_continuations, quality_check, run_benchmark
from tasks.common import artifact_key


@flow(name="compare-engines")
def compare_engines(spec_path: str, runtime: RuntimeKind | None = None, promote: bool = False) -> EngineComparison:
    """Deploy the spec on both engines side by side, measure both, judge; see the module docstring."""
    logger = get_run_logger()
    spec = load_spec(spec_path)
    kind: RuntimeKind = runtime or spec.runtime
    settings = Settings.load()
    folder = Path(settings.home) / "compare" / spec.name
    sides = {engine: side_by_side_spec(spec, engine) for engine in ENGINES}
    plans = {engine: plan_spec(side, Path(spec_path)).plan for engine, side in sides.items()}
    rules = rules_choice(plans["llamacpp"].decision)
    quality = spec.benchmark.quality if spec.benchmark and spec.benchmark.quality else QUALITY_DEFAULTS
    runs: list[EngineRun] = []
    retired: list[str] = []
    try:
        replicas: dict[Engine, Replica] = {}
        # Each side is benchmarked as soon as it is ready, before the next one starts: on a host
        # without GPUs both engines share the cores, and an idle vLLM CPU worker still takes them.
        for engine, side in sides.items():
            deployed = deploy_model(str(write_spec(side, folder / f"{engine}.yaml")), runtime=kind, gateway=False)
            replica = next(r for r in get_runtime(kind).replicas_of(side.name) if r.name == deployed.replica)
            replicas[engine] = replica
            devices = len(replica.launch.gpus) if replica.launch else 0
            price = hour_price(spec, devices, settings.gpu_hour_price_usd, settings.cpu_hour_price_usd)
            load = BenchmarkSettings.from_spec(spec.benchmark, gpus=devices, gpu_hour_price_usd=price)
            result = run_benchmark(
                replica.endpoint, load, model=replica.model, api_key=replica.api_key, target=replica.name
            )
            record = read_memory_record(replica.name)
            runs.append(
                EngineRun(
                    engine=engine,
                    served_name=replica.model,
                    replica=replica.name,
                    runtime=replica.runtime,
                    endpoint=replica.endpoint,
                    artifact=artifact_label(plans[engine].artifact.format, plans[engine].artifact.quantization),
                    devices=devices,
                    hour_price_usd=price,
                    benchmark=result,
                    gates=evaluate_gates(result, spec.benchmark.gates) if spec.benchmark else [],
                    memory=MemoryComparison.from_json(record) if record else None,
                )
            )
        reference, candidate = replicas[REFERENCE], replicas["llamacpp"]
        continuations = greedy_continuations(
            reference.endpoint,
            prompts=quality.prompts,
            tokens=quality.tokens,
            engine=REFERENCE,
            model=reference.model,
            api_key=reference.api_key,
        )
        agreement = quality_check(
            continuations,
            candidate.endpoint,
            candidate_label=f"{spec.name} llama.cpp {runs[0].artifact}",
            reference_label=f"vLLM {runs[1].artifact}",
            api_key=candidate.api_key,
        )
    finally:  # the side-by-side replicas never outlive the comparison
        for side in sides.values():
            try:
                retired += retire_model(side.name, runtime=kind)
            except LookupError as nothing:  # its deploy failed: nothing of it runs
                logger.info("%s: nothing to retire (%s)", side.name, nothing)
    verdict = judge_comparison(
        runs,
        concurrency=spec.resources.concurrency,
        rules=rules,
        agreement=agreement,
        min_agreement=quality.min_top1_agreement,
    )
    logger.info("winner: %s; %s", verdict.winner or "none", verdict.rule_verdict)
    promoted = None
    if promote:
        if verdict.winner is None:
            raise CompareError(f"nothing promoted: {verdict.why}")
        path = write_spec(pinned_spec(spec, verdict.winner), folder / "promote.yaml")
        promoted = deploy_model(str(path), runtime=kind).replica
    comparison = EngineComparison(
        name=spec.name, runs=runs, agreement=agreement, verdict=verdict, promoted=promoted, retired=retired
    )
    key = artifact_key(f"compare-engines-{spec.name}")
    create_table_artifact(key=key, table=comparison.rows(), description=" ".join(comparison.lines()))
    create_markdown_artifact(key=f"{key}-summary", markdown=comparison.markdown(), description=verdict.rule_verdict)
    return comparison
