"""`cortex compare-engines`: the winner and rule verdict on constructed results, and one real
run of SmolLM2 on llama-server (its Q8_0 from the HF checkpoint) and vLLM on CPU (the HF
checkpoint) through the flow, with --promote. The real run takes minutes (vLLM's start)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.bench import BenchmarkResult, BenchmarkSettings, compute_level_metrics, evaluate_gates
from cortex.bench.metrics import RequestRecord
from cortex.compare_engines import (
    CompareError,
    EngineComparison,
    EngineRun,
    Verdict,
    deciding_level,
    hour_price,
    judge_comparison,
    side_by_side_spec,
    write_spec,
)
from cortex.quality import QualityReport
from cortex.spec import ModelSpec
from cortex.specfile import load_spec


def rec(ttft: float, latency: float, tokens: int, ok: bool = True) -> RequestRecord:
    if not ok:
        return RequestRecord(success=False, error="boom", latency=latency)
    gap = (latency - ttft) / max(tokens - 1, 1)
    return RequestRecord(
        success=True, ttft=ttft, itl=[gap] * (tokens - 1), latency=latency, prompt_tokens=32, output_tokens=tokens
    )


def result(tok_s: float, *, levels: tuple[int, ...] = (1, 2), errors: int = 0) -> BenchmarkResult:
    s = BenchmarkSettings(concurrency=list(levels), gpu_hour_price_usd=1.0, gpus=0)
    out = []
    for c in levels:
        records = [rec(0.05, 1.0, int(tok_s))] + [rec(0, 1.0, 0, ok=False)] * errors
        out.append(compute_level_metrics(records, 1.0, concurrency=c, settings=s))
    return BenchmarkResult(target="t", base_url="http://x", model="m", started_at="now", settings=s, levels=out)


def run(engine: str, tok_s: float, gates: list | None = None, **kw) -> EngineRun:
    bench = result(tok_s, **kw)
    return EngineRun(
        engine=engine,
        served_name=f"m-{engine}",
        replica=f"{engine}-model-m",
        runtime="process",
        endpoint="http://x",
        artifact="GGUF Q8_0" if engine == "llamacpp" else "HF BF16",
        devices=0,
        hour_price_usd=1.0,
        benchmark=bench,
        gates=evaluate_gates(bench, gates or []),
    )


def agreement(top1: float) -> QualityReport:
    return QualityReport(
        reference_label="vLLM",
        candidate_label="llama.cpp",
        prompts=4,
        tokens_per_prompt=10,
        positions=40,
        agreements=round(40 * top1),
        top1_agreement=top1,
        identical_continuations=0.5,
        mean_first_divergence=5.0,
    )


RULES_LLAMACPP = ("llamacpp", "rule vram-for-16bit: no GPU memory on this host")


def test_the_faster_engine_wins_when_both_pass_and_the_verdict_holds_it_against_the_rules() -> None:
    v = judge_comparison([run("llamacpp", 50), run("vllm", 20)], concurrency=2, rules=RULES_LLAMACPP)
    assert (v.winner, v.level, v.agrees_with_rules) == ("llamacpp", 2, True)
    assert "both passed" in v.why and "50.0 against 20.0" in v.why
    assert v.rule_verdict.startswith("the measurement agrees with the rules: they chose llama.cpp")

    v = judge_comparison([run("llamacpp", 20), run("vllm", 50)], concurrency=2, rules=RULES_LLAMACPP)
    assert (v.winner, v.agrees_with_rules) == ("vllm", False)
    assert "disagrees" in v.rule_verdict and "pin `engine: vllm`" in v.rule_verdict


def test_a_side_that_fails_a_gate_cannot_win_however_fast() -> None:
    gate = [{"metric": "output_tokens_per_s", "min": 30}]
    v = judge_comparison([run("llamacpp", 20, gate), run("vllm", 40, gate)], concurrency=2, rules=RULES_LLAMACPP)
    assert v.winner == "vllm" and v.failures["vllm"] == []
    assert "only vLLM passed" in v.why and "output_tokens_per_s" in v.failures["llamacpp"][0]
    assert v.agrees_with_rules is False

    v = judge_comparison([run("llamacpp", 10, gate), run("vllm", 20, gate)], concurrency=2, rules=RULES_LLAMACPP)
    assert v.winner is None and v.agrees_with_rules is None
    assert v.why.startswith("neither engine passed") and "no measured winner" in v.rule_verdict


def test_failed_requests_and_low_agreement_disqualify() -> None:
    v = judge_comparison([run("llamacpp", 90), run("vllm", 20, errors=1)], concurrency=2, rules=RULES_LLAMACPP)
    assert v.winner == "llamacpp" and v.failures["vllm"] == ["1 failed request(s) at concurrency 2"]
    # the agreement gate applies to llama.cpp, judged against vLLM's full-precision output
    v = judge_comparison(
        [run("llamacpp", 90), run("vllm", 20)],
        concurrency=2,
        rules=RULES_LLAMACPP,
        agreement=agreement(0.5),
        min_agreement=0.9,
    )
    assert v.winner == "vllm" and "50.0%" in v.failures["llamacpp"][0]


def test_the_deciding_level_is_the_specs_concurrency_or_the_nearest_below() -> None:
    runs = [run("llamacpp", 10, levels=(1, 4, 16)), run("vllm", 10, levels=(1, 4))]
    assert deciding_level(runs, 4) == 4
    assert deciding_level(runs, 16) == 4  # 16 only one side measured
    assert deciding_level([run("llamacpp", 1, levels=(8,)), run("vllm", 1, levels=(8,))], 2) == 8
    with pytest.raises(CompareError, match="no concurrency level in common"):
        deciding_level([run("llamacpp", 1, levels=(1,)), run("vllm", 1, levels=(2,))], 2)


def test_the_table_has_every_metric_per_level_cost_and_agreement() -> None:
    runs = [run("llamacpp", 50), run("vllm", 20)]
    comparison = EngineComparison(
        name="m",
        runs=runs,
        agreement=agreement(0.75),
        verdict=judge_comparison(runs, concurrency=2, rules=RULES_LLAMACPP),
    )
    rows = comparison.rows()
    assert list(rows[0]) == ["", "metric", "llama.cpp", "vLLM", "vLLM/llama.cpp"]
    per_level = [(r[""], r["metric"]) for r in rows if r[""].startswith("conc")]
    assert ("conc 1", "out tok/s") in per_level and ("conc 2", "TPOT p50 ms") in per_level
    cost = next(r for r in rows if r[""] == "conc 2" and r["metric"] == "USD / 1M out tok")
    # 1 USD per host-hour at 50 and 20 output tokens/s
    assert cost["llama.cpp"] == f"{1e6 / 3600 / 50:.4g}" and cost["vLLM"] == f"{1e6 / 3600 / 20:.4g}"
    assert any(r["metric"].startswith("top-1 agreement") and r["llama.cpp"].startswith("75.0%") for r in rows)
    assert "winner: llama.cpp" in comparison.lines()[0]
    assert "| conc 2 | out tok/s |" in comparison.markdown()


def test_hour_price_per_gpu_or_per_host() -> None:
    spec = ModelSpec.model_validate({"name": "m", "source": {"repo": "a/b"}, "benchmark": {"gpu_hour_price_usd": 3}})
    assert hour_price(spec, 2, 1.0, 0.2) == 3 and hour_price(spec, 0, 1.0, 0.2) == 0.2
    assert hour_price(spec.model_copy(update={"benchmark": None}), 1, 1.0, None) == 1.0


def test_side_by_side_specs_round_trip_with_their_own_name(tmp_path: Path) -> None:
    spec = ModelSpec.model_validate(
        {"name": "m", "aliases": ["x"], "source": {"path": str(tmp_path)}, "benchmark": {"requests": 3}}
    )
    side = side_by_side_spec(spec, "vllm")
    assert (side.name, side.engine, side.aliases, side.benchmark) == ("m-vllm", "vllm", [], None)
    assert load_spec(write_spec(side, tmp_path / "s.yaml")) == side
    with pytest.raises(CompareError, match="DNS-safe"):
        side_by_side_spec(spec.model_copy(update={"name": "m" * 60}), "llamacpp")


# ------------------------------------------------------------------------------ the real run


def test_compare_engines_on_smollm2_llama_server_and_vllm_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toolchain, vllm_install, test_model, capsys
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from cli.commands.compare_engines import _render
    from cli.output import show
    from cortex.bench.compare import COLUMNS
    from cortex.runtime import get_runtime
    from flows.compare import compare_engines
    from flows.deploy import retire_model

    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CORTEX_GATEWAY_URL", "http://127.0.0.1:9")  # no gateway here
    monkeypatch.setenv("CORTEX_CPU_HOUR_PRICE_USD", "0.10")
    spec_path = tmp_path / "smollm2.yaml"
    spec_path.write_text(
        f"""
name: smollm2-cmp
source: {{path: {test_model.hf_dir}}}
resources: {{concurrency: 2, context_length: 512}}
runtime: process
tests: {{max_tokens: 8}}
benchmark:
  concurrency: [1, 2]
  requests: 4
  input_len: 32
  output_len: 16
  gates: [{{metric: ttft_ms, stat: p99, max: 600000}}]   # a hang guard, not a speed test
  quality: {{prompts: 4, tokens: 16}}
"""
    )
    with prefect_test_harness(server_startup_timeout=120):
        try:
            comparison = compare_engines(str(spec_path), promote=True)
            running = get_runtime("process").list()
            # planned against actual of both real deploys (llama-server, vLLM on CPU) in their
            # Prefect artifacts, and the promoted replica's in `cortex status --json`
            with get_client(sync_client=True) as client:
                keys = [f"memory-{side.served_name}" for side in comparison.runs]
                found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
            assert {a.key for a in found} == set(keys)
            for artifact in found:
                table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
                assert {(r["device"], r["term"]) for r in table} >= {("cpu", "weights"), ("cpu", "KV cache")}, table
            shown = subprocess.run(
                [sys.executable, "-m", "cli", "status", "smollm2-cmp", "--json", "--runtime", "process"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert shown.returncode == 0, shown.stderr
            [row] = json.loads(shown.stdout)
            assert row["memory"]["readable"] and row["memory"]["engine"] == comparison.verdict.winner, row
        finally:
            retire_model("smollm2-cmp")
    with capsys.disabled():
        for part in _render(comparison):
            show(part)
    print(json.dumps(comparison.verdict.model_dump()))

    rows = comparison.rows()
    for level in ("conc 1", "conc 2"):
        metrics = {r["metric"] for r in rows if r[""] == level}
        assert {label for label, _, _ in COLUMNS} | {"USD / 1M out tok"} <= metrics
    cost = next(r for r in rows if r["metric"] == "USD / 1M out tok")
    assert cost["llama.cpp"] != "-" and cost["vLLM"] != "-"
    assert 0 <= comparison.agreement.top1_agreement <= 1 and comparison.agreement.positions == 4 * 16
    for side in comparison.runs:
        assert side.memory is not None and side.memory.readable, side.memory
        weights = next(r for r in side.memory.rows if r.device == "cpu" and r.term == "weights")
        assert weights.planned_bytes and weights.actual_bytes, weights
    memory_rows = [r for r in rows if r[""] == "memory cpu" and r["metric"] == "weights planned/actual"]
    assert len(memory_rows) == 1 and "/" in memory_rows[0]["llama.cpp"] and "/" in memory_rows[0]["vLLM"]
    v: Verdict = comparison.verdict
    assert v.rules_engine == "llamacpp" and "vram-for-16bit" in v.rules_reason  # a CPU host
    assert v.winner is not None, v.why  # the hang-guard gate passes on both
    assert v.agrees_with_rules is (v.winner == "llamacpp") and v.rule_verdict
    assert sorted(comparison.retired) == sorted(r.replica for r in comparison.runs)
    # --promote: exactly the winner runs, under the spec's own name
    assert [(r.model, r.engine, r.name) for r in running] == [("smollm2-cmp", v.winner, comparison.promoted)]
    assert get_runtime("process").list() == []
