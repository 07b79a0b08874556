"""`cortex bench` and `cortex compare` against the fake streaming engine, and the chart."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from cortex.bench import BenchmarkResult, BenchmarkSettings, compute_level_metrics
from cortex.charts import png_data_uri, render_chart, save_chart
from cli.main import main as cli
from test_bench import FakeEngine, ServerThread, rec


@pytest.fixture
def fake():
    engine = FakeEngine(ttft_s=0.01, token_s=0.002)
    with ServerThread(engine.app()) as server:
        engine.base_url = server.base_url
        yield engine


LOAD = ["--concurrency", "1,2", "--requests", "4", "--input-len", "8", "--output-len", "6"]


def test_bench_json_prints_the_levels(fake, capsys):
    assert cli(["bench", fake.base_url, *LOAD, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2]
    level = out["levels"][1]
    for key in ("output_tokens_per_s", "requests_per_s", "errors"):
        assert key in level
    assert set(level["ttft_ms"]) == {"mean", "p50", "p90", "p99"}
    assert set(level["tpot_ms"]) == {"mean", "p50", "p90", "p99"}
    assert level["errors"] == 0 and level["ttft_ms"]["p50"] >= 10.0
    assert out["model"] == "fake-model"


def test_bench_table_and_saved_files(fake, capsys, tmp_path):
    assert cli(["bench", fake.base_url, *LOAD, "--save", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "out tok/s" in out and "TTFT p50 ms" in out
    saved = BenchmarkResult.load(tmp_path / "results.json")
    assert saved.levels[0].completed == 4
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_unreachable_target_fails_with_a_message(capsys):
    assert cli(["bench", "http://127.0.0.1:9", "--concurrency", "1", "--requests", "1"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_bench_model_name_goes_through_the_gateway_url(fake, capsys, monkeypatch):
    monkeypatch.setenv("CORTEX_GATEWAY_URL", fake.base_url)
    assert cli(["bench", "fake-model", *LOAD, "--json"]) == 0
    assert fake.bodies[-1]["model"] == "fake-model"


def test_rejects_a_bad_concurrency_list(capsys):
    assert cli(["bench", "http://x", "--concurrency", "1,zero"]) == 2
    assert "expected comma-separated integers" in capsys.readouterr().err


def make_result(tok_s: float, ttft: float, target: str) -> BenchmarkResult:
    s = BenchmarkSettings(concurrency=[1, 4])
    levels = [compute_level_metrics([rec(ttft, 1.0, int(tok_s))], 1.0, concurrency=c, settings=s) for c in (1, 4)]
    return BenchmarkResult(target=target, base_url=target, model="m", started_at="t", settings=s, levels=levels)


def test_compare_files_side_by_side_with_ratios(tmp_path, capsys):
    a = make_result(100, 0.1, "http://vllm").save(tmp_path / "a.json")
    b = make_result(80, 0.05, "http://llamacpp").save(tmp_path / "b.json")
    assert cli(["compare", str(a), str(b), "--json", "--chart", str(tmp_path / "c.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    row = out["levels"][0]
    assert row["out tok/s"] == {"a": 100.0, "b": 80.0, "b/a": pytest.approx(0.8)}
    assert row["TTFT p50 ms"]["b/a"] == pytest.approx(0.5)
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert cli(["compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "0.80x" in text and "B worse" in text and "B better" in text


def test_compare_a_file_with_a_live_target(fake, tmp_path, capsys):
    a = make_result(100, 0.1, "http://old").save(tmp_path / "a.json")
    assert (
        cli(
            [
                "compare",
                str(a),
                fake.base_url,
                "--concurrency",
                "1",
                "--requests",
                "2",
                "--input-len",
                "4",
                "--output-len",
                "3",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert [r["concurrency"] for r in out["levels"]] == [1]


def test_compare_missing_file(capsys, tmp_path):
    assert cli(["compare", str(tmp_path / "nope.json"), str(tmp_path / "nope2.json")]) == 1
    assert "no results file" in capsys.readouterr().err


def test_chart_is_a_png_with_both_panels(tmp_path):
    result = make_result(100, 0.1, "http://x")
    png = render_chart(result)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    path = save_chart([result, make_result(50, 0.2, "http://y")], tmp_path / "chart.png")
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 2 * height * 0.9  # two panels side by side
    assert png_data_uri(png).startswith("data:image/png;base64,iVBOR")
