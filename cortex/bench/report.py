"""Benchmark results as tables and markdown, for the terminal and Prefect artifacts."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from cortex.bench.gates import GateResult
from cortex.bench.metrics import BenchmarkResult


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def results_table(results: BenchmarkResult) -> list[dict[str, Any]]:
    """One row per level, for a Prefect table artifact or a terminal table."""
    rows = []
    for lv in results.levels:
        rows.append(
            {
                "concurrency": lv.concurrency,
                "completed": lv.completed,
                "errors": lv.errors,
                "req/s": round(lv.requests_per_s, 3),
                "out tok/s": round(lv.output_tokens_per_s, 2),
                "TTFT p50 ms": _fmt(lv.ttft_ms.p50),
                "TTFT p99 ms": _fmt(lv.ttft_ms.p99),
                "TPOT p50 ms": _fmt(lv.tpot_ms.p50),
                "TPOT p99 ms": _fmt(lv.tpot_ms.p99),
                "ITL p99 ms": _fmt(lv.itl_ms.p99),
                "E2EL p99 ms": _fmt(lv.e2el_ms.p99),
                "goodput req/s": _fmt(lv.goodput_per_s, 3),
                "USD / 1M out tok": _fmt(lv.cost_per_1m_output_tokens_usd, 2),
            }
        )
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain aligned text table."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "_no rows_"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def results_markdown(results: BenchmarkResult, gates: Sequence[GateResult] | None = None) -> str:
    """A markdown summary: load, the table, and the gates with their measured values."""
    s = results.settings
    load = (
        "closed loop"
        if s.request_rate is None
        else f"{s.request_rate:g} req/s ({'Poisson' if s.burstiness == 1.0 else f'gamma, burstiness {s.burstiness:g}'})"
    )
    parts = [
        f"# Benchmark: {results.model}",
        f"Target `{results.target}` ({results.base_url}{results.endpoint}), started {results.started_at}.",
        f"Load: {s.requests} requests per level, {load}, prompts {s.prompts}"
        f"{f' of {s.input_len} tokens' if s.prompts == 'random' else ''}, {s.output_len} output tokens"
        f"{' (ignore_eos)' if s.ignore_eos else ''}, at most {s.max_duration_s:g} s per level.",
        "Metrics as `vllm bench serve` defines them (TTFT, TPOT excluding the first token, ITL, E2EL).",
        "",
        markdown_table(results_table(results)),
    ]
    if s.gpu_hour_price_usd is not None:
        parts.append(f"\nCost at {s.gpu_hour_price_usd:g} USD per GPU-hour x {s.gpus} GPU(s).")
    errors = [e for lv in results.levels for e in lv.error_samples]
    if errors:
        parts.append("\n## Errors (samples)\n" + "\n".join(f"- `{e[:200]}`" for e in errors[:5]))
    if gates:
        verdict = "all passed" if all(g.passed for g in gates) else "FAILED"
        parts.append(
            f"\n## Gates: {verdict}\n" + "\n".join(f"- {'✅' if g.passed else '❌'} {g.message}" for g in gates)
        )
    return "\n".join(parts) + "\n"
