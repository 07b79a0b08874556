"""The seed's migration check, measured: one spec on llama.cpp and on vLLM side by side.

    side_by_side_spec(spec, engine)   the spec with `engine:` pinned and its own served name
                                      (`<name>-llamacpp`, `<name>-vllm`), so both run at once
    EngineRun                         what one side measured: the benchmark (the spec's load,
                                      the same for both), its gates, planned against actual
                                      memory, the price of the hardware it held
    judge_comparison(...)             the winner by the spec's gates, and whether the measurement
                                      agrees with the engine the decision rules chose
    EngineComparison.rows()           the side-by-side table (terminal and Prefect artifact)

The winner: each side must pass every gate of the spec's `benchmark` section, have no failed
request at the deciding level and, for llama.cpp, agree with vLLM on at least
`benchmark.quality.min_top1_agreement` of the greedy next tokens when the spec sets it (vLLM
serves the HF checkpoint at full precision: it is the reference). Among the sides that pass,
the higher output tokens/s at the deciding level wins: the spec's `resources.concurrency` when
the benchmark measured it, else the highest level below it both measured (else the lowest).

Cost per 1M output tokens = hourly price x devices / 3600 / output tokens/s x 1e6, the
benchmark's own formula (`cortex.bench.metrics.cost_per_1m_output_tokens`): the spec's
`benchmark.gpu_hour_price_usd` or CORTEX_GPU_HOUR_PRICE_USD per GPU for an engine that holds
GPUs, CORTEX_CPU_HOUR_PRICE_USD for the whole host for one that runs on none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from cortex.actual import MemoryComparison
from cortex.bench.compare import COLUMNS, cell, ratio
from cortex.bench.gates import GateResult
from cortex.bench.metrics import BenchmarkResult
from cortex.bench.report import markdown_table
from cortex.decide import ENGINE_NAMES, Decision
from cortex.fileio import atomic_write_bytes
from cortex.quality import QualityReport
from cortex.spec import ModelSpec, format_bytes

Engine = Literal["llamacpp", "vllm"]
ENGINES: tuple[Engine, Engine] = ("llamacpp", "vllm")
# the side whose output is the reference of the agreement: the HF checkpoint at full precision
REFERENCE: Engine = "vllm"


class CompareError(ValueError):
    """The spec cannot be compared on both engines (the message says why and what to do)."""


def side_by_side_name(name: str, engine: str) -> str:
    return f"{name}-{engine}"


def side_by_side_spec(spec: ModelSpec, engine: Engine) -> ModelSpec:
    """The spec deployed for one side: `engine:` pinned, served as `<name>-<engine>` with no
    aliases (both sides and the model's own replicas run at once), no `benchmark` (the comparison
    benchmarks both sides itself, with the same load, after both are up) and no schedule."""
    data = spec.model_dump()
    data.update(name=side_by_side_name(spec.name, engine), engine=engine, aliases=[], benchmark=None, schedule=None)
    try:
        return ModelSpec.model_validate(data)
    except ValueError as exc:
        raise CompareError(
            f"{spec.name}: the side-by-side spec for {ENGINE_NAMES[engine]} is not valid ({exc}); "
            f"the served name {side_by_side_name(spec.name, engine)!r} must be DNS-safe and at most 63 characters"
        ) from exc


def pinned_spec(spec: ModelSpec, engine: Engine) -> ModelSpec:
    """The spec itself with `engine:` pinned: what `--promote` deploys under the real name."""
    return spec.model_copy(update={"engine": engine})


def write_spec(spec: ModelSpec, path: Path) -> Path:
    """Write a (derived) spec as YAML that `load_spec` reads back to the same spec: paths in a
    loaded spec are absolute, so the file can live anywhere."""
    text = "# written by `cortex compare-engines`; the comparison's own copy\n" + yaml.safe_dump(
        spec.model_dump(mode="json"), sort_keys=False
    )
    atomic_write_bytes(path, text.encode())
    return path


def rules_choice(decision: Decision) -> tuple[Engine, str]:
    """The engine the decision rules chose (whatever the spec pins) and the rule with its reason."""
    decided = next(r for r in decision.trace if r.decided)
    engine: Engine = "vllm" if decided.engine == "vllm" else "llamacpp"
    return engine, f"rule {decided.rule}: {decided.reason}"


class EngineRun(BaseModel):
    """One side of the comparison, as measured."""

    engine: Engine
    served_name: str
    replica: str
    runtime: str
    endpoint: str
    artifact: str = Field(description="what the engine loaded, e.g. 'GGUF Q8_0' or 'HF BF16'")
    devices: int = Field(description="GPUs the replica held (0: it ran on the CPU)")
    hour_price_usd: float | None = Field(None, description="USD per GPU-hour, or per host-hour with no GPU")
    benchmark: BenchmarkResult
    gates: list[GateResult] = Field(default_factory=list)
    memory: MemoryComparison | None = None

    @property
    def label(self) -> str:
        return ENGINE_NAMES[self.engine]

    def failures(
        self, level: int, agreement: QualityReport | None = None, min_agreement: float | None = None
    ) -> list[str]:
        """Why this side cannot win: failed gates, failed requests at the deciding level, and
        (for the side that is not the reference) too little agreement with the reference."""
        out = [g.message for g in self.gates if not g.passed]
        measured = self.benchmark.level(level)
        if measured is None:
            out.append(f"concurrency {level} was not measured")
        elif measured.errors:
            out.append(f"{measured.errors} failed request(s) at concurrency {level}")
        if self.engine != REFERENCE and min_agreement is not None and agreement is not None:
            if agreement.top1_agreement < min_agreement:
                out.append(
                    f"agrees with {ENGINE_NAMES[REFERENCE]} on {agreement.top1_agreement:.1%} of next tokens, "
                    f"below benchmark.quality.min_top1_agreement {min_agreement:.1%}"
                )
        return out


def deciding_level(runs: list[EngineRun], concurrency: int) -> int:
    """The concurrency level the winner is chosen at: the spec's when both sides measured it,
    else the highest level both measured below it, else the lowest both measured."""
    common = sorted(set.intersection(*({lv.concurrency for lv in r.benchmark.levels} for r in runs)))
    if not common:
        raise CompareError("the two benchmarks have no concurrency level in common")
    below = [c for c in common if c <= concurrency]
    return below[-1] if below else common[0]


class Verdict(BaseModel):
    winner: Engine | None
    why: str
    level: int
    failures: dict[str, list[str]] = Field(default_factory=dict)
    rules_engine: Engine
    rules_reason: str
    agrees_with_rules: bool | None = Field(description="None when no side passed its gates")
    rule_verdict: str


def judge_comparison(
    runs: list[EngineRun],
    *,
    concurrency: int,
    rules: tuple[Engine, str],
    agreement: QualityReport | None = None,
    min_agreement: float | None = None,
) -> Verdict:
    """The winner by the spec's gates (higher output tok/s at the deciding level among the sides
    that pass), held against the engine the rules chose."""
    level = deciding_level(runs, concurrency)
    failures = {r.engine: r.failures(level, agreement, min_agreement) for r in runs}
    passing = [r for r in runs if not failures[r.engine]]
    rules_engine, rules_reason = rules
    tps = {r.engine: r.benchmark.level(level).output_tokens_per_s for r in passing}  # type: ignore[union-attr]
    if not passing:
        winner, why = (
            None,
            "neither engine passed the spec's gates: "
            + "; ".join(f"{ENGINE_NAMES[e]}: {', '.join(f)}" for e, f in failures.items()),
        )
    elif len(passing) == 1:
        winner = passing[0].engine
        loser = next(e for e in failures if e != winner)
        why = (
            f"only {ENGINE_NAMES[winner]} passed the spec's gates ({ENGINE_NAMES[loser]}: {'; '.join(failures[loser])})"
        )
    else:
        best = max(passing, key=lambda r: tps[r.engine])
        other = next(r for r in passing if r is not best)
        winner = best.engine
        why = (
            f"both passed the spec's gates; {best.label} has the higher output throughput at concurrency {level} "
            f"({tps[best.engine]:.1f} against {tps[other.engine]:.1f} tok/s)"
        )
    if winner is None:
        agrees, verdict = None, f"no measured winner to hold against the rules' choice ({ENGINE_NAMES[rules_engine]})"
    elif winner == rules_engine:
        agrees, verdict = (
            True,
            f"the measurement agrees with the rules: they chose {ENGINE_NAMES[rules_engine]} ({rules_reason})",
        )
    else:
        agrees, verdict = (
            False,
            f"the measurement disagrees with the rules: they chose {ENGINE_NAMES[rules_engine]} ({rules_reason}), "
            f"{ENGINE_NAMES[winner]} measured better; to follow the measurement, pin `engine: {winner}` in the spec",
        )
    return Verdict(
        winner=winner,
        why=why,
        level=level,
        failures=failures,
        rules_engine=rules_engine,
        rules_reason=rules_reason,
        agrees_with_rules=agrees,
        rule_verdict=verdict,
    )


class EngineComparison(BaseModel):
    """The whole check: both sides, their agreement, the verdict and what was kept."""

    name: str
    runs: list[EngineRun]
    agreement: QualityReport
    verdict: Verdict
    promoted: str | None = Field(None, description="the replica now serving the spec's name (--promote)")
    retired: list[str] = Field(default_factory=list, description="the side-by-side replicas stopped at the end")

    def run(self, engine: Engine) -> EngineRun:
        return next(r for r in self.runs if r.engine == engine)

    def rows(self) -> list[dict[str, str]]:
        """The side-by-side table: one row per metric, llama.cpp | vLLM | vLLM/llama.cpp."""
        a, b = self.run("llamacpp"), self.run("vllm")
        rows: list[dict[str, str]] = []

        def add(section: str, metric: str, va: Any, vb: Any, r: float | None = None) -> None:
            rows.append(
                {
                    "": section,
                    "metric": metric,
                    a.label: va,
                    b.label: vb,
                    f"{b.label}/{a.label}": "" if r is None else f"{r:.2f}x",
                }
            )

        add("engine", "artifact", a.artifact, b.artifact)
        for lv_a in a.benchmark.levels:
            lv_b = b.benchmark.level(lv_a.concurrency)
            if lv_b is None:
                continue
            for label, read, _ in COLUMNS:
                va, vb = read(lv_a), read(lv_b)
                add(f"conc {lv_a.concurrency}", label, cell(va), cell(vb), ratio(va, vb))
            ca, cb = lv_a.cost_per_1m_output_tokens_usd, lv_b.cost_per_1m_output_tokens_usd
            add(f"conc {lv_a.concurrency}", "USD / 1M out tok", _usd(ca), _usd(cb), ratio(ca, cb))
        add("cost", "price", _price(a), _price(b))
        for device, term in _memory_terms(a, b):
            add(
                f"memory {device}",
                f"{term} planned/actual",
                _term(a.memory, device, term),
                _term(b.memory, device, term),
            )
        q = self.agreement
        add(
            "quality",
            f"top-1 agreement, greedy ({q.prompts} prompts x {q.tokens_per_prompt} tokens)",
            f"{q.top1_agreement:.1%} ({q.agreements}/{q.positions})",
            "reference",
        )
        add("quality", "identical continuations", f"{q.identical_continuations:.0%}", "reference")
        v = self.verdict
        add(
            "gates",
            f"at concurrency {v.level}",
            _gate_cell(v.failures["llamacpp"], a),
            _gate_cell(v.failures["vllm"], b),
        )
        return rows

    def lines(self) -> list[str]:
        """The verdict under the table."""
        v = self.verdict
        winner = "none" if v.winner is None else ENGINE_NAMES[v.winner]
        out = [f"winner: {winner}: {v.why}", f"rules: {v.rule_verdict}"]
        if self.promoted:
            out.append(f"promoted: {self.name} now served by {self.promoted}")
        if self.retired:
            out.append(f"retired: {', '.join(self.retired)} (the side-by-side replicas)")
        return out

    def markdown(self) -> str:
        a, b = self.run("llamacpp"), self.run("vllm")
        load = a.benchmark.settings
        return (
            f"# {self.name}: llama.cpp against vLLM\n\n"
            f"Same load on both: {load.requests} requests per level, {load.input_len} in / {load.output_len} out "
            f"tokens, concurrency {load.concurrency}. Replicas {a.replica} ({a.runtime}) and {b.replica} "
            f"({b.runtime}).\n\n"
            + markdown_table(self.rows())
            + "\n\n"
            + "\n\n".join(f"**{line.split(':', 1)[0]}**:{line.split(':', 1)[1]}" for line in self.lines())
            + "\n"
        )


def _usd(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _price(run: EngineRun) -> str:
    if run.hour_price_usd is None:
        return "not set"
    unit = f"GPU-hour x {run.devices}" if run.devices else "host-hour"
    return f"{run.hour_price_usd:g} USD/{unit}"


def _memory_terms(*runs: EngineRun) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for run in runs:
        for row in run.memory.rows if run.memory else ():
            if (row.device, row.term) not in seen:
                seen.append((row.device, row.term))
    return seen


def _term(memory: MemoryComparison | None, device: str, term: str) -> str:
    if memory is None:
        return "not recorded"
    if memory.problem:
        return "unreadable"
    row = next((r for r in memory.rows if r.device == device and r.term == term), None)
    if row is None:
        return "-"
    planned = "-" if row.planned_bytes is None else format_bytes(row.planned_bytes)
    actual = "not reported" if row.actual_bytes is None else format_bytes(row.actual_bytes)
    return f"{planned} / {actual}"


def _gate_cell(failures: list[str], run: EngineRun) -> str:
    if failures:
        return "FAILED: " + "; ".join(failures)
    return f"passed ({len(run.gates)} gates)" if run.gates else "passed (no gates set)"


def hour_price(
    spec: ModelSpec, devices: int, gpu_hour_price_usd: float | None, cpu_hour_price_usd: float | None
) -> float | None:
    """The hourly price of what one side holds: per GPU (the spec's price first, then the
    setting), or the whole host's when it holds no GPU."""
    if devices == 0:
        return cpu_hour_price_usd
    spec_price = spec.benchmark.gpu_hour_price_usd if spec.benchmark else None
    return spec_price if spec_price is not None else gpu_hour_price_usd


def artifact_label(fmt: str, quantization: str) -> str:
    return f"{'GGUF' if fmt == 'gguf' else 'HF'} {quantization.upper()}"
