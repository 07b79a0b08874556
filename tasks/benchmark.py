"""Prefect tasks for the benchmark, its gates and the quantization quality check.

Each wraps one function of `cortex.bench` / `cortex.quality` and adds what Prefect is for:
a table artifact, a markdown summary with the chart embedded, an image artifact, the results
JSON and PNG on disk, and logging. A failed gate fails the task after the artifacts are
published, so the run shows the numbers that failed it.

The deploy flow calls, after the smoke test and inside its transaction (so a failure rolls
the new replica back and the previous one keeps serving):

    result = benchmark_replica(replica, spec)                  # raises GatesFailed
    kld = kl_divergence(f16_gguf, candidate_gguf, ...)         # when a KLD gate is set
    quality_check(f16_url, replica.endpoint, ..., kld=kld)     # llama.cpp quants only
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from cortex.bench import (
    BenchmarkResult,
    BenchmarkSettings,
    GateResult,
    GatesFailed,
    benchmark,
    evaluate_gates,
    results_markdown,
    results_table,
)
from cortex.charts import png_data_uri, render_chart
from cortex.kld import KldReport, measure_kld
from cortex.quality import (
    QUALITY_DEFAULTS,
    QualityReport,
    ReferenceContinuation,
    check_quant_quality,
    enforce_quality,
    greedy_reference,
)
from tasks.common import TASK_OPTIONS, ProgressArtifact, artifact_key


def default_results_dir(model: str) -> Path:
    """<CORTEX_HOME>/benchmarks/<model>/<UTC timestamp>/ (<model> made safe as an artifact key,
    and cut to 100 characters: a model name can be a long path, a folder name cannot)."""
    from cortex.settings import Settings

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(Settings.load().home) / "benchmarks" / artifact_key(model)[:100] / stamp


def publish_benchmark(
    result: BenchmarkResult,
    gates: Sequence[GateResult] = (),
    *,
    results_dir: Path | None = None,
    key: str | None = None,
) -> dict[str, Path]:
    """Save results JSON and chart PNG, and create the table, markdown and image artifacts."""
    key = key or artifact_key(f"benchmark-{result.model}")
    png = render_chart(result)
    files: dict[str, Path] = {}
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        files["json"] = result.save(results_dir / "results.json")
        files["png"] = results_dir / "chart.png"
        files["png"].write_bytes(png)
        if gates:
            import json

            files["gates"] = results_dir / "gates.json"
            files["gates"].write_text(json.dumps([g.to_dict() for g in gates], indent=2) + "\n")
    verdict = "" if not gates else (" — gates passed" if all(g.passed for g in gates) else " — gates FAILED")
    create_table_artifact(
        key=key,
        table=results_table(result),
        description=f"Benchmark of {result.model} at {result.base_url}{verdict}",
    )
    saved = f"\n\nSaved: `{files['json']}`, `{files['png']}`\n" if files else ""
    create_markdown_artifact(
        key=f"{key}-summary",
        markdown=results_markdown(result, gates)
        + saved
        + f"\n![throughput and TTFT against concurrency]({png_data_uri(png)})\n",
        description=f"Benchmark summary of {result.model}{verdict}",
    )
    create_image_artifact(
        image_url=png_data_uri(png),
        key=f"{key}-chart",
        description=f"Throughput and TTFT against concurrency: {result.model}",
    )
    return files


@task(name="benchmark", **TASK_OPTIONS)
def run_benchmark(
    base_url: str,
    settings: BenchmarkSettings,
    *,
    model: str | None = None,
    api_key: str | None = None,
    gates: Sequence[Any] = (),
    results_dir: str | Path | None = None,
    target: str | None = None,
) -> BenchmarkResult:
    """Benchmark `base_url`, publish artifacts, then fail if any gate fails."""
    logger = get_run_logger()
    logger.info(
        "benchmarking %s: concurrency %s, %d requests per level, %d in / %d out tokens",
        base_url,
        settings.concurrency,
        settings.requests,
        settings.input_len,
        settings.output_len,
    )

    def on_level(level) -> None:
        logger.info(
            "concurrency %d: %.1f out tok/s, TTFT p50 %s ms, %d errors",
            level.concurrency,
            level.output_tokens_per_s,
            "-" if level.ttft_ms.p50 is None else f"{level.ttft_ms.p50:.0f}",
            level.errors,
        )

    progress = ProgressArtifact(
        artifact_key(f"benchmark-{model or target or base_url}", "progress"),
        f"Benchmark of {model or base_url}: concurrency {settings.concurrency}, {settings.requests} requests per level",
        parts=len(settings.concurrency),
    )
    result = benchmark(
        base_url, settings, model=model, api_key=api_key, target=target, on_level=on_level, progress=progress.reporter()
    )
    progress.finish(f"{len(result.levels)} levels measured")
    checked = evaluate_gates(result, gates) if gates else []
    folder = Path(results_dir) if results_dir is not None else default_results_dir(result.model)
    files = publish_benchmark(result, checked, results_dir=folder)
    logger.info("benchmark results saved to %s", files.get("json"))
    failed = [g for g in checked if not g.passed]
    if failed:
        raise GatesFailed(failed)
    return result


def benchmark_replica(replica: Any, spec: Any, *, results_dir: str | Path | None = None) -> BenchmarkResult:
    """Benchmark a started replica with its spec's `benchmark` section and gates."""
    section = getattr(spec, "benchmark", None)
    settings = BenchmarkSettings.from_spec(section, gpus=spec.resources.gpu_count)
    return run_benchmark(
        replica.endpoint,
        settings,
        model=replica.model,
        api_key=getattr(replica, "api_key", None),
        gates=list(getattr(section, "gates", None) or []),
        results_dir=results_dir,
        target=replica.name,
    )


@task(name="kl-divergence", **TASK_OPTIONS)
def kl_divergence(
    reference_gguf: Path,
    candidate_gguf: Path,
    *,
    candidate_label: str,
    reference_sha256: str | None = None,
    max_kld: float | None = None,
    min_same_top_p: float | None = None,
) -> KldReport:
    """llama-perplexity's KL-divergence of the candidate from its F16 reference (cached by
    `cortex.kld`), judged by the gates; enforced with the agreement by `quality_check`."""
    report = measure_kld(
        reference_gguf,
        candidate_gguf,
        candidate_label=candidate_label,
        reference_sha256=reference_sha256,
        max_kld=max_kld,
        min_same_top_p=min_same_top_p,
    )
    get_run_logger().info(
        "%s vs F16 by llama-perplexity: mean KLD %.6f, KLD p99 %.6f, PPL ratio %.6f, same top p %.3f%%",
        candidate_label,
        report.mean_kld,
        report.kld_p99,
        report.ppl_ratio,
        100 * report.same_top_p,
    )
    return report


@task(name="quantization-quality", **TASK_OPTIONS)
def quality_check(
    reference: str | list[ReferenceContinuation],
    candidate_url: str,
    *,
    prompts: int = QUALITY_DEFAULTS.prompts,
    tokens: int = QUALITY_DEFAULTS.tokens,
    min_top1_agreement: float | None = None,
    candidate_label: str = "candidate",
    reference_label: str = "F16",
    api_key: str | None = None,
    reference_api_key: str | None = None,
    results_dir: str | Path | None = None,
    kld: KldReport | None = None,
) -> QualityReport:
    """Compare a quantized llama-server with its F16 reference (its URL, or continuations from
    `cortex.quality.greedy_reference`); publish, with `kld` (from `kl_divergence`) when given;
    fail when any gate is not met."""
    report = check_quant_quality(
        reference,
        candidate_url,
        prompts=prompts,
        tokens=tokens,
        min_top1_agreement=min_top1_agreement,
        candidate_label=candidate_label,
        reference_label=reference_label,
        api_key=api_key,
        reference_api_key=reference_api_key,
    )
    if kld is not None:
        report = report.with_kld(kld)
    if results_dir is not None:
        folder = Path(results_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "quality.json").write_text(report.to_json() + "\n")
    create_markdown_artifact(
        key=artifact_key(f"quality-{candidate_label}"),
        markdown=report.markdown(),
        description=f"Top-1 agreement of {candidate_label} with {reference_label}: {report.top1_agreement:.1%}"
        + (f"; mean KLD {kld.mean_kld:.6f}, same top p {100 * kld.same_top_p:.3f}%" if kld else ""),
    )
    get_run_logger().info(
        "%s agrees with %s on %.1f%% of next tokens (%d/%d)",
        candidate_label,
        reference_label,
        100 * report.top1_agreement,
        report.agreements,
        report.positions,
    )
    return enforce_quality(report)


@task(name="greedy-reference", **TASK_OPTIONS)
def greedy_continuations(
    reference_url: str,
    *,
    prompts: int = QUALITY_DEFAULTS.prompts,
    tokens: int = QUALITY_DEFAULTS.tokens,
    engine: str = "llamacpp",
    model: str | None = None,
    api_key: str | None = None,
) -> list[ReferenceContinuation]:
    """The reference's greedy continuations (`cortex.quality.greedy_reference`), to score one or
    more candidates against with `quality_check`."""
    return greedy_reference(reference_url, prompts, tokens, api_key=api_key, engine=engine, model=model)
