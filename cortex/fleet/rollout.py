"""How a spec's replicas change across the fleet: a rolling update, and a reconcile after a loss.

    rollout_steps(placement, holding)      the steps of applying a spec to the fleet, in order
    reconcile_steps(want, assigned, ...)   what a reconcile does: keep, re-place, retire

Both work on slots (cortex.fleet.hosts.Slot): a host and an instance there. A placement that
puts two replicas on one host (fewer hosts than replicas, or `spread: none`) gives that host
instances 0 and 1, each its own replica (name, port, engine, gateway route), swapped, retired
and counted on its own.

A rolling update never takes more than one replica out at a time. The slots that already run a
replica of the model (`holding`) keep it, and each is replaced in turn by that host's own
deploy of that instance, which is make-before-break: the new replica is started beside the old one and must be
healthy, smoke-tested, benchmark-gated and registered in the gateway before the old one is
drained and stopped (flows/deploy.py roll_out). So serving capacity stays at N during each swap.
A host the planner says has no room for a second replica beside the old one (`HostTrace.fits`
is false: its free memory, which the old replica already uses, is too small) is swapped with the
old replica stopped first: capacity N-1 for that swap, and the step says so. Moving the new
replica to another host first would keep N there, but it changes which hosts serve the model
on every edit; an operator who wants N on full hosts adds a host and a replica instead.
Hosts that must gain a replica are deployed first (capacity only grows), hosts that hold one
the placement no longer allows are retired last.

Pure: the flows (flows/fleet.py) run the steps and stop at the first failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from cortex.fleet.hosts import Slot
from cortex.fleet.placement import Placement

Action = Literal["add", "swap", "stop-then-deploy", "retire"]


@dataclass(frozen=True)
class FleetStep:
    host: str
    action: Action
    why: str
    instance: int = 0  # which of the model's replicas on the host

    @property
    def slot(self) -> Slot:
        return Slot(self.host, self.instance)

    def to_json(self) -> dict[str, str | int]:
        return {
            "host": self.host,
            "instance": self.instance,
            "replica": str(self.slot),
            "action": self.action,
            "why": self.why,
        }


def placed_slots(placement: Placement) -> list[Slot]:
    """The placement's replicas as slots, in its order: a host's first is instance 0, its second 1."""
    count: dict[str, int] = {}
    slots = []
    for r in placement.placed:
        slots.append(Slot(r.host, count.get(r.host, 0)))
        count[r.host] = count.get(r.host, 0) + 1
    return slots


def rollout_steps(placement: Placement, holding: Sequence[Slot]) -> list[FleetStep]:
    """The steps that make `placement.replicas` replicas of the model run, starting from the
    slots of online hosts in `holding` (those that run one now). A slot in `holding` keeps its
    replica (replaced in place) while the placement's filters still allow its host (allow-list,
    labels, runtime); hosts' instance 0 are kept before their instance 1, so a shrinking spec
    keeps the spread. The placement's own slots fill what is missing. No step when nothing runs
    and nothing can be placed: the caller reports `placement.shortfall`."""
    traces = {t.host: t for t in placement.hosts}
    allowed = [
        s
        for s in sorted(holding, key=lambda s: (s.instance, s.host))
        if s.host in traces
        and traces[s.host].allowed
        and traces[s.host].runtime_ok
        and not traces[s.host].missing_labels
    ]
    kept = sorted(allowed[: placement.replicas])
    added = [s for s in placed_slots(placement) if s not in kept][: max(0, placement.replicas - len(kept))]
    steps = [FleetStep(s.host, "add", "placed: " + traces[s.host].reason, s.instance) for s in added]
    for s in kept:
        if traces[s.host].fits:
            steps.append(
                FleetStep(s.host, "swap", "replaced in place: the new replica starts beside the old one", s.instance)
            )
        else:
            steps.append(
                FleetStep(
                    s.host,
                    "stop-then-deploy",
                    "no room for a second replica beside the old one: the old one stops first "
                    f"(capacity N-1 during this swap; {traces[s.host].reason})",
                    s.instance,
                )
            )
    for s in sorted(holding):
        if s not in kept:
            why = (
                "more replicas than the spec wants"
                if s in allowed
                else "the placement no longer allows it: " + traces[s.host].reason
                if s.host in traces
                else "the host is not in the placement"
            )
            steps.append(FleetStep(s.host, "retire", why, s.instance))
    return steps


@dataclass(frozen=True)
class ReconcilePlan:
    alive: list[Slot]  # assigned slots whose replica serves
    missing: int  # replicas to place again
    candidates: list[str]  # online hosts that may take one (a host with a live replica may take another)
    stale: list[Slot]  # slots of online hosts holding a replica that is not alive


def reconcile_steps(
    wanted: int,
    assigned: Sequence[Slot],
    online: Sequence[str],
    holding: Mapping[Slot, bool],
) -> ReconcilePlan:
    """What fleet-reconcile does for one spec. `assigned`: the slots the last apply or reconcile
    gave a replica; `online`: hosts whose Prefect worker is online; `holding`: slot -> whether
    its host's record lists a replica of the model there that serves (True) or one that does not
    answer (False: its engine died, or the gateway marks it unhealthy). A replica is alive when
    its slot is assigned, its host online and the slot holds a serving one. Missing replicas may
    go to any online host; the placement prefers hosts that hold none of the model (spread), so
    a host that runs one takes another only when no other fits (new_slots numbers it). A slot
    of an online host holding a replica that is not alive is stale (the host was lost, its
    replicas were re-placed, and it came back; or its engine stopped answering): unless a new
    replica takes that slot (its deploy then replaces the dead one), the flow retires it."""
    alive = [s for s in assigned if s.host in online and holding.get(s) is True]
    missing = max(0, wanted - len(alive))
    stale = [s for s in sorted(holding) if s.host in online and s not in alive]
    return ReconcilePlan(alive, missing, sorted(online), stale)


def new_slots(hosts: Sequence[str], alive: Sequence[Slot]) -> list[Slot]:
    """Slots for new replicas on `hosts` (a host named twice gets two): on each host, the lowest
    instances no live replica has."""
    taken = {s for s in alive}
    slots = []
    for host in hosts:
        instance = 0
        while Slot(host, instance) in taken:
            instance += 1
        taken.add(Slot(host, instance))
        slots.append(Slot(host, instance))
    return slots
