"""Benchmark gates: SLOs from the spec checked against measured results.

A gate names a metric (and a statistic for latencies), an optional concurrency level, and
`max` and/or `min`. Every gate is reported with its measured value; `enforce_gates` raises
`GatesFailed` listing each failed one, which a deploy turns into a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from cortex.bench.metrics import LATENCY_METRICS, RATE_METRICS, BenchmarkResult


@dataclass(frozen=True)
class GateResult:
    """One gate checked at one level."""

    metric: str
    stat: str | None
    concurrency: int | None
    value: float | None
    max: float | None
    min: float | None
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class GatesFailed(RuntimeError):
    """A benchmark gate failed; the message lists every failed gate with its measured value."""

    def __init__(self, failed: Sequence[GateResult]):
        self.failed = list(failed)
        lines = "\n".join(f"  - {g.message}" for g in self.failed)
        super().__init__(f"{len(self.failed)} benchmark gate(s) failed:\n{lines}")


def _gate_field(gate: Any, name: str, default: Any = None) -> Any:
    if isinstance(gate, Mapping):
        return gate.get(name, default)
    return getattr(gate, name, default)


def evaluate_gates(results: BenchmarkResult, gates: Sequence[Any]) -> list[GateResult]:
    """Check each gate (`metric`, `stat`, `concurrency`, `max`, `min`) against the results.

    A gate without a concurrency applies to every level. A level that was not measured,
    a value that could not be measured (no successful request), or a level with failed
    requests under a latency gate all fail the gate: a gate never passes for lack of data.
    """
    out: list[GateResult] = []
    for gate in gates:
        metric = _gate_field(gate, "metric")
        stat = _gate_field(gate, "stat", "p99") or "p99"
        conc = _gate_field(gate, "concurrency")
        vmax = _gate_field(gate, "max")
        vmin = _gate_field(gate, "min")
        if metric not in LATENCY_METRICS + RATE_METRICS:
            raise ValueError(f"gate metric {metric!r} is not one of {LATENCY_METRICS + RATE_METRICS}")
        if vmax is None and vmin is None:
            raise ValueError(f"gate on {metric} sets neither max nor min")
        shown_stat = stat if metric in LATENCY_METRICS else None
        name = f"{metric}.{stat}" if shown_stat else metric
        bound = " and ".join(
            s for s in (f"<= {vmax:g}" if vmax is not None else "", f">= {vmin:g}" if vmin is not None else "") if s
        )
        levels = results.levels if conc is None else [results.level(conc)]
        if conc is not None and levels[0] is None:
            out.append(
                GateResult(
                    metric,
                    shown_stat,
                    conc,
                    None,
                    vmax,
                    vmin,
                    False,
                    f"{name} at concurrency {conc}: level not measured "
                    f"(measured: {[lv.concurrency for lv in results.levels]}); must be {bound}",
                )
            )
            continue
        for lv in levels:
            assert lv is not None
            value = lv.value(metric, stat)
            where = f"{name} at concurrency {lv.concurrency}"
            if value is None:
                passed, msg = (
                    False,
                    f"{where}: no value ({lv.completed} of {lv.requests_planned} requests completed); must be {bound}",
                )
            else:
                passed = (vmax is None or value <= vmax) and (vmin is None or value >= vmin)
                msg = f"{where} = {value:.2f}; must be {bound}: {'ok' if passed else 'FAILED'}"
            out.append(GateResult(metric, shown_stat, lv.concurrency, value, vmax, vmin, passed, msg))
    return out


def enforce_gates(results: BenchmarkResult, gates: Sequence[Any]) -> list[GateResult]:
    """Evaluate the gates and raise `GatesFailed` with the numbers when any fails."""
    checked = evaluate_gates(results, gates)
    failed = [g for g in checked if not g.passed]
    if failed:
        raise GatesFailed(failed)
    return checked
