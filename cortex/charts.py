"""Benchmark charts: output throughput and TTFT against concurrency, as a PNG.

One chart can hold several results (a comparison): each is one line per panel.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers

import matplotlib.pyplot as plt  # noqa: E402

from cortex.bench import BenchmarkResult  # noqa: E402


def _label(result: BenchmarkResult) -> str:
    return result.target if result.target == result.model else f"{result.target} ({result.model})"


def render_chart(results: BenchmarkResult | Sequence[BenchmarkResult], *, title: str | None = None) -> bytes:
    """PNG bytes: left, output tokens/s against concurrency; right, TTFT p50 and p99 (ms)
    against concurrency. Each point is labelled with its value."""
    runs = [results] if isinstance(results, BenchmarkResult) else list(results)
    if not runs or not any(r.levels for r in runs):
        raise ValueError("nothing to chart: no measured levels")
    fig, (ax_tp, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        levels = sorted(run.levels, key=lambda lv: lv.concurrency)
        conc = [lv.concurrency for lv in levels]
        name = _label(run) if len(runs) > 1 else "output tok/s"
        tps = [lv.output_tokens_per_s for lv in levels]
        ax_tp.plot(conc, tps, "o-", color=color, label=name)
        for x, y in zip(conc, tps):
            ax_tp.annotate(
                f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8, color=color
            )
        p50 = [(lv.concurrency, lv.ttft_ms.p50) for lv in levels if lv.ttft_ms.p50 is not None]
        p99 = [(lv.concurrency, lv.ttft_ms.p99) for lv in levels if lv.ttft_ms.p99 is not None]
        prefix = f"{_label(run)} " if len(runs) > 1 else ""
        if p50:
            ax_ttft.plot(*zip(*p50), "o-", color=color, label=f"{prefix}TTFT p50")
            for x, y in p50 if len(runs) == 1 else []:
                ax_ttft.annotate(
                    f"{y:.0f}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(0, -12),
                    ha="center",
                    fontsize=8,
                    color=color,
                )
        if p99:
            ax_ttft.plot(*zip(*p99), "^--", color=color, alpha=0.7, label=f"{prefix}TTFT p99")
    all_conc = sorted({lv.concurrency for r in runs for lv in r.levels})
    for ax in (ax_tp, ax_ttft):
        ax.set_xlabel("concurrency (requests in flight)")
        if len(all_conc) > 1 and all_conc[-1] / max(all_conc[0], 1) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(all_conc)
        ax.set_xticklabels([str(c) for c in all_conc])
        ax.grid(True, alpha=0.3)
    ax_tp.set_ylabel("output tokens / s")
    ax_tp.set_ylim(bottom=0, top=max(lv.output_tokens_per_s for r in runs for lv in r.levels) * 1.15 or 1)
    ax_tp.set_title("Throughput")
    ax_ttft.set_ylabel("time to first token (ms)")
    ax_ttft.set_ylim(bottom=0)
    ax_ttft.set_title("Time to first token")
    ax_tp.legend(loc="upper left", fontsize=8)
    ax_ttft.legend(loc="upper left", fontsize=8)
    s = runs[0].settings
    fig.suptitle(
        title
        or (
            f"{_label(runs[0]) if len(runs) == 1 else 'comparison'}: "
            f"{s.input_len if s.prompts == 'random' else 'bundled'} in / {s.output_len} out tokens, "
            f"{s.requests} requests per level"
        ),
        fontsize=11,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def save_chart(results: BenchmarkResult | Sequence[BenchmarkResult], path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render_chart(results, **kwargs))
    return path


def png_data_uri(png: bytes) -> str:
    """The PNG as a data: URI, so a markdown artifact can embed it."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
