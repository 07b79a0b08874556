"""Planned against actual: what an engine says it allocated, read from its start log, next to
what the plan (cortex.plan) said each device would hold.

    read_engine_report(engine, log)   -> EngineReport   bytes per device and term, or why not
    compare_memory(planned, report)   -> MemoryComparison   rows, deviations, warnings

Both are pure and never raise on what the log says: a log whose format changed gives an
`EngineReport` with `problem` set, and the comparison warns that the report could not be read.

What each engine reports (checked against this toolchain's llama-server and vLLM 0.32's source):
- llama-server (at --verbosity 4, which Cortex's launch sets): per buffer type,
  `load_tensors:   CPU_Mapped model buffer size =    92.10 MiB`,
  `llama_kv_cache:        CPU KV buffer size =    22.50 MiB`,
  `sched_reserve:        CPU compute buffer size =    14.51 MiB` and the output buffer;
  weights = model buffers, KV cache = KV buffers, overhead = compute + output buffers.
- vLLM: `Model loading took X GiB memory` (GPU), `Available KV cache memory: X GiB` (GPU),
  `Explicitly set (X/Y) GiB for KV cache` / `Auto set (X/Y) GiB for KV cache` (CPU) and
  `Graph capturing finished in N secs, took X GiB` (GPU) and, on CPU, `Checkpoint size: X GiB`
  for the weights. vLLM divides its budget
  (gpu_memory_utilization x the GPU) into weights, KV cache and the rest, so on a GPU the
  overhead is that budget less weights and KV cache; on CPU vLLM does not report it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cortex.fileio import atomic_write_json
from cortex.plan import GiB, MiB, DevicePlan
from cortex.spec import format_bytes

Term = Literal["weights", "kv_cache", "overhead"]
TERMS: tuple[Term, ...] = ("weights", "kv_cache", "overhead")
TERM_WORDS = {"weights": "weights", "kv_cache": "KV cache", "overhead": "overhead"}
DEVIATION_LIMIT = 0.10  # over this (either way) the run warns


@dataclass(frozen=True)
class DeviceActual:
    """What the engine reports for one device; None where it reports nothing for a term."""

    device: str  # "cpu", "cuda:0", ... (the plan's names)
    weights_bytes: int | None = None
    kv_cache_bytes: int | None = None
    overhead_bytes: int | None = None

    def term(self, name: Term) -> int | None:
        value: int | None = getattr(self, f"{name}_bytes")
        return value


@dataclass(frozen=True)
class EngineReport:
    """An engine's own account of its memory, read from its start log."""

    engine: str
    devices: tuple[DeviceActual, ...] = ()
    problem: str | None = None  # why the report could not be read; None when it was
    lines: tuple[str, ...] = ()  # the log lines the figures came from

    @property
    def readable(self) -> bool:
        return self.problem is None

    def device(self, name: str) -> DeviceActual | None:
        return next((d for d in self.devices if d.device == name), None)


# ----------------------------------------------------------------------------- llama-server

_LLAMA_LOAD_START = re.compile(r"load_tensors: loading model tensors")
_LLAMA_BUFFERS: list[tuple[Term, re.Pattern[str]]] = [
    ("weights", re.compile(r"load_tensors:\s+(\S+) model buffer size\s*=\s*([\d.]+) MiB")),
    ("kv_cache", re.compile(r"llama_kv_cache\w*:\s+(\S+) (?:KV|RS) buffer size\s*=\s*([\d.]+) MiB")),
    ("overhead", re.compile(r"\w+:\s+(\S+)\s+(?:compute|output) buffer size\s*=\s*([\d.]+) MiB")),
]
_GPU_BUFFER = re.compile(r"(?:CUDA|ROCm)(\d+)(?:_\w+)?")


def llamacpp_device(buffer: str) -> str:
    """The plan's device name for a llama.cpp buffer type: CPU, CPU_Mapped, CPU_REPACK and the
    pinned host buffers (CUDA_Host) live in RAM ("cpu"); CUDA0 is "cuda:0"; others lower-cased."""
    if buffer.startswith("CPU") or buffer.endswith("_Host"):
        return "cpu"
    m = _GPU_BUFFER.fullmatch(buffer)
    return f"cuda:{m.group(1)}" if m else buffer.lower()


def read_llamacpp_report(log: str) -> EngineReport:
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if _LLAMA_LOAD_START.search(line)]
    lines = lines[starts[-1] :] if starts else lines  # the last load, if the log holds several
    sums: dict[str, dict[Term, float]] = {}
    used: list[str] = []
    for line in lines:
        for term, pattern in _LLAMA_BUFFERS:
            m = pattern.search(line)
            if m:
                per = sums.setdefault(llamacpp_device(m.group(1)), {})
                per[term] = per.get(term, 0.0) + float(m.group(2))
                used.append(line.strip())
                break
    if not any("weights" in per for per in sums.values()):
        return EngineReport(
            "llamacpp",
            problem=(
                "llama-server's log has no `model buffer size` line (it writes its buffer sizes at "
                "--verbosity 4 or more, which Cortex's launch sets; a lower --verbosity in extra_args, "
                "or a llama.cpp whose wording changed, hides them)"
            ),
        )
    devices = tuple(DeviceActual(name, *(_mib(per.get(t)) for t in TERMS)) for name, per in sorted(sums.items()))
    return EngineReport("llamacpp", devices, lines=tuple(used))


def _mib(value: float | None) -> int | None:
    return None if value is None else round(value * MiB)


# ----------------------------------------------------------------------------- vLLM

_VLLM_WORKER = re.compile(r"\((?:\w+_)?(?:PP(\d+)_)?TP(\d+)\b")  # "(Worker_TP1 pid=..)", "(Worker_PP1_TP0 ..)"
_VLLM_FIGURES: list[tuple[str, re.Pattern[str]]] = [
    ("weights", re.compile(r"Model loading took ([\d.]+) GiB memory")),
    ("kv_cache", re.compile(r"Available KV cache memory: ([\d.]+) GiB")),
    ("cpu_weights", re.compile(r"Checkpoint size: ([\d.]+) GiB")),
    ("cpu_kv_cache", re.compile(r"(?:Explicitly|Auto) set \(([\d.]+)/[\d.]+\) GiB for KV cache")),
    ("graphs", re.compile(r"Graph capturing finished in [\d.]+ secs?, took ([\d.]+) GiB")),
]


def read_vllm_report(log: str) -> EngineReport:
    """vLLM's figures per worker. Workers are told apart by the PP/TP ranks in a line's prefix
    and numbered in rank order (cuda:0, cuda:1, ...); a line without ranks is the only worker.
    On CPU vLLM logs no loaded size: the checkpoint size it logs stands in for the weights (its
    CPU backend holds them as stored). CUDA graph memory is part of the overhead; it is kept in
    `lines`, not as a term."""
    per_worker: dict[tuple[str, int, int], dict[str, float]] = {}
    used: list[tuple[tuple[str, int, int], str]] = []
    for line in log.splitlines():
        for figure, pattern in _VLLM_FIGURES:
            m = pattern.search(line)
            if not m:
                continue
            w = _VLLM_WORKER.search(line)
            pp, tp = (int(w.group(1) or 0), int(w.group(2))) if w else (0, 0)
            kind = "cpu" if figure.startswith("cpu_") else "cuda"
            per_worker.setdefault((kind, pp, tp), {})[figure.removeprefix("cpu_")] = float(m.group(1))
            used.append(((kind, pp, tp), line.strip()))
            break
    # a CPU worker is one that set its KV cache (on a GPU the checkpoint-size line alone is no device)
    figures = {
        k: v
        for k, v in sorted(per_worker.items())
        if ("kv_cache" in v if k[0] == "cpu" else bool(set(v) & {"weights", "kv_cache"}))
    }
    if not figures:
        return EngineReport(
            "vllm",
            problem=(
                "vLLM's log has none of `Model loading took`, `Available KV cache memory` or "
                "`set (...) GiB for KV cache` (a vLLM whose wording changed, or a log that lost its start)"
            ),
        )
    devices = []
    gpus = 0
    for (kind, _pp, _tp), values in figures.items():
        name = "cpu" if kind == "cpu" else f"cuda:{gpus}"
        gpus += kind == "cuda"
        devices.append(DeviceActual(name, _gib(values.get("weights")), _gib(values.get("kv_cache"))))
    return EngineReport("vllm", tuple(devices), lines=tuple(line for key, line in used if key in figures))


def _gib(value: float | None) -> int | None:
    return None if value is None else round(value * GiB)


def read_engine_report(engine: str, log: str) -> EngineReport:
    """The engine's report from its log; unknown engines and unreadable logs give `problem`."""
    if engine == "llamacpp":
        return read_llamacpp_report(log)
    if engine == "vllm":
        return read_vllm_report(log)
    return EngineReport(engine, problem=f"no reader for engine {engine!r}'s memory report")


# ----------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class TermComparison:
    """One device's one term: planned bytes, the engine's bytes, and how far apart."""

    device: str
    term: Term
    planned_bytes: int | None  # None: the plan has no such device
    actual_bytes: int | None  # None: the engine reported nothing for it
    derived: bool = False  # actual computed from the engine's other figures (vLLM GPU overhead)

    @property
    def deviation(self) -> float | None:
        """(actual - planned) / planned; None when either is missing or nothing was planned."""
        if self.planned_bytes is None or self.actual_bytes is None or self.planned_bytes == 0:
            return None
        return (self.actual_bytes - self.planned_bytes) / self.planned_bytes

    @property
    def off(self) -> bool:
        d = self.deviation
        return d is not None and abs(d) > DEVIATION_LIMIT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["deviation"] = None if self.deviation is None else round(self.deviation, 4)
        data["off"] = self.off
        return data


@dataclass(frozen=True)
class MemoryComparison:
    """Planned against actual for every device of a replica."""

    engine: str
    rows: tuple[TermComparison, ...] = ()
    problem: str | None = None  # the engine's report could not be read
    warnings: tuple[str, ...] = field(default=())

    @property
    def readable(self) -> bool:
        return self.problem is None

    def table(self) -> list[dict[str, Any]]:
        """Rows for a Prefect table artifact."""
        return [
            {
                "device": r.device,
                "term": TERM_WORDS[r.term],
                "planned": "-" if r.planned_bytes is None else format_bytes(r.planned_bytes),
                "actual": (
                    "not reported"
                    if r.actual_bytes is None
                    else format_bytes(r.actual_bytes) + (" (derived)" if r.derived else "")
                ),
                "deviation": "-" if r.deviation is None else f"{r.deviation:+.1%}",
                "status": "OFF" if r.off else "ok",
            }
            for r in self.rows
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "readable": self.readable,
            "problem": self.problem,
            "devices": [r.to_json() for r in self.rows],
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MemoryComparison":
        known = {f for f in TermComparison.__dataclass_fields__}
        rows = tuple(TermComparison(**{k: v for k, v in r.items() if k in known}) for r in data.get("devices", []))
        return cls(data["engine"], rows, data.get("problem"), tuple(data.get("warnings", [])))


def compare_memory(planned: Sequence[DevicePlan], report: EngineReport) -> MemoryComparison:
    """Each planned device's weights, KV cache and overhead next to the engine's report, and a
    warning for every term more than DEVIATION_LIMIT off (naming the term), for every planned
    term the report lacks, and, when the report could not be read at all, one saying so."""
    label = "llama-server" if report.engine == "llamacpp" else "vLLM" if report.engine == "vllm" else report.engine
    if not report.readable:
        return MemoryComparison(
            report.engine,
            problem=report.problem,
            warnings=(
                f"{label}'s memory report could not be read, so planned against actual is unknown: {report.problem}",
            ),
        )
    rows: list[TermComparison] = []
    warnings: list[str] = []
    names = [d.device for d in planned] + [
        d.device for d in report.devices if d.device not in {p.device for p in planned}
    ]
    for name in names:
        plan = next((p for p in planned if p.device == name), None)
        actual = report.device(name) or DeviceActual(name)
        for term in TERMS:
            planned_bytes = None if plan is None else getattr(plan, f"{term}_bytes")
            actual_bytes, derived = actual.term(term), False
            if (
                term == "overhead"
                and actual_bytes is None
                and report.engine == "vllm"
                and plan is not None
                and name.startswith("cuda")
                and actual.weights_bytes is not None
                and actual.kv_cache_bytes is not None
            ):
                # vLLM fills its budget: what is neither weights nor KV cache is its overhead
                actual_bytes, derived = plan.capacity_bytes - actual.weights_bytes - actual.kv_cache_bytes, True
            row = TermComparison(name, term, planned_bytes, actual_bytes, derived)
            rows.append(row)
            if row.off:
                assert row.deviation is not None and planned_bytes is not None and actual_bytes is not None
                warnings.append(
                    f"{name}: {TERM_WORDS[term]} is {row.deviation:+.0%} off the plan "
                    f"(planned {format_bytes(planned_bytes)}, {label} reports {format_bytes(actual_bytes)})"
                )
            elif plan is not None and planned_bytes and actual_bytes is None and _reported(report.engine, name, term):
                warnings.append(
                    f"{name}: {label}'s report gave no {TERM_WORDS[term]} figure to compare with the plan "
                    f"({format_bytes(planned_bytes)}); its wording may have changed"
                )
    return MemoryComparison(report.engine, tuple(rows), warnings=tuple(warnings))


def _reported(engine: str, device: str, term: Term) -> bool:
    """Whether the engine's log normally has this figure (vLLM on CPU: no overhead)."""
    if engine == "vllm" and device == "cpu":
        return term != "overhead"
    return True


# ----------------------------------------------------------------------------- the record


def memory_dir() -> Path:
    from cortex.settings import Settings

    return Path(Settings.load().home) / "memory"


def _record_path(replica: str) -> Path:
    return memory_dir() / f"{replica}.json"


def write_memory_record(replica: str, comparison: MemoryComparison) -> None:
    """Keep the comparison with the replica (`cortex status --json` shows it)."""
    atomic_write_json(_record_path(replica), comparison.to_json(), newline=True)


def read_memory_record(replica: str) -> dict[str, Any] | None:
    """The stored comparison of a replica, as JSON; None if none was recorded."""
    path = _record_path(replica)
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def forget_memory_record(replica: str) -> None:
    _record_path(replica).unlink(missing_ok=True)
