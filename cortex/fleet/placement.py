"""Which hosts run a spec's replicas, with a trace that says why, before anything runs.

`place(spec, facts, hosts, existing_load)` is pure. For every host it asks, in order:
is it in `placement.hosts` (the allow-list; every host when unset)? does it carry every label of
`placement.labels`? does it offer the spec's runtime? does the plan fit its hardware? The plan is
`cortex plan`'s own (`cortex.plan.make_plan`) for the host's free GPU memory, CPU cores and RAM,
with the spec's `resources.gpus` applied; `resources.gpu_memory` is not, since the host's
inventory says what it has.

Then it places the replicas one at a time. A replica needs, on each device of the plan, the
plan's total bytes there (weights, KV cache, overhead); replicas already on the host
(`existing_load`, and those placed before it in this call) count against each device's capacity.
Of the hosts where it fits:
  1. spread `host` (the default): hosts without a replica of this model come first; when every
     one already has one (fewer eligible hosts than replicas), replicas share hosts, and the
     placement says so;
  2. a host where the plan runs on GPUs beats one where it runs on CPU;
  3. the least loaded host wins: the most memory left after placing the replica (GPU memory
     summed over all the host's GPUs for a GPU plan, RAM for a CPU plan);
  4. ties go to the host name, alphabetically, so a placement is the same every time.
When a replica fits nowhere, the placement says by how much (the closest host's shortfall) and
what would fit: the planner's suggestions (a smaller quant, a shorter context, more GPUs),
fewer replicas, or hosts the filters left out that would fit.

Plans are cached per (the spec's planning fields, the host's hardware shape): hosts of one kind
are planned once, and 500 specs over 100 hosts take well under a second
(benchmarks/placement_bench.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cortex import hardware
from cortex.facts import ModelFacts
from cortex.fleet.inventory import HostInventory
from cortex.hardware import HardwareError, Inventory
from cortex.plan import DevicePlan, Plan, PlanError, make_plan
from cortex.spec import ModelSpec, format_bytes

# Spec fields that do not change a plan: two specs that differ only in these share a plan.
NOT_PLANNING_FIELDS = {"name", "aliases", "tests", "benchmark", "schedule", "replicas", "placement", "image"}


@dataclass
class HostLoad:
    """What replicas already on a host take: bytes per device ("cuda:0", "cpu") and which models."""

    committed: dict[str, int] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)

    def copy(self) -> HostLoad:
        return HostLoad(dict(self.committed), list(self.models))

    def to_json(self) -> dict[str, Any]:
        return {"committed": dict(self.committed), "models": list(self.models)}


@dataclass
class PlacedReplica:
    replica: int  # 1-based
    host: str
    address: str
    devices: dict[str, str]  # the plan's device -> the host's device it lands on (they differ when shifted)
    need: dict[str, int]  # host device -> bytes
    free_after: int
    plan: Plan

    def to_json(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "host": self.host,
            "address": self.address,
            "devices": self.devices,
            "need_bytes": self.need,
            "free_after_bytes": self.free_after,
            "engine": self.plan.engine,
            "quantization": self.plan.quantization,
        }


@dataclass
class HostTrace:
    """One host's answers, and why it was chosen or passed over."""

    host: str
    allowed: bool
    missing_labels: list[str]
    runtime_ok: bool
    plan: Plan | None  # None when the planner refused this host (plan_error)
    plan_error: str | None
    free_before: int
    replicas: list[int] = field(default_factory=list)
    free_after: int | None = None
    reason: str = ""

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits

    @property
    def eligible(self) -> bool:
        return self.allowed and not self.missing_labels and self.runtime_ok and self.fits

    @property
    def chosen(self) -> bool:
        return bool(self.replicas)

    def plan_summary(self) -> str:
        if self.plan is None:
            return "-"
        p = self.plan
        what = f"{p.engine} {p.quantization}" if p.quantization else p.engine
        need = max(p.devices, key=lambda d: d.total_bytes)
        devices = f"{len(p.devices)} x " if len(p.devices) > 1 else ""
        return f"{what}, {devices}{format_bytes(need.total_bytes)} on {'GPU' if _on_gpu(p) else 'CPU'}"

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "allowed": self.allowed,
            "missing_labels": self.missing_labels,
            "runtime_ok": self.runtime_ok,
            "fits": self.fits,
            "plan": self.plan_summary() if self.plan else None,
            "shortfall": self.plan.shortfall if self.plan else self.plan_error,
            "free_before_bytes": self.free_before,
            "free_after_bytes": self.free_after,
            "replicas": self.replicas,
            "chosen": self.chosen,
            "reason": self.reason,
        }


@dataclass
class Placement:
    model: str
    replicas: int  # wanted
    placed: list[PlacedReplica]
    hosts: list[HostTrace]  # every host, by name
    notes: list[str] = field(default_factory=list)
    shortfall: str | None = None
    would_fit: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return len(self.placed) == self.replicas

    def load_after(self, existing_load: Mapping[str, HostLoad] | None = None) -> dict[str, HostLoad]:
        """`existing_load` plus this placement's replicas: the load the next placement starts from."""
        load = {name: lo.copy() for name, lo in (existing_load or {}).items()}
        for r in self.placed:
            _commit(load.setdefault(r.host, HostLoad()), r.need, self.model)
        return load

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "replicas": self.replicas,
            "ok": self.ok,
            "placed": [r.to_json() for r in self.placed],
            "hosts": [h.to_json() for h in self.hosts],
            "notes": self.notes,
            "shortfall": self.shortfall,
            "would_fit": self.would_fit,
        }


class PlanCache:
    """Plans by (the spec's planning fields, the hardware shape). One cache may serve many specs."""

    def __init__(self) -> None:
        self._plans: dict[tuple[Any, ...], Plan | str] = {}
        self.misses = 0

    @staticmethod
    def spec_key(spec: ModelSpec) -> str:
        return spec.model_dump_json(exclude=NOT_PLANNING_FIELDS)

    def plan(self, spec_key: str, spec: ModelSpec, facts: ModelFacts, host: HostInventory) -> Plan | str:
        """The plan for this host, or why the planner refused it (a message)."""
        inv = host.hardware()
        wanted = spec.resources.gpus
        if isinstance(wanted, int) and wanted > len(inv.gpus):
            return f"has {len(inv.gpus)} GPU{'s' if len(inv.gpus) != 1 else ''}, resources.gpus asks for {wanted}"
        if isinstance(wanted, list) and set(wanted) - {g.index for g in inv.gpus}:
            missing = sorted(set(wanted) - {g.index for g in inv.gpus})
            return f"has no GPU {', '.join(map(str, missing))} (resources.gpus lists it; it has {len(inv.gpus)})"
        try:
            inv = hardware.resolve(inv, wanted, None)
        except HardwareError as e:
            return str(e)
        key = (spec_key, tuple((g.index, g.memory_bytes) for g in inv.gpus), inv.cpu_cores, inv.ram_bytes)
        if key not in self._plans:
            self.misses += 1
            try:
                self._plans[key] = make_plan(spec, facts, inv)
            except (PlanError, HardwareError) as e:
                self._plans[key] = str(e)
        return self._plans[key]


def _on_gpu(plan: Plan) -> bool:
    return any(d.device.startswith("cuda:") for d in plan.devices)


def _commit(load: HostLoad, need: Mapping[str, int], model: str) -> None:
    for device, n in need.items():
        load.committed[device] = load.committed.get(device, 0) + n
    load.models.append(model)


def _free(host: HostInventory, inv: Inventory, load: HostLoad, on_gpu: bool) -> int:
    """Memory left on the host: all its GPUs' free memory (GPU plans) or its RAM (CPU plans), less its load."""
    if on_gpu:
        return sum(g.memory_bytes - load.committed.get(f"cuda:{g.index}", 0) for g in inv.gpus)
    return inv.ram_bytes - load.committed.get("cpu", 0)


@dataclass
class _Fit:
    devices: dict[str, str]
    need: dict[str, int]
    free_after: int


def _fit_beside(plan: Plan, host: HostInventory, inv: Inventory, load: HostLoad, movable: bool) -> _Fit | str:
    """Where the plan's devices land beside the host's load, or why they do not fit (a message).

    `inv` is the whole host. The plan names the first GPUs; on a host whose GPUs all have the
    same free memory any of them would get the same plan, so unless the spec names its GPUs
    (`movable` false), a plan on fewer GPUs than the host has moves to the GPUs with the most room."""
    devices = {d.device: d.device for d in plan.devices}
    gpu_plans = [d for d in plan.devices if d.device.startswith("cuda:")]
    if movable and gpu_plans and len(gpu_plans) < len(inv.gpus) and len({g.memory_bytes for g in inv.gpus}) == 1:
        room = sorted(inv.gpus, key=lambda g: (load.committed.get(f"cuda:{g.index}", 0), g.index))
        for d, g in zip(gpu_plans, room):
            devices[d.device] = f"cuda:{g.index}"
    need: dict[str, int] = {}
    for d in plan.devices:
        target = devices[d.device]
        used = load.committed.get(target, 0)
        if used + d.total_bytes > d.capacity_bytes:
            return (
                f"{target} has {format_bytes(max(0, d.capacity_bytes - used))} left beside "
                f"{format_bytes(used)} of replicas already there, needs {format_bytes(d.total_bytes)}"
            )
        need[target] = d.total_bytes
    return _Fit(devices, need, _free(host, inv, load, _on_gpu(plan)) - sum(need.values()))


def _deficit(plan: Plan) -> tuple[int, DevicePlan]:
    worst = max(plan.devices, key=lambda d: d.total_bytes - d.capacity_bytes)
    return worst.total_bytes - worst.capacity_bytes, worst


def _replica_list(replicas: list[int]) -> str:
    return ("replica " if len(replicas) == 1 else "replicas ") + ", ".join(map(str, replicas))


def place(
    spec: ModelSpec,
    facts: ModelFacts,
    hosts: Sequence[HostInventory],
    existing_load: Mapping[str, HostLoad] | None = None,
    cache: PlanCache | None = None,
) -> Placement:
    """Choose hosts for `spec.replicas` replicas; see the module docstring for the rules."""
    cache = cache or PlanCache()
    spec_key = PlanCache.spec_key(spec)
    sel = spec.placement
    allow = {h.lower() for h in sel.hosts} if sel.hosts is not None else None
    load = {h.name: (existing_load or {}).get(h.name, HostLoad()).copy() for h in hosts}
    traces: dict[str, HostTrace] = {}
    inventories: dict[str, Inventory] = {}
    by_name = {h.name: h for h in hosts}
    for h in sorted(hosts, key=lambda h: h.name):
        planned = cache.plan(spec_key, spec, facts, h)
        plan = planned if isinstance(planned, Plan) else None
        inv = inventories[h.name] = h.hardware()
        t = HostTrace(
            host=h.name,
            allowed=allow is None or h.name.lower() in allow,
            missing_labels=[
                f"{k}={v}" + (f" (has {k}={h.labels[k]})" if k in h.labels else "")
                for k, v in sel.labels.items()
                if h.labels.get(k) != v
            ],
            runtime_ok=spec.runtime in h.runtimes,
            plan=plan,
            plan_error=None if plan is not None else str(planned),
            free_before=_free(h, inv, load[h.name], plan is None or _on_gpu(plan)),
        )
        t.reason = _filter_reason(t, spec)
        traces[h.name] = t

    eligible = [t for t in traces.values() if t.eligible]
    placement = Placement(spec.name, spec.replicas, [], list(traces.values()))
    relaxed = False
    movable = not isinstance(spec.resources.gpus, list)
    for replica in range(1, spec.replicas + 1):
        fits: list[tuple[HostTrace, _Fit]] = []
        full: list[str] = []
        for t in eligible:
            assert t.plan is not None
            fit = _fit_beside(t.plan, by_name[t.host], inventories[t.host], load[t.host], movable)
            if isinstance(fit, str):
                full.append(f"{t.host}: {fit}")
                if not t.chosen:
                    t.reason = f"fits an empty host, but not beside its load: {fit}"
            else:
                fits.append((t, fit))
        if sel.spread == "host":
            fresh = [(t, f) for t, f in fits if spec.name not in load[t.host].models]
            for t, _ in fits:
                if spec.name in load[t.host].models and fresh and not t.chosen:
                    t.reason = "fits, but already runs a replica of this model (spread: host)"
            if fits and not fresh and not relaxed:
                relaxed = True
                placement.notes.append(
                    f"spread: {spec.replicas} replicas over {len(eligible)} eligible "
                    f"host{'s' if len(eligible) != 1 else ''}: from replica {replica} on, replicas share hosts"
                )
            fits = fresh or fits
        if not fits:
            _explain_shortfall(placement, spec, list(traces.values()), eligible, replica, full)
            break
        t, fit = min(fits, key=lambda tf: (not _on_gpu(tf[0].plan), -tf[1].free_after, tf[0].host))  # type: ignore[arg-type]
        for other, f in fits:
            if other is not t and not other.chosen:
                other.reason = (
                    f"fits, passed over for replica {replica}: {t.host} has more memory left after placement "
                    f"({format_bytes(fit.free_after)} vs {format_bytes(f.free_after)})"
                    if (_on_gpu(t.plan), fit.free_after) != (_on_gpu(other.plan), f.free_after)  # type: ignore[arg-type]
                    else f"fits, passed over for replica {replica}: as much memory left as {t.host}; "
                    "the tie goes to the name"
                )
        assert t.plan is not None
        _commit(load[t.host], fit.need, spec.name)
        t.replicas.append(replica)
        t.free_after = fit.free_after
        t.reason = f"chosen for {_replica_list(t.replicas)}: fits, {format_bytes(fit.free_after)} left after placement"
        host = by_name[t.host]
        placement.placed.append(
            PlacedReplica(replica, t.host, host.address, fit.devices, fit.need, fit.free_after, t.plan)
        )
    if relaxed:
        for t in eligible:
            if t.chosen and len(t.replicas) > 1:
                t.reason += " (shares the host: fewer eligible hosts than replicas)"
    return placement


def _filter_reason(t: HostTrace, spec: ModelSpec) -> str:
    """Why a host is out before any replica is placed ('' when it is a candidate)."""
    would = ""
    if t.fits:
        would = " (the plan would fit)"
    if not t.allowed:
        return "not in placement.hosts" + would
    if t.missing_labels:
        return "labels do not match: wants " + ", ".join(t.missing_labels) + would
    if not t.runtime_ok:
        return f"no {spec.runtime} runtime there" + would
    if t.plan is None:
        return f"cannot plan: {t.plan_error}"
    if not t.plan.fits:
        return f"does not fit: {t.plan.shortfall}"
    return ""


def _explain_shortfall(
    placement: Placement,
    spec: ModelSpec,
    traces: list[HostTrace],
    eligible: list[HostTrace],
    replica: int,
    full: list[str],
) -> None:
    placed = replica - 1
    where = f"replica {replica} of {spec.replicas}: " if spec.replicas > 1 else ""
    if eligible:  # plans fit, but the hosts are full
        placement.shortfall = f"{where}every host that fits is full beside the replicas already there: " + "; ".join(
            full
        )
        if placed:
            placement.would_fit.append(f"fewer replicas: {placed}")
        placement.would_fit.append("more hosts, or retire replicas from these")
        return
    candidates = [t for t in traces if t.allowed and not t.missing_labels and t.runtime_ok]
    planned = [t for t in candidates if t.plan is not None]
    if planned:
        closest = min(planned, key=lambda t: (_deficit(t.plan)[0], t.host))  # type: ignore[arg-type]
        assert closest.plan is not None
        short, dev = _deficit(closest.plan)
        what = f"{closest.plan.engine} {closest.plan.quantization or ''}".strip()
        placement.shortfall = (
            f"{where}no host fits: needs {format_bytes(dev.total_bytes)} on {dev.device} ({what}), "
            f"the closest host, {closest.host}, has {format_bytes(dev.capacity_bytes)}: {format_bytes(short)} short"
        )
        placement.would_fit += [f"on {closest.host}: {s}" for s in closest.plan.suggestions]
    elif candidates:
        placement.shortfall = f"{where}no host can be planned for: " + "; ".join(
            f"{t.host}: {t.plan_error}" for t in candidates
        )
    else:
        counts = {
            "not in placement.hosts": sum(not t.allowed for t in traces),
            "without the labels": sum(t.allowed and bool(t.missing_labels) for t in traces),
            f"without the {spec.runtime} runtime": sum(
                t.allowed and not t.missing_labels and not t.runtime_ok for t in traces
            ),
        }
        placement.shortfall = (
            f"{where}no host is eligible among {len(traces)}: "
            + ", ".join(f"{n} {why}" for why, n in counts.items() if n)
            if traces
            else f"{where}the fleet has no hosts"
        )
    if placed:
        placement.would_fit.append(f"fewer replicas: {placed}")
    for t in traces:
        if t.fits and not t.eligible:
            placement.would_fit.append(
                f"{t.host} fits but is left out: {t.reason.removesuffix(' (the plan would fit)')}"
            )
