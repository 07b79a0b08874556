"""Two benchmark results side by side, level by level, with the ratio B/A of each metric.

`cortex compare A B` prints it for any two results; `cortex compare-engines` holds the same
model on llama.cpp and vLLM with it (`cortex.compare_engines`).
"""

from __future__ import annotations

from typing import Any, Callable

from cortex.bench.metrics import BenchmarkResult, LevelResult

# (label, how to read it from a level, higher is better)
COLUMNS: list[tuple[str, Callable[[LevelResult], float | None], bool]] = [
    ("out tok/s", lambda lv: lv.output_tokens_per_s, True),
    ("req/s", lambda lv: lv.requests_per_s, True),
    ("TTFT p50 ms", lambda lv: lv.ttft_ms.p50, False),
    ("TTFT p99 ms", lambda lv: lv.ttft_ms.p99, False),
    ("TPOT p50 ms", lambda lv: lv.tpot_ms.p50, False),
    ("ITL p99 ms", lambda lv: lv.itl_ms.p99, False),
    ("E2EL p99 ms", lambda lv: lv.e2el_ms.p99, False),
    ("errors", lambda lv: lv.errors, False),
]

# a ratio this far from 1 is called better or worse
MEANINGFUL = 0.05


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return b / a


def compare_levels(a: BenchmarkResult, b: BenchmarkResult) -> list[dict[str, Any]]:
    """One row per concurrency level both measured: A, B and B/A for each column."""
    rows = []
    for lv_a in a.levels:
        lv_b = b.level(lv_a.concurrency)
        if lv_b is None:
            continue
        row: dict[str, Any] = {"concurrency": lv_a.concurrency}
        for label, read, _ in COLUMNS:
            va, vb = read(lv_a), read(lv_b)
            row[label] = {"a": va, "b": vb, "b/a": ratio(va, vb)}
        rows.append(row)
    return rows


def judge(label: str, r: float | None, higher_better: bool, b_name: str = "B") -> str:
    """ "B better" / "B worse" when the ratio is MEANINGFUL off 1, else ""."""
    if r is None or label == "errors" or abs(r - 1) < MEANINGFUL:
        return ""
    return f"{b_name} better" if (r > 1) == higher_better else f"{b_name} worse"


def cell(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if isinstance(v, int) else f"{v:.1f}"


def same_load(a: BenchmarkResult, b: BenchmarkResult) -> bool:
    sa, sb = a.settings, b.settings
    return (sa.input_len, sa.output_len, sa.prompts) == (sb.input_len, sb.output_len, sb.prompts)
