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
    fits: bool  # the plan fits the host when nothing else runs there
    free_before: int
    replicas: list[int] = field(default_factory=list)
    free_after: int | None = None
    reason: str = ""

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
        load = dict(existing_load or {})
        copied: set[str] = set()
        for r in self.placed:
            if r.host not in copied:  # the loads given are never changed
                load[r.host] = load[r.host].copy() if r.host in load else HostLoad()
                copied.add(r.host)
            _commit(load[r.host], r.need, self.model)
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


@dataclass(frozen=True)
class _Needs:
    """A plan's demand, worked out once per plan: (device, bytes, capacity) per device."""

    devices: tuple[tuple[str, int, int], ...]
    on_gpu: bool
    fits: bool
    total: int
    identity: dict[str, str]  # device -> itself (shared: never mutated)
    need: dict[str, int]  # device -> bytes (shared: never mutated)


@dataclass(frozen=True)
class _Host:
    """A host's hardware, worked out once per host object."""

    inventory: Inventory
    shape: tuple[Any, ...]  # what a plan depends on: free memory per GPU, CPU cores, RAM
    same_gpus: bool  # every GPU has the same free memory
    gpu_free: int  # summed over its GPUs


class PlanCache:
    """Plans by (the spec's planning fields, the host's hardware shape). One cache may serve many
    specs and many placements; it keeps the hosts and plans it has seen."""

    def __init__(self) -> None:
        self._plans: dict[tuple[Any, ...], Plan | str] = {}
        self._hosts: dict[int, tuple[HostInventory, _Host]] = {}
        self._needs: dict[int, tuple[Plan, _Needs]] = {}
        self.misses = 0  # plans made

    @staticmethod
    def spec_key(spec: ModelSpec) -> str:
        return spec.model_dump_json(exclude=NOT_PLANNING_FIELDS)

    def host(self, host: HostInventory) -> _Host:
        known = self._hosts.get(id(host))
        if known is None or known[0] is not host:
            inv = host.hardware()
            shape = (tuple(g.memory_bytes for g in inv.gpus), inv.cpu_cores, inv.ram_bytes)
            known = (host, _Host(inv, shape, len(set(shape[0])) <= 1, sum(shape[0])))
            self._hosts[id(host)] = known
        return known[1]

    def needs(self, plan: Plan) -> _Needs:
        known = self._needs.get(id(plan))
        if known is None or known[0] is not plan:
            devices = tuple((d.device, d.total_bytes, d.capacity_bytes) for d in plan.devices)
            n = _Needs(
                devices,
                any(d.startswith("cuda:") for d, _, _ in devices),
                plan.fits,
                sum(b for _, b, _ in devices),
                {d: d for d, _, _ in devices},
                {d: b for d, b, _ in devices},
            )
            known = (plan, n)
            self._needs[id(plan)] = known
        return known[1]

    def plan(self, spec_key: str, spec: ModelSpec, facts: ModelFacts, host: HostInventory) -> Plan | str:
        """The plan for this host, or why the planner refused it (a message)."""
        key = (spec_key, self.host(host).shape)
        if key not in self._plans:
            self._plans[key] = self._make(spec, facts, self.host(host).inventory)
        return self._plans[key]

    def _make(self, spec: ModelSpec, facts: ModelFacts, inv: Inventory) -> Plan | str:
        wanted = spec.resources.gpus
        if isinstance(wanted, int) and wanted > len(inv.gpus):
            return f"has {len(inv.gpus)} GPU{'s' if len(inv.gpus) != 1 else ''}, resources.gpus asks for {wanted}"
        if isinstance(wanted, list) and set(wanted) - {g.index for g in inv.gpus}:
            missing = sorted(set(wanted) - {g.index for g in inv.gpus})
            return f"has no GPU {', '.join(map(str, missing))} (resources.gpus lists it; it has {len(inv.gpus)})"
        self.misses += 1
        try:
            return make_plan(spec, facts, hardware.resolve(inv, wanted, None))
        except (PlanError, HardwareError) as e:
            return str(e)


def _on_gpu(plan: Plan) -> bool:
    return any(d.device.startswith("cuda:") for d in plan.devices)


def _commit(load: HostLoad, need: Mapping[str, int], model: str) -> None:
    for device, n in need.items():
        load.committed[device] = load.committed.get(device, 0) + n
    load.models.append(model)


def _free(host: _Host, load: HostLoad, on_gpu: bool) -> int:
    """Memory left on the host: all its GPUs' free memory (GPU plans) or its RAM (CPU plans), less its load."""
    if on_gpu:
        return host.gpu_free - sum(n for d, n in load.committed.items() if d.startswith("cuda:"))
    return host.inventory.ram_bytes - load.committed.get("cpu", 0)


@dataclass
class _Fit:
    devices: dict[str, str]
    need: dict[str, int]
    free_after: int


@dataclass(frozen=True)
class _Full:
    """Why a replica does not fit beside a host's load."""

    device: str
    used: int
    capacity: int
    need: int

    def __str__(self) -> str:
        return (
            f"{self.device} has {format_bytes(max(0, self.capacity - self.used))} left beside "
            f"{format_bytes(self.used)} of replicas already there, needs {format_bytes(self.need)}"
        )


def _fit_beside(needs: _Needs, host: _Host, load: HostLoad, free: int, movable: bool) -> _Fit | _Full:
    """Where the plan's devices land beside the host's load, or why they do not fit.
    `free` is _free() before this replica.

    The plan names the first GPUs; on a host whose GPUs all have the same free memory any of
    them would get the same plan, so unless the spec names its GPUs (`movable` false), a plan on
    fewer GPUs than the host has moves to the GPUs with the most room."""
    if not load.committed:  # an empty host: the plan's own devices, as planned
        return _Fit(needs.identity, needs.need, free - needs.total)
    devices = needs.identity
    gpus = host.inventory.gpus
    if movable and needs.on_gpu and host.same_gpus and len(needs.devices) < len(gpus):
        room = sorted(gpus, key=lambda g: (load.committed.get(f"cuda:{g.index}", 0), g.index))
        devices = {d: f"cuda:{g.index}" for (d, _, _), g in zip(needs.devices, room)}
    need: dict[str, int] = {}
    for device, total, capacity in needs.devices:
        target = devices[device]
        used = load.committed.get(target, 0)
        if used + total > capacity:
            return _Full(target, used, capacity, total)
        need[target] = total
    return _Fit(devices, need, free - needs.total)


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
    existing = existing_load or {}
    load: dict[str, HostLoad] = {}  # copied on a host's first replica: existing_load is never changed
    traces: dict[str, HostTrace] = {}
    info: dict[str, _Host] = {}
    by_name = {h.name: h for h in hosts}
    for h in sorted(hosts, key=lambda h: h.name):
        planned = cache.plan(spec_key, spec, facts, h)
        plan = planned if isinstance(planned, Plan) else None
        needs = cache.needs(plan) if plan is not None else None
        hinfo = info[h.name] = cache.host(h)
        lo = load[h.name] = existing.get(h.name) or HostLoad()
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
            fits=needs is not None and needs.fits,
            free_before=_free(hinfo, lo, needs is None or needs.on_gpu),
        )
        if not t.eligible:
            t.reason = _filter_reason(t, spec)
        traces[h.name] = t

    eligible = [t for t in traces.values() if t.eligible]
    placement = Placement(spec.name, spec.replicas, [], list(traces.values()))
    relaxed = False
    movable = not isinstance(spec.resources.gpus, list)
    # The last thing that happened to each host not chosen, made into its reason at the end.
    events: dict[str, tuple[Any, ...]] = {}
    for replica in range(1, spec.replicas + 1):
        fits: list[tuple[HostTrace, _Fit, tuple[bool, int, str]]] = []
        full: list[tuple[str, _Full]] = []
        for t in eligible:
            needs = cache.needs(t.plan)  # type: ignore[arg-type]
            lo = load[t.host]
            free = t.free_before if not t.chosen else _free(info[t.host], lo, needs.on_gpu)
            fit = _fit_beside(needs, info[t.host], lo, free, movable)
            if isinstance(fit, _Full):
                full.append((t.host, fit))
                events[t.host] = ("full", fit)
            else:
                # the ranking: GPU plans first, then the most memory left, then the name
                fits.append((t, fit, (not needs.on_gpu, -fit.free_after, t.host)))
        if sel.spread == "host":
            fresh = [f for f in fits if spec.name not in load[f[0].host].models]
            if fresh:
                for t, _, _ in fits:
                    if spec.name in load[t.host].models:
                        events[t.host] = ("spread",)
            elif fits and not relaxed:
                relaxed = True
                placement.notes.append(
                    f"spread: {spec.replicas} replicas over {len(eligible)} eligible "
                    f"host{'s' if len(eligible) != 1 else ''}: from replica {replica} on, replicas share hosts"
                )
            fits = fresh or fits
        if not fits:
            _explain_shortfall(
                placement, spec, list(traces.values()), eligible, replica, [f"{h}: {f}" for h, f in full]
            )
            break
        t, fit, rank = min(fits, key=lambda f: f[2])
        for other, _, other_rank in fits:
            if other is not t:
                events[other.host] = ("passed", replica, rank, other_rank)
        if load[t.host] is existing.get(t.host):
            load[t.host] = load[t.host].copy()
        _commit(load[t.host], fit.need, spec.name)
        t.replicas.append(replica)
        t.free_after = fit.free_after
        host = by_name[t.host]
        placement.placed.append(
            PlacedReplica(replica, t.host, host.address, dict(fit.devices), dict(fit.need), fit.free_after, t.plan)  # type: ignore[arg-type]
        )
    for t in eligible:
        if t.chosen:
            t.reason = (
                f"chosen for {_replica_list(t.replicas)}: fits, {format_bytes(t.free_after or 0)} left after placement"
            )
            if relaxed and len(t.replicas) > 1:
                t.reason += " (shares the host: fewer eligible hosts than replicas)"
        elif t.host in events:
            t.reason = _event_reason(events[t.host])
        else:
            t.reason = "fits; no replica was left to place"
    return placement


def _event_reason(event: tuple[Any, ...]) -> str:
    if event[0] == "full":
        return f"fits an empty host, but not beside its load: {event[1]}"
    if event[0] == "spread":
        return "fits, but already runs a replica of this model (spread: host)"
    _, replica, (w_cpu, w_free, winner), (o_cpu, o_free, _) = event
    why = f"fits, passed over for replica {replica}: "
    if w_cpu != o_cpu:
        return why + f"{winner} runs it on GPUs, this host only on CPU"
    if w_free != o_free:
        return (
            why + f"{winner} has more memory left after placement ({format_bytes(-w_free)} vs {format_bytes(-o_free)})"
        )
    return why + f"as much memory left as {winner}; the tie goes to the name"


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
