"""The Prefect benchmark task: artifacts (table, markdown with the chart, image), files on disk,
and a failed gate failing the task after the numbers are published."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from cortex.bench import BenchmarkResult, BenchmarkSettings, GatesFailed
from cortex.spec import Gate
from tasks.benchmark import run_benchmark
from test_bench import FakeEngine, ServerThread


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def fake():
    engine = FakeEngine(ttft_s=0.01, token_s=0.002)
    with ServerThread(engine.app()) as server:
        engine.base_url = server.base_url
        yield engine


def artifacts(key: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def latest(key: str):
    return max(artifacts(key), key=lambda a: a.created)


SETTINGS = BenchmarkSettings(concurrency=[1, 2], requests=4, input_len=8, output_len=6)


def test_benchmark_task_publishes_table_summary_chart_and_files(prefect_api, fake, tmp_path: Path):
    @flow
    def bench_flow() -> BenchmarkResult:
        return run_benchmark(
            fake.base_url, SETTINGS, results_dir=tmp_path, gates=[Gate(metric="requests_per_s", min=0.001)]
        )

    result = bench_flow()
    assert [lv.completed for lv in result.levels] == [4, 4]
    assert BenchmarkResult.load(tmp_path / "results.json") == result
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "requests_per_s" in (tmp_path / "gates.json").read_text()

    table = latest("benchmark-fake-model")
    assert table.type == "table" and "gates passed" in table.description
    summary = latest("benchmark-fake-model-summary")
    assert summary.type == "markdown"
    assert "| concurrency |" in summary.data and "Gates: all passed" in summary.data
    png_b64 = summary.data.split("data:image/png;base64,")[1].split(")")[0]
    assert base64.b64decode(png_b64)[:8] == b"\x89PNG\r\n\x1a\n"
    image = latest("benchmark-fake-model-chart")
    assert image.type == "image" and image.data.startswith("data:image/png;base64,")


def test_a_failed_gate_fails_the_task_after_publishing_the_numbers(prefect_api, fake, tmp_path: Path):
    @flow
    def bench_flow() -> BenchmarkResult:
        return run_benchmark(
            fake.base_url,
            SETTINGS,
            results_dir=tmp_path,
            target="impossible",
            gates=[Gate(metric="ttft_ms", stat="p50", max=0.001, concurrency=2)],
        )

    with pytest.raises(GatesFailed, match=r"ttft_ms.p50 at concurrency 2 = \d+\.\d+; must be <= 0.001"):
        bench_flow()
    assert (tmp_path / "results.json").is_file()
    assert "Gates: FAILED" in latest("benchmark-fake-model-summary").data


def test_the_benchmark_task_keeps_a_progress_artifact_and_prints_plain_lines(prefect_api, fake, tmp_path: Path, capfd):
    """The same progress events feed the Prefect progress artifact (one part per level) and, off
    a terminal, plain lines on stderr."""
    from prefect.client.schemas.filters import ArtifactFilterFlowRunId
    from prefect.context import get_run_context

    @flow
    def bench_flow() -> str:
        run_benchmark(fake.base_url, SETTINGS, model="fake-model", results_dir=tmp_path)
        return str(get_run_context().flow_run.id)

    run_id = bench_flow()
    with get_client(sync_client=True) as client:
        of_run = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    progress = [a for a in of_run if a.key == "benchmark-fake-model-progress"]
    assert len(progress) == 1 and progress[0].type == "progress"
    assert float(progress[0].data) == 100.0 and progress[0].description == "2 levels measured"
    err = capfd.readouterr().err
    for conc in (1, 2):
        lines = [line for line in err.splitlines() if line.startswith(f"cortex: benchmark concurrency {conc}: ")]
        assert lines and "4/4 requests, done" in lines[-1] and len(lines) <= 6, lines
